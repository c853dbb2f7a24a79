"""The HF presets and checks that need no Hugging Face model: each continued-pretraining preset's
model section is what `lm hf import` writes for the published config, export refuses models with
no HF equivalent, and an hf tokenizer needs an imported run."""

from __future__ import annotations

import dataclasses

import pytest

from lm.config import load_config
from lm.errors import LMError
from lm.hf import families
from tests.conftest import ROOT

# The published config.json of the presets' models (the keys lm reads), and the preset that must match its import.
PRESETS = {
    "configs/qwen3_0_6b.yaml": {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 1024,
        "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
        "head_dim": 128, "hidden_act": "silu", "max_position_embeddings": 40960, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000, "rope_scaling": None, "tie_word_embeddings": True, "attention_bias": False,
        "use_sliding_window": False, "sliding_window": None, "max_window_layers": 28, "initializer_range": 0.02},
    "configs/llama3_2_1b.yaml": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 2048,
        "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
        "head_dim": 64, "hidden_act": "silu", "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                                 "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "tie_word_embeddings": True, "attention_bias": False, "mlp_bias": False, "initializer_range": 0.02},
}


@pytest.mark.parametrize("preset", list(PRESETS))
def test_presets_model_section_is_what_the_import_writes(preset):
    """So `train.py --config PRESET run_dir=IMPORTED` resumes the import (the recipe in each header)."""
    cfg = load_config(ROOT / preset)
    imported = families.model_config(PRESETS[preset])
    assert dataclasses.replace(imported, **{k: getattr(cfg.model, k) for k in families.RUNTIME_KEYS}) == cfg.model
    assert cfg.data.tokenizer == "hf"


def test_export_refuses_models_without_hf_equivalent(tiny_config):
    from lm.config import replace

    cfg = replace(tiny_config(), **{"model.position": "sinusoidal"})
    with pytest.raises(LMError, match="no Hugging Face equivalent"):
        families.hf_config(cfg.model)


def test_train_with_hf_tokenizer_needs_an_imported_run(tiny_config):
    from lm.training.loop import train

    with pytest.raises(LMError, match="lm.hf import"):
        train(tiny_config("data.tokenizer=hf"))
