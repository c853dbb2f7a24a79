"""Loss curves (and tokens/s) of one or several runs, from their metrics.jsonl.

    lm plot RUN_DIR [RUN_DIR ...] -o curves.png
"""

from __future__ import annotations

import json
import pathlib

from lm import storage
from lm.errors import LMError
from lm.rundir import METRICS_FILE


def read_metrics(run_dir: str | pathlib.Path) -> list[dict]:
    """The records of run_dir/metrics.jsonl (the last record of a step wins, as after a resume)."""
    path = storage.path(run_dir, "run_dir") / METRICS_FILE
    if not path.is_file():
        raise LMError(f"'{path}' does not exist; pass a run_dir that train.py has logged to.")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise LMError(f"line {number} of '{path}' is not JSON; remove it or the file.") from None
    return records


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = {r["step"]: r[key] for r in records if r.get(key) is not None}
    steps = sorted(points)
    return steps, [points[s] for s in steps]


def run_labels(run_dirs: list[str]) -> list[str]:
    """Each run's shortest path suffix that no other run's has ("a/r" and "b/r" for runs/a/r and
    runs/b/r; "r" for a run alone in ending so); the path as given when even the whole is shared."""
    parts = [str(d).rstrip("/").split("/") for d in run_dirs]
    labels = []
    for i, p in enumerate(parts):
        others = {"/".join(q[-n:]) for j, q in enumerate(parts) if j != i for n in range(1, len(q) + 1)}
        suffixes = ("/".join(p[-n:]) for n in range(1, len(p) + 1))
        labels.append(next((s for s in suffixes if s and s not in others), str(run_dirs[i])))
    return labels


def plot_runs(run_dirs: list[str], output: str | pathlib.Path) -> pathlib.Path:
    """Draws train (solid) and validation (dashed) loss, and tokens/s, of each run into `output`."""
    if storage.is_remote(output):
        raise LMError(f"lm plot draws into a local file, not '{output}'; pass a local path with -o.")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(label, read_metrics(d)) for label, d in zip(run_labels(run_dirs), run_dirs)]
    fig, (loss_ax, speed_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for index, (name, records) in enumerate(runs):
        color = f"C{index % 10}"
        loss_ax.plot(*_series(records, "loss"), color=color, label=f"{name} train")
        steps, values = _series(records, "val_loss")
        if steps:
            loss_ax.plot(steps, values, "o--", color=color, label=f"{name} val")
        speed_ax.plot(*_series(records, "tokens_per_sec"), color=color, label=name)
    loss_ax.set(xlabel="step", ylabel="loss (nats/token)", title="loss")
    speed_ax.set(xlabel="step", ylabel="tokens/s", title="throughput")
    for ax in (loss_ax, speed_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    output = pathlib.Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return output
