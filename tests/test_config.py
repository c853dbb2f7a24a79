import pytest
import yaml

from lm import config as config_lib
from lm import rundir
from lm.config import load_config
from lm.errors import LMError
from tests.conftest import ROOT


def test_yaml_and_overrides_are_typed():
    cfg = load_config(ROOT / "configs" / "tiny.yaml",
                      ["model.d_model=96", "model.n_heads=3", "optim.lr=3e-4", "model.dropout=0", "run_dir=/tmp/x"])
    assert cfg.model.d_model == 96 and cfg.model.n_heads == 3
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert isinstance(cfg.model.dropout, float)
    assert cfg.train.steps == 30  # from the file
    assert cfg.run_dir == "/tmp/x"


def test_every_config_file_loads():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        load_config(path)


@pytest.mark.parametrize("override, words", [
    ("model.d_modle=64", ["model.d_modle", "model.d_model"]),
    ("trian.steps=3", ["trian.steps", "train.steps"]),
    ("train.steps=ten", ["train.steps", "int"]),
    ("model.tie_embeddings=3", ["model.tie_embeddings", "bool"]),
    ("model.norm=batchnorm", ["model.norm", "rmsnorm"]),
    ("model.n_heads=5", ["model.d_model", "model.n_heads"]),
    ("model.n_kv_heads=3", ["model.n_kv_heads"]),
    ("train.seq_len=4096", ["train.seq_len", "model.max_seq_len"]),
    ("train.grad_accum_steps=3", ["train.batch_size", "train.grad_accum_steps"]),
    ("model.dropout=1.5", ["model.dropout"]),
    ("data.val_fraction=0", ["data.val_fraction"]),
    ("train.steps=0", ["train.steps"]),
    ("steps", ["key=value"]),
    ("model.qk_norm=rms", ["model.qk_norm", "head"]),
    ("model.rope_scaling=yarn", ["model.rope_scaling", "llama3"]),
    ("model.rope_scaling=linear", ["model.rope_scaling", "model.position=rope"]),
    ("model.sliding_window=-4", ["model.sliding_window"]),
    ("model.rope_layers=1,x", ["model.rope_layers", "0/1 flags"]),
])
def test_bad_values_name_the_key(override, words):
    with pytest.raises(LMError) as info:
        load_config(ROOT / "configs" / "tiny.yaml", [override])
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_rope_needs_even_head_dim():
    with pytest.raises(LMError, match="even head dimension"):
        load_config(None, ["model.position=rope", "model.d_model=60", "model.n_heads=4"])


def test_yaml_is_loaded_safely(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("model: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(LMError, match="not valid YAML"):
        load_config(evil)


def test_non_mapping_and_missing_files(tmp_path):
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(LMError, match="mapping"):
        load_config(bad)
    with pytest.raises(LMError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(ROOT / "configs" / "shakespeare_cpu.yaml", ["seed=7"])
    rundir.save_config(cfg, tmp_path)
    assert rundir.read_config(tmp_path) == cfg
    assert yaml.safe_load((tmp_path / rundir.CONFIG_FILE).read_text())["model"]["d_model"] == 128


def test_mixture_entries_round_trip_and_override_by_name(tmp_path):
    cfg = load_config(ROOT / "configs" / "mixture_example.yaml", ["data.mixture.grimm.weight=1", "seed=3"])
    assert [(e.name, e.weight, e.files) for e in cfg.data.mixture] == [
        ("shakespeare", 0.75, "builtin:tinyshakespeare"), ("grimm", 1.0, "builtin:grimm_tales")]
    assert cfg.data.mixture[1].doc_separator == r"\n\n\n" and cfg.data.source_names == ("shakespeare", "grimm")
    hash(cfg)  # still frozen and hashable
    rundir.save_config(cfg, tmp_path)
    assert rundir.read_config(tmp_path) == cfg
    saved = yaml.safe_load((tmp_path / rundir.CONFIG_FILE).read_text())["data"]["mixture"]
    assert [entry["weight"] for entry in saved] == [0.75, 1.0]
    as_list = load_config(None, ["data.source=mixture",
                                 "data.mixture=[{name: a, files: x.txt, weight: 2}, {name: b, tfds_name: lm1b, weight: 1}]"])
    assert as_list.data.mixture[1].tfds_name == "lm1b" and as_list.data.mixture[0].weight == 2.0
    assert config_lib.replace(as_list, **{"data.mixture.b.weight": 5}).data.mixture[1].weight == 5.0


@pytest.mark.parametrize("entries, words", [
    ("[]", ["data.source=mixture needs data.mixture"]),
    ("[{name: a, files: x, weight: -1}]", ["data.mixture[0] (a)", "weight -1.0", "positive"]),
    ("[{name: a, files: x, weight: .inf}]", ["weight inf"]),
    ("[{name: a, files: x, weight: heavy}]", ["'data.mixture[0].weight' must be a float"]),
    ("[{name: a, files: x, weight: 1}, {name: a, files: y, weight: 1}]", ["names 'a' twice"]),
    ("[{name: '', files: x, weight: 1}]", ["data.mixture[0] has no name"]),
    ("[{name: a b, files: x, weight: 1}]", ["'a b' may hold only letters"]),
    ("[{name: a, weight: 1}]", ["names no data", "files", "tfds_name"]),
    ("[{name: a, files: x, tfds_name: y, weight: 1}]", ["sets both files and tfds_name"]),
    ("[{name: a, file: x, weight: 1}]", ["unknown config key 'data.mixture[0].file'", "'data.mixture[0].files'"]),
    ("a.txt", ["'data.mixture' must be a list"]),
    ("[a.txt]", ["data.mixture[0] must be a mapping"]),
])
def test_bad_mixtures_name_the_entry(entries, words):
    with pytest.raises(LMError) as info:
        load_config(None, ["data.source=mixture", f"data.mixture={entries}"])
    assert "\n" not in str(info.value)
    for word in words:
        assert word in str(info.value)


def test_mixture_needs_its_source_and_overrides_need_a_name():
    with pytest.raises(LMError, match="data.mixture is set but data.source is 'text_file'"):
        load_config(None, ["data.mixture=[{name: a, files: x, weight: 1}]"])
    with pytest.raises(LMError, match=r"'data.mixture.c.weight' names no entry of data.mixture \(its names: a\)"):
        load_config(None, ["data.source=mixture", "data.mixture=[{name: a, files: x, weight: 1}]",
                           "data.mixture.c.weight=2"])


def test_per_layer_flags_repeat_over_the_layers(tmp_path):
    path = tmp_path / "gemma_like.yaml"
    path.write_text("model:\n  n_layers: 7\n  position: rope\n  sliding_window: 8\n  sliding_layers: 1,1,0\n"
                    "  rope_local_theta: 100.0\n  rope_layers: 0,1\n")
    m = load_config(path).model
    assert [m.layer_window(i) for i in range(7)] == [8, 8, None, 8, 8, None, 8]
    assert [m.layer_rope(i) for i in range(6)] == [None, (100.0, False), None, (100.0, False), None, (10000.0, True)]
    assert not m.uniform_layers
    m = load_config(path, ["model.sliding_layers=1", "model.rope_layers=1", "model.rope_local_theta=0"]).model
    assert m.sliding_layers == "1" and m.uniform_layers and m.layer_window(6) == 8  # an int override, as a str


def test_explicit_head_width_lifts_the_divisibility_rule():
    m = load_config(None, ["model.d_model=60", "model.n_heads=8", "model.d_head=16", "model.position=rope"]).model
    assert m.head_dim == 16
    assert load_config(None, ["model.d_model=64", "model.n_heads=8"]).model.head_dim == 8
