"""Ahead-of-time compiles on a CPU-only machine: TPU slices (the `tpu` extra: libtpu) and GPU hosts (`gpu-aot`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lm.cli import main as cli_main
from lm.config import load_config

# Before any jax backend starts: no TPU is used, so let libtpu load beside other processes.
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from lm.tools import accelerators, aot  # noqa: E402
from lm.errors import LMError  # noqa: E402

# The tests run with JAX's persistent cache on (tests/conftest.py): deviceless compiles must bypass it
# (lm.tools.accelerators.deviceless_compile), or compiling a program twice reads back what cannot be loaded.
pytestmark = pytest.mark.filterwarnings("error:Error reading persistent compilation cache entry")

TOPOLOGY = "v5e:2x2"  # 4 chips of 16 GiB
# The tiny model, widened so TPU tile padding (8 x 128) does not dominate its few kilobytes.
TILE_FRIENDLY = ("model.d_model=256", "model.n_heads=2", "model.vocab_size=512")


@pytest.fixture(scope="module")
def reports(tmp_path_factory, request):
    """Compiles each tiny-config variant once per module."""
    from tests.conftest import ROOT, SHAKESPEARE

    text = SHAKESPEARE
    cache = {}

    def report(*overrides: str) -> dict:
        if overrides not in cache:
            cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"data.text_file={text}", *TILE_FRIENDLY, *overrides])
            cache[overrides] = aot.analyse(cfg, TOPOLOGY)
        return cache[overrides]

    return report


def test_tiny_compiles_for_data_and_fsdp_meshes(reports):
    data = reports()
    fsdp = reports("parallel.data=1", "parallel.fsdp=-1")
    assert data["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1} and data["device_kind"].startswith("TPU v5")
    assert fsdp["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    for r in (data, fsdp):
        assert r["fits"] and 0 < r["hbm_needed_bytes"] < r["hbm_capacity_bytes"] == 16 * accelerators.GIB
        assert r["estimated_step_s"] > 0 and 0 < r["estimated_mfu"] < 1
    # FSDP keeps a quarter of the parameters and Adam moments on each chip; data parallelism all of them.
    state_bytes = 3 * 4 * data["params"]
    assert data["hbm_argument_bytes"] >= state_bytes > 2 * fsdp["hbm_argument_bytes"]
    # cost_analysis reports one chip's share: times 4 chips it is the model's FLOPs (plus softmax, norms, AdamW).
    for r in (data, fsdp):
        assert 1.0 < r["compiler_flops_per_step"] / r["model_flops_per_step"] < 1.5


def test_memory_grows_with_batch(reports):
    small, large = reports(), reports("train.batch_size=128")
    # 32 rows per chip: float32 logits alone are 32 x 32 x 512 x 4 bytes = 2 MiB. (Temporaries alone
    # need not grow at such sizes: the compiler re-plans its buffers and can use less.)
    logits_bytes = 32 * 32 * 512 * 4
    assert large["hbm_needed_bytes"] > small["hbm_needed_bytes"] + logits_bytes
    assert large["hbm_argument_bytes"] > small["hbm_argument_bytes"]  # the batch itself is an argument
    assert large["model_flops_per_step"] == 16 * small["model_flops_per_step"]


@pytest.mark.slow
def test_scanned_accumulated_step_is_costed_like_the_unrolled_one(reports):
    """XLA counts a loop body once; the extrapolated cost must match a loop-free compile."""
    unrolled = reports("model.n_layers=3", "train.batch_size=16")
    looped = reports("model.n_layers=3", "train.batch_size=16", "model.scan_layers=true", "train.grad_accum_steps=2")
    assert unrolled["cost_source"] == "the compiled step" and looped["cost_source"] != unrolled["cost_source"]
    assert looped["compiler_flops_per_step"] == pytest.approx(unrolled["compiler_flops_per_step"], rel=0.05)


OVERSIZED = ("model.vocab_size=65536", "train.batch_size=4096", "train.seq_len=64", "train.loss_chunk_tokens=0",
             "model.dtype=float32")


def test_oversized_config_does_not_fit(shakespeare, capsys):
    # Float32 logits alone: 4096 x 64 x 65536 x 4 bytes = 64 GiB, 16 GiB per chip, plus their gradients.
    with pytest.raises(SystemExit) as exit_info:  # the report, then exit code 1
        cli_main(["aot", "--config", "configs/tiny.yaml", "--topology", TOPOLOGY, "--json",
                  f"data.text_file={shakespeare}", *OVERSIZED])
    assert exit_info.value.code == 1
    r = json.loads(capsys.readouterr().out)
    assert not r["fits"] and r["hbm_needed_bytes"] > r["hbm_capacity_bytes"]
    advice = " ".join(r["suggestions"])
    assert "train.grad_accum_steps" in advice and "model.remat=block" in advice and "parallel.fsdp=-1" in advice
    assert "DOES NOT FIT" in aot.format_report(r)


SPLASH = ("train.seq_len=1024", "model.max_seq_len=1024")  # whole 128-wide tiles: auto picks splash on TPU


def test_splash_step_compiles_and_its_kernels_are_costed(reports):
    ours, xla = reports("model.attention=auto", *SPLASH), reports()
    assert (ours["attention"], xla["attention"]) == ("splash", "xla") and ours["fits"]
    # No [B, N, T, T] scores in HBM: all temporaries take less than one layer's float32 scores would
    # (2 rows x 2 heads x 1024 x 1024 x 4 bytes per chip).
    assert ours["hbm_temp_bytes"] < 2 * 2 * 1024 * 1024 * 4
    # The compiler cannot see into the kernel: its FLOPs are added from the compiled calls' shapes,
    # per layer a forward (2 matmuls), dq (3) and dkv (4) over the 512 x 512 tiles on and below the
    # diagonal (3 of 4) of each head and row.
    assert xla["kernel_flops_per_step"] == 0
    assert ours["kernel_flops_per_step"] == 2 * (2 + 3 + 4) * 2 * 8 * 2 * 128 * (3 * 512 * 512)
    assert "splash attention kernels counted analytically" in ours["step_time_source"]
    for r in (ours, xla):
        total = r["compiler_flops_per_step"] + r["kernel_flops_per_step"]
        assert 1.0 < total / r["model_flops_per_step"] < 1.6
        # Never faster than the roofline: MFU stays within what the model's FLOPs allow.
        assert r["estimated_step_s"] >= r["roofline_step_s"] > 0
        assert r["estimated_mfu"] <= r["model_flops_per_step"] / (r["roofline_step_s"] * 4 * r["peak_bf16_flops_per_chip"])


def test_a_tiled_loss_whole_logits_cannot_cost_is_costed_tiled(monkeypatch, shakespeare):
    """When even one layer with whole logits would not fit (here: the compiler made to refuse it),
    the cost is taken with the tiling kept; XLA counts its loop body, one slice, once, so that
    slice's cost is scaled to all of them from a compile with half-size slices."""
    import jax

    compile_step = accelerators.compile_step

    def refuse_whole_logits(cfg, devices, device_memory=None):
        if cfg.train.loss_chunk_tokens == 0:
            raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Used 99.00G of 15.75G hbm.")
        return compile_step(cfg, devices, device_memory)

    monkeypatch.setattr(accelerators, "compile_step", refuse_whole_logits)
    cfg = load_config("configs/tiny.yaml", [f"data.text_file={shakespeare}", *TILE_FRIENDLY, "model.vocab_size=4096",
                                            "train.batch_size=16", "train.seq_len=64", "train.loss_chunk_tokens=64"])
    r = aot.analyse(cfg, TOPOLOGY)
    assert (r["loss_chunks"], r["loss_chunk_tokens"]) == (4, 64) and "one slice's cost scaled to all" in r["cost_source"]
    # The output layer is most of this model's FLOPs: counted once per step, not a quarter of it.
    assert 1.0 < r["compiler_flops_per_step"] / r["model_flops_per_step"] < 1.5


def test_bad_topology_and_missing_libtpu_are_one_line_errors(monkeypatch):
    with pytest.raises(LMError, match="TPU:SHAPE"):
        accelerators.topology_devices("v9:2x2")
    with pytest.raises(LMError, match="libtpu rejected"):
        accelerators.topology_devices("v5e:3x3")
    monkeypatch.setattr(accelerators.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(LMError, match=r"pip install -e '\.\[tpu\]'"):
        accelerators.topology_devices("v5e:2x2")


def test_fit_searches_cheapest_first_and_stops_early(monkeypatch, capsys):
    """The search, with the compiler replaced by a memory model: accumulation and remat shrink
    activations, fsdp the state; the TPU compiler refuses what is far over."""
    import jax

    extra = {"GiB": 0.0}

    def hbm(c) -> float:  # GiB per chip
        p = c.parallel
        fsdp = 1 if p.data == -1 else 4 // p.data
        rows = c.train.batch_size // c.train.grad_accum_steps // 4
        per_row = {"none": 1.0, "save_qkv_attn": 0.5, "save_qkv": 0.4, "block": 0.2}[c.model.remat]
        return 12 / fsdp + rows * per_row + extra["GiB"]

    def compile_step(c, devices, device_memory=None):
        if hbm(c) > 30:
            raise jax.errors.JaxRuntimeError(f"RESOURCE_EXHAUSTED: Used {hbm(c):.2f}G of 15.75G hbm.")
        return None, c

    gib = accelerators.GIB
    monkeypatch.setattr(accelerators, "compile_step", compile_step)
    monkeypatch.setattr(aot, "memory_report", lambda c, chip: {"fits": hbm(c) <= 16, "hbm_needed_bytes": hbm(c) * gib})
    monkeypatch.setattr(aot, "compiled_report", lambda c, topology, chip, devices, rt, compiled: {
        "fits": True, "topology": topology, "hbm_needed_bytes": hbm(c) * gib, "hbm_capacity_bytes": chip.capacity,
        "estimated_step_s": c.train.grad_accum_steps + (1 if c.parallel.data == -1 else 4 // c.parallel.data) / 10,
        "estimated_mfu": 0.5})
    args = ["aot", "--config", "configs/tiny.yaml", "--topology", TOPOLOGY, "--fit", "train.batch_size=64"]
    cli_main(args + ["--json"])
    r = json.loads(capsys.readouterr().out)
    # remat none: data x4 fits at accum 4 (12 + 4 rows); fsdp 2 (6 GiB of state) at accum 2, the
    # better estimate; fsdp 4 is only tried with fewer accumulation steps (1), and misses.
    assert r["overrides"] == ["train.grad_accum_steps=2", "model.remat=none", "parallel.data=2", "parallel.fsdp=-1"]
    assert [c["overrides"][0] for c in r["candidates"]] == [f"train.grad_accum_steps={a}" for a in (1, 2, 4, 1, 2, 1)]
    assert {c["overrides"][1] for c in r["candidates"]} == {"model.remat=none"}  # stopped after the first tier
    cli_main(args)
    assert capsys.readouterr().out.splitlines()[-1] == " ".join(r["overrides"])
    extra["GiB"] = 20.0
    with pytest.raises(SystemExit) as exit_info:  # nothing fits: one line naming the closest
        cli_main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert ("the closest, train.grad_accum_steps=16 model.remat=block parallel.data=1 parallel.fsdp=-1, "
            "needs 23.20 GiB of 16.00 GiB per device") in err
    with pytest.raises(SystemExit) as exit_info:  # --json: the whole search, then exit code 1
        cli_main(args + ["--json"])
    assert exit_info.value.code == 1
    r = json.loads(capsys.readouterr().out)
    assert not r["fits"] and r["overrides"] == [] and r["closest"]["hbm_needed_bytes"] == pytest.approx(23.2 * gib)
    refused = [c for c in r["candidates"] if c["hbm_needed_bytes"] > 30 * gib]
    assert refused and not any(c["fits"] for c in r["candidates"])  # refusals counted at the compiler's figure


def test_fit_says_why_a_config_is_refused_as_analyse_does(shakespeare):
    """A config no layout can change (a TPU kernel on a GPU) is refused by --fit in the same words."""
    from lm.tools.fit import fit

    cfg = load_config("configs/tiny.yaml", [f"data.text_file={shakespeare}", "model.attention=splash",
                                           "train.seq_len=128", "model.max_seq_len=128"])
    with pytest.raises(LMError) as without_fit:
        aot.analyse(cfg, "h100:1")
    with pytest.raises(LMError) as with_fit:
        fit(cfg, "h100:1")
    assert "splash" in str(without_fit.value) and str(with_fit.value) == str(without_fit.value)


def test_fit_finds_a_layout_that_fits(reports, shakespeare):
    from lm.tools.fit import fit

    cfg = load_config("configs/tiny.yaml", [f"data.text_file={shakespeare}", *TILE_FRIENDLY])
    r = fit(cfg, TOPOLOGY)  # the first candidate fits: no remat, data parallel, no accumulation
    assert r["fits"] and len(r["candidates"]) == 1
    assert r["overrides"] == ["train.grad_accum_steps=1", "model.remat=none", "parallel.data=-1", "parallel.fsdp=1"]
    assert r["hbm_needed_bytes"] == reports()["hbm_needed_bytes"]


# A small Llama-shaped bf16 model: cuDNN attention (head width 64), SwiGLU, RMSNorm, RoPE, GQA, 6 scanned
# layers (a scan keeps exactly the residuals it is handed: no fusion trims them).
SMALL_LLAMA = ("model.n_layers=6", "model.scan_layers=true", "model.dtype=bfloat16", "model.d_model=256", "model.n_heads=4", "model.n_kv_heads=2", "model.d_ff=512",
               "model.mlp=swiglu", "model.norm=rmsnorm", "model.position=rope", "model.vocab_size=512",
               "model.use_bias=false", "model.tie_embeddings=false", "model.attention=auto", "train.batch_size=8",
               "train.seq_len=256", "model.max_seq_len=256")


def test_gpu_topologies_are_parsed_and_bad_ones_refused(monkeypatch):
    chip, devices = accelerators.topology_devices("h100:8")
    assert [d.device_kind for d in devices] == ["NVIDIA H100 80GB HBM3"] * 8 and devices[0].platform == "gpu"
    assert len({d.process_index for d in devices}) == 1 and chip.peak_bf16_flops == 989e12
    assert chip.hbm_bytes == 84978434048 and chip.capacity == int(0.75 * 84978434048)  # JAX's default pool
    chip, devices = accelerators.topology_devices("a100-40g:2x4")  # two hosts of four
    assert len(devices) == 8 and len({d.process_index for d in devices}) == 2
    assert devices[0].device_kind == "NVIDIA A100-SXM4-40GB" and chip.hbm_bandwidth == 1555.2e9
    for name in accelerators.GPUS:
        chip, devices = accelerators.topology_devices(f"{name}:1")
        assert chip.platform == "gpu" and chip.hbm_bytes > 40e9 and len(devices) == 1
    monkeypatch.setenv("XLA_CLIENT_MEM_FRACTION", "0.9")
    assert accelerators.gpu_chip("h200").capacity == int(0.9 * 150754820096)
    for bad in ("h100:0", "h100:2x0", "h100", "h100:x8", "rtx4090:1", "v5e:8"):
        with pytest.raises(LMError, match=r"GPU:N or GPU:HOSTSxN with GPU one of a100, a100-40g, h100, h200"):
            accelerators.topology_devices(bad)


def test_missing_gpu_extra_is_one_sentence_with_the_pip_command(monkeypatch):
    real = accelerators.importlib.util.find_spec
    monkeypatch.setattr(accelerators.importlib.util, "find_spec",
                        lambda name: None if name.startswith("jax_plugins") else real(name))
    with pytest.raises(LMError, match=r"run `pip install -e '\.\[gpu-aot\]'`") as error:
        accelerators.topology_devices("h100:8")
    assert "\n" not in str(error.value)


@pytest.mark.slow
def test_gpu_step_without_remat_keeps_close_to_its_counted_floor(shakespeare):
    """A deviceless H100 compile: the compiler's temporaries hold at least the counted activation
    floor and at most 1.3x it plus the float32 gradients (2.4x before the step kept only the floor:
    float32 copies of norm inputs, the SwiGLU's intermediates, the attention output twice)."""
    cfg = load_config("configs/tiny.yaml", [f"data.text_file={shakespeare}", *SMALL_LLAMA, "model.remat=none"])
    r = aot.analyse(cfg, "h100:1")
    assert (r["platform"], r["attention"], r["loss_chunks"], r["fits"]) == ("gpu", "cudnn", 1, True)
    floor = r["floor_parts_bytes"]
    assert floor["layers"] == 6 * 8 * 256 * ((2 * 256 + 256 + 2 * 128 + 256 + 3 * 512) * 2 + 4 * 4)
    assert floor["layers"] <= r["hbm_temp_bytes"] <= 1.3 * (r["floor_bytes"] + 4 * r["params"])
    # The GPU compiler gives no cost analysis: the model's FLOPs and counted bytes, a roofline.
    assert "model FLOPs and counted bytes" in r["cost_source"] and r["compiler_flops_per_step"] == r["model_flops_per_step"]
    assert 0 < r["estimated_mfu"] <= 1 and r["estimated_step_s"] == r["roofline_step_s"]
    text = aot.format_report(r)
    assert "memory per GPU" in text and "75% of 79.14 GiB" in text and " MiB" in text and "0.00 GiB" not in text


def test_sizes_and_durations_pick_their_unit():
    assert [aot.size(n) for n in (41.14 * 2**30, 2.39 * 2**20, 1536, 512)] == ["41.14 GiB", "2.39 MiB", "1.50 KiB",
                                                                                "512 B"]
    assert [aot.duration(s) for s in (3.0441, 0.0125, 0.004, 51.2e-6, 1.6e-6)] == ["3044 ms", "12.5 ms", "4.00 ms",
                                                                                   "51.2 µs", "1.60 µs"]


@pytest.mark.slow
def test_lm_aot_prints_only_its_report():
    """No libtpu host lookup, CUDA plugin or XLA log lines on stderr, where lm itself chooses the CPU
    (JAX_PLATFORMS unset, as for users); a tiny step's sizes and times in units that show them."""
    from tests.conftest import ROOT

    set_here = ("JAX_PLATFORMS", "TPU_WORKER_HOSTNAMES", "ALLOW_MULTIPLE_LIBTPU_LOAD", "TPU_ACCELERATOR_TYPE",
                "JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "TF_CPP_MIN_LOG_LEVEL")
    env = {k: v for k, v in os.environ.items() if k not in set_here}
    for topology in (TOPOLOGY, "h100:1"):
        result = subprocess.run([sys.executable, "-m", "lm.aot", "--config", "configs/tiny.yaml", "--topology", topology],
                                cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
        assert result.returncode == 0 and result.stderr == "", result.stderr
        assert " MiB of " in result.stdout and "0.00 GiB" not in result.stdout and " 0 ms" not in result.stdout
