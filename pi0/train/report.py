"""What a training run shows while it runs and leaves behind: the progress bar and the loss plot."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np


class TrainProgress:
    """A tqdm bar with the loss and throughput (a plain line per log step without tqdm or a terminal)."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.bar = None
        self.enabled = enabled
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, initial=start, desc="pi0 train", unit="step", file=sys.stderr,
                                dynamic_ncols=True, mininterval=1.0)
            except ImportError:
                pass

    def update(self, rec: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}",
                                 samples_s=f"{rec['samples_per_s']:.1f}", refresh=False)
            self.bar.update(1)
        elif self.enabled and rec["step"] % 50 == 0:
            print(f"step {rec['step']}: loss {rec['loss']:.4f}, {rec['samples_per_s']:.1f} samples/s", file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def plot_loss(history: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.array([r["step"] for r in history])
    loss = np.array([r["loss"] for r in history])
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, loss, lw=0.6, alpha=0.4, label="loss")
    if len(loss) >= 20:
        k = max(5, len(loss) // 50)
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1:], smooth, lw=1.5, label=f"mean of {k}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("flow-matching loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
