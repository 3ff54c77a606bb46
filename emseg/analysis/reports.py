"""Pictures of a training run: loss/metric curves and validation predictions over their images."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from emseg.io.write import PALETTE, atomic_output


def _figure(*args, **kwargs):
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    return plt, plt.subplots(*args, **kwargs)


def save_png(plt, fig, path: Path, dpi: int = 110) -> Path:
    """Write a matplotlib figure as a PNG atomically (temporary file, then rename) and close it."""
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)
    return path


def plot_curves(history: Sequence[dict], path: Path) -> Path:
    """Training loss and validation IoU per class against the step, as a PNG."""
    plt, (fig, (ax_loss, ax_iou)) = _figure(1, 2, figsize=(10, 3.8))
    steps = [h["step"] for h in history]
    ax_loss.plot(steps, [h["loss"] for h in history], "o-", color="#444444", ms=3)
    ax_loss.set(xlabel="step", ylabel="training loss (CE + Dice)", title="Loss")
    ax_loss.grid(alpha=0.3)
    val = [h for h in history if h.get("val")]
    if val:
        vsteps = [h["step"] for h in val]
        for i, name in enumerate(val[0]["val"]["iou"]):
            values = [h["val"]["iou"][name] for h in val]
            ax_iou.plot(vsteps, [np.nan if v is None else v for v in values], "o-", ms=3,
                        color=PALETTE[(i - 1) % len(PALETTE)] if i else "#999999", label=f"IoU {name}")
        ax_iou.plot(vsteps, [h["val"]["mean_iou"] or np.nan for h in val], "k--", lw=1.5, label="mean IoU (no bg)")
    for h in history:
        if h.get("images_moved_by"):  # where the training images were moved onto their annotation
            dy, dx = h["images_moved_by"]
            ax_loss.axvline(h["step"], color="#1f77b4", ls=":", lw=1.2)
            ax_iou.axvline(h["step"], color="#1f77b4", ls=":", lw=1.2,
                           label=f"step {h['step']}: images moved {dy:+.2f}, {dx:+.2f} px")
    if ax_iou.get_legend_handles_labels()[0]:
        ax_iou.legend(fontsize=8, loc="lower right")
    ax_iou.set(xlabel="step", ylabel="validation IoU", ylim=(0, 1), title="Validation")
    ax_iou.grid(alpha=0.3)
    fig.tight_layout()
    return save_png(plt, fig, path)


def _overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    rgb = np.repeat(np.clip(image, 0, 1)[..., None], 3, axis=2)
    for c in range(1, int(labels.max(initial=0)) + 1):
        colour = PALETTE[(c - 1) % len(PALETTE)]
        sel = labels == c
        rgb[sel] = (1 - alpha) * rgb[sel] + alpha * colour
    return rgb


def plot_validation(model, items: Sequence, path: Path, max_items: int = 4, max_side: int = 384) -> Path:
    """For up to ``max_items`` validation regions: image, target and prediction overlays, as a PNG."""
    from emseg.analysis.metrics import IGNORE
    items = list(items)[:max_items]
    plt, (fig, axes) = _figure(len(items), 3, figsize=(9, 3 * len(items)), squeeze=False)
    norm = model.card.normalization
    predictor = model.predictor(tile=256, overlap=128, device="cpu")
    for row, item in zip(axes, items):
        image = item.image[:max_side, :max_side]
        target = item.target[:max_side, :max_side]
        pred = _predict_normalised(predictor, (image - norm.mean) / norm.std).argmax(0)
        unannotated = bool((target == IGNORE).any())
        row[0].imshow(image, cmap="gray", vmin=0, vmax=1)
        row[1].imshow(_overlay(image, np.where(target == IGNORE, 0, target)))
        if unannotated:  # show annotated background too, hatched in grey
            row[1].contour(target != IGNORE, levels=[0.5], colors="white", linewidths=0.5)
        row[2].imshow(_overlay(image, pred))
        row[0].set_title(item.name, fontsize=8)
        row[1].set_title("annotation" + (" (white line: annotated area)" if unannotated else ""), fontsize=8)
        row[2].set_title("prediction", fontsize=8)
        for ax in row:
            ax.axis("off")
    from matplotlib.patches import Patch
    handles = [Patch(color=PALETTE[(i - 1) % len(PALETTE)], label=name) for i, name in enumerate(model.classes) if i]
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    return save_png(plt, fig, path, dpi=100)


def _predict_normalised(predictor, normalised: np.ndarray) -> np.ndarray:
    """Run the predictor's tiling on an already normalised page (at the model's pixel size)."""
    from emseg.infer.alignment import shift_probabilities
    from emseg.infer.tiling import sliding_window
    probs = sliding_window(normalised[None].astype(np.float32), predictor.forward, tile=predictor.tile,
                           overlap=predictor.overlap, batch_size=predictor.batch_size, device=predictor.device)
    return shift_probabilities(probs, predictor.label_offset)
