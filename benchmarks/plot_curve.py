"""Plot a pretraining run's MLM loss/accuracy curve from its metrics.jsonl.

    python benchmarks/plot_curve.py runs/mini-cpu/metrics.jsonl docs/mini-cpu-curve.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(metrics: str, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics).read_text().splitlines() if line.strip()]
    ev = [r for r in rows if "eval_loss" in r]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot([r["tokens"] / 1e6 for r in rows], [r["loss"] for r in rows], label="train", lw=1)
    a.plot([r["tokens"] / 1e6 for r in ev], [r["eval_loss"] for r in ev], "o-", label="held-out", ms=3)
    a.set_xlabel("tokens (M)")
    a.set_ylabel("MLM loss")
    a.legend()
    b.plot([r["tokens"] / 1e6 for r in rows], [r["mlm_acc"] for r in rows], label="train", lw=1)
    b.plot([r["tokens"] / 1e6 for r in ev], [r["eval_mlm_acc"] for r in ev], "o-", label="held-out", ms=3)
    b.set_xlabel("tokens (M)")
    b.set_ylabel("MLM accuracy")
    b.legend()
    fig.suptitle(Path(metrics).parent.name)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
