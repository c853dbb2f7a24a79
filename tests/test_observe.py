"""A tiny training run leaves TensorBoard events, progress lines, a profile trace and a plot;
the benchmark prints every field with an MFU in (0, 1]."""

from __future__ import annotations

import gzip
import io
import json
import struct

import pytest

from lm.cli import main as cli_main

from lm.tools import bench
from lm.tools.info import processor
from lm.observe.log import Progress
from lm.tools.plot import plot_runs
from lm.training.loop import train
from tests.conftest import ROOT


def read_events(path):
    """Events of a TensorBoard file (TFRecord framing: length, crc, payload, crc)."""
    from tensorboardX.proto import event_pb2

    data, events, offset = path.read_bytes(), [], 0
    while offset < len(data):
        (length,) = struct.unpack("<Q", data[offset:offset + 8])
        events.append(event_pb2.Event.FromString(data[offset + 12:offset + 12 + length]))
        offset += 12 + length + 4
    return events


@pytest.mark.slow
def test_tiny_run_writes_tensorboard_progress_profile_and_plot(tiny_config, capsys, tmp_path):
    cfg = tiny_config("train.steps=12", "log.every=2", "eval.every=6", "checkpoint.every=12",
                      "log.sample_tokens=8", "profile.start_step=3", "profile.steps=2")
    records = train(cfg)
    run_dir = tmp_path / "run"

    out = capsys.readouterr().out  # not a terminal: plain lines, no bar
    assert "\r" not in out and "step     12/12" in out and "eta" in out and "mfu" in out
    mfus = [r["mfu"] for r in records if "mfu" in r]
    assert len(mfus) == 7 and all(0 < m <= 1 for m in mfus)

    (event_file,) = run_dir.glob("events.out.tfevents.*")
    scalars, texts = {}, []
    for event in read_events(event_file):
        for value in event.summary.value:
            if value.HasField("simple_value"):
                scalars.setdefault(value.tag, []).append(event.step)
            elif value.metadata.plugin_data.plugin_name == "text":
                texts.append((event.step, value.tensor.string_val[0].decode()))
    assert scalars["loss"] == [1, 2, 4, 6, 8, 10, 12] and scalars["val_loss"] == [6, 12]
    assert {"lr", "grad_norm", "tokens_per_sec", "mfu"} <= set(scalars)
    assert [step for step, _ in texts] == [6, 12] and all(len(text.strip()) > 8 for _, text in texts)

    (trace,) = (run_dir / "profile").glob("plugins/profile/*/perfetto_trace.json.gz")
    assert json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]
    assert list((run_dir / "profile").glob("plugins/profile/*/*.xplane.pb"))

    import matplotlib.image

    png = plot_runs([run_dir, run_dir], tmp_path / "plots" / "curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, _ = matplotlib.image.imread(png).shape
    assert height > 100 and width > 100


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_on_a_terminal_shows_eta_and_keeps_lines():
    stream = FakeTerminal()
    progress = Progress(start=0, total=10, stream=stream)
    progress.update(5, "loss 1.0")
    progress.line("step 5/10 | loss 1.0")
    progress.update(10)
    progress.close()
    text = stream.getvalue()
    assert "\r" in text and "5/10 [############............]" in text and "<" in text
    assert "step 5/10 | loss 1.0\n" in text and text.endswith("\n")
    plain = io.StringIO()
    Progress(0, 10, stream=plain).update(5)
    assert plain.getvalue() == ""


def test_bench_json_prints_every_field_and_an_honest_mfu(shakespeare, capsys):
    cli_main(["bench", "--config", str(ROOT / "configs" / "tiny.yaml"), "--json", "--steps", "3", "--warmup", "1",
                f"data.text_file={shakespeare}"])
    result = json.loads(capsys.readouterr().out)
    for key in ("tokens_per_sec", "tokens_per_sec_per_device", "step_sec_median", "step_sec_p10", "step_sec_p90",
                "compile_sec", "flops_per_token", "mfu", "peak_memory_bytes", "pipeline_tokens_per_sec"):
        assert result[key] > 0, key
    assert 0 < result["mfu"] <= 1
    assert result["step_sec_p10"] <= result["step_sec_median"] <= result["step_sec_p90"]
    assert result["flops_per_token"] == 713_856 and result["steps"] == 3  # the hand count of test_metrics
    assert result["passes"] == 1  # tiny's 8 x 32 tokens fit one CPU pass
    assert result["memory_source"].startswith("process peak RSS") and result["data"] == str(shakespeare)
    assert result["cpu_options"] == {"devices": 1, "pass_tokens": 1024, "matmuls": "eigen", "min_max": "fast",
                                     "attention_query_block": 0,  # 32 positions: not blocked by 64
                                     "gradient_sum": "compiler's"}  # this process sees one CPU device
    assert "CPU options     1 device(s), passes of <= 1024 tokens, eigen matmuls, fast max/min" in bench.format_table(result)
    assert result["processor"] == processor() and f"processor       {processor()}\n" in bench.format_table(result)
    assert (result["dtype"], result["attention"]) == ("float32", "xla")  # tiny's auto, resolved on the CPU
    assert "attention       xla\n" in bench.format_table({**result, "attention_dropout": 0.0})
    assert "attention       xla with dropout 0.2 on its probabilities\n" in bench.format_table(
        {**result, "attention_dropout": 0.2})
