"""Training-curve plots (PNG bytes), written into a run directory."""

from __future__ import annotations

import io


def plot_training_curves(history: list[dict]) -> bytes:
    """Loss and dev H@1 / MRR per epoch as a two-panel PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_dev) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax_loss.plot(epochs, [h.get("train_loss") for h in history], marker="o", label="train loss (J)")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    for key, label in (("dev_H@1", "dev H@1"), ("dev_MRR", "dev MRR")):
        points = [(h["epoch"], h[key]) for h in history if key in h and h[key] == h[key]]
        if points:
            ax_dev.plot(*zip(*points), marker="o", label=label)
    ax_dev.set_xlabel("epoch")
    ax_dev.set_ylim(0, 1)
    ax_dev.legend()
    ax_dev.grid(alpha=0.3)
    fig.suptitle("otmel training")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
