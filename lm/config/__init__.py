"""Typed experiment config: YAML file + dotted `key=value` overrides, validated up front.

Every section is a frozen dataclass. `load_config(path, overrides)` reads the YAML with
`yaml.safe_load`, applies overrides such as `model.d_model=256`, checks every key and
type, and rejects impossible combinations before anything is built. Every key is a scalar
but `data.mixture`, a tuple of frozen `MixtureSource` entries (a list of mappings in YAML
and in `to_dict`); an override gives it a whole YAML list, or one entry's key as
`data.mixture.NAME.KEY=VALUE`.
"""

from lm.config.checks import validate
from lm.config.load import all_keys, from_flat, load_config, parse_overrides, read_yaml, replace
from lm.config.sections import (CHOICES, REMAT_POLICIES, CheckpointConfig, Config, DataConfig, EvalConfig,
                                LogConfig, MixtureSource, ModelConfig, OptimConfig, ParallelConfig, ProfileConfig,
                                TrainConfig, flatten, to_dict)

__all__ = ["CHOICES", "REMAT_POLICIES", "CheckpointConfig", "Config", "DataConfig", "EvalConfig", "LogConfig",
           "MixtureSource", "ModelConfig", "OptimConfig", "ParallelConfig", "ProfileConfig", "TrainConfig",
           "all_keys", "flatten", "from_flat", "load_config", "parse_overrides", "read_yaml", "replace", "to_dict",
           "validate"]
