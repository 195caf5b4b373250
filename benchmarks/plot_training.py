"""The learning curve of a `clipsearch train` run: a table of its per-epoch figures and, optionally, a PNG.

Run it on a run folder (or its metrics.jsonl):

    python -m benchmarks.plot_training runs/shapes-mini [--plot curve.png] [--json]

It reads the `"kind": "train"` lines (loss every --log-every steps) and the `"kind": "eval"` lines (held-out
recall@1/5/10 after each epoch) that training writes, prints one row per epoch and, with --json, one JSON line
with the last epoch's figures.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

COLUMNS = ("epoch", "step", "train_loss", "t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1", "i2t_r5", "i2t_r10", "train_seconds")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl (given the file or its folder)."""
    if path.is_dir():
        path = path / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot(records: list[dict[str, Any]], out: Path) -> None:
    """Loss per logged step and held-out recall per epoch, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    left.set(xlabel="step", ylabel="contrastive loss", title="training loss")
    for key in ("t2i_r1", "t2i_r10", "i2t_r1"):
        if evals and key in evals[0]:
            right.plot([r["step"] for r in evals], [r[key] for r in evals], marker="o", label=key)
    right.set(xlabel="step", ylabel="recall", ylim=(0, 1), title="held-out recall")
    right.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def main(argv: list[str] | None = None) -> int:
    """Print the per-epoch table (and plot it)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.plot_training", description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a training run folder or its metrics.jsonl")
    parser.add_argument("--plot", type=Path, help="write the curves to this PNG")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the last epoch's figures")
    args = parser.parse_args(argv)
    try:
        records = read_metrics(args.run)
    except (OSError, ValueError) as e:
        parser.error(f"cannot read the metrics of {args.run}: {e}")
    evals = [r for r in records if r["kind"] == "eval"]
    print("  ".join(f"{c:>13}" for c in COLUMNS))
    for record in evals:
        cells = [record.get(c, float("nan")) for c in COLUMNS]
        print("  ".join(f"{v:>13.4f}" if isinstance(v, float) else f"{v:>13}" for v in cells))
    if args.plot:
        plot(records, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    if args.json and evals:
        print(json.dumps({"benchmark": "plot_training", **{c: evals[-1].get(c) for c in COLUMNS}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
