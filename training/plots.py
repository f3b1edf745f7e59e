"""Pictures of training: loss curves per stage (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

PRETRAIN_TERMS = ("loss", "recon", "kl", "similarity", "activation")


def plot_history(history: Sequence[dict], path: Path) -> Path:
    """One panel per pre-training term and one for the fine-tuning BCE, against the step."""
    pre = [r for r in history if r.get("stage") == "pretrain"]
    fine = [r for r in history if r.get("stage") == "finetune"]
    panels = [(f"pre-train: {k}", pre, k) for k in PRETRAIN_TERMS if pre and k in pre[0]]
    if fine:
        panels.append(("fine-tune: BCE", fine, "bce"))
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(3.2 * max(1, len(panels)), 2.8))
    axes = axes if hasattr(axes, "__len__") else [axes]
    for ax, (title, rows, key) in zip(axes, panels, strict=False):
        ax.plot([r["step"] for r in rows], [r[key] for r in rows], lw=1)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        if key in ("loss", "recon", "kl", "activation") and min(r[key] for r in rows) > 0:
            ax.set_yscale("log")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
