"""Render the README's pictures from the bundled sample (run from the repository root).

    python docs/make_figures.py

Writes docs/img/sparse_labels.png (the scribble convention) and, when the bundled default model
exists, docs/img/demo_overlay.png (what `make demo` shows).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import tifffile  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
IMG = ROOT / "docs" / "img"


def scribbles(mask: np.ndarray) -> np.ndarray:
    """A few strokes per class, as a person would paint them: 0 = not annotated, class + 1."""
    sparse = np.zeros_like(mask)
    yy, xx = np.mgrid[:mask.shape[0], :mask.shape[1]]
    for k, (y0, x0, angle) in enumerate([(60, 40, 0.3), (150, 120, -0.6), (210, 30, 0.1), (90, 170, 1.2)]):
        d = np.abs((yy - y0) * np.cos(angle) - (xx - x0) * np.sin(angle))
        along = (yy - y0) * np.sin(angle) + (xx - x0) * np.cos(angle)
        stroke = (d < 2.5) & (np.abs(along) < 45)
        sparse[stroke] = mask[stroke] + 1
    from scipy.ndimage import binary_erosion
    inner = binary_erosion(mask == 2, iterations=5)
    sparse[inner & ((yy + xx) % 14 < 3)] = 3  # a couple of diagonal strokes inside each mitochondrion
    return sparse


def sparse_figure() -> Path:
    image = tifffile.imread(ROOT / "data_samples" / "sample_stack.tif", key=0)[:256, :256]
    mask = tifffile.imread(ROOT / "data_samples" / "sample_masks.tif", key=0)[:256, :256]
    sparse = scribbles(mask)
    colours = ["#00000000", "#f5f5f5", "#e69f00", "#56b4e9"]
    fig, axes = plt.subplots(1, 3, figsize=(11, 4.2))
    axes[0].imshow(image, cmap="gray")
    axes[0].set_title("image")
    axes[1].imshow(image, cmap="gray")
    axes[1].imshow(np.ma.masked_equal(sparse, 0), cmap=ListedColormap(colours[1:]), vmin=1, vmax=3,
                   interpolation="nearest")
    axes[1].set_title("scribbles (--sparse): 0 = not annotated")
    axes[2].imshow(mask, cmap=ListedColormap(["#f5f5f5", "#e69f00", "#56b4e9"]), vmin=0, vmax=2,
                   interpolation="nearest")
    axes[2].set_title("dense mask: 0..N-1 everywhere")
    for ax in axes:
        ax.axis("off")
    handles = [Patch(facecolor="#f5f5f5", edgecolor="#999999", label="dense 0 / sparse 1: background"),
               Patch(color="#e69f00", label="dense 1 / sparse 2: membrane"),
               Patch(color="#56b4e9", label="dense 2 / sparse 3: mitochondrion"),
               Patch(facecolor="none", edgecolor="black", linestyle="--", label="sparse 0: not annotated (ignored)")]
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    path = IMG / "sparse_labels.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def demo_overlay() -> Path | None:
    from emseg.io.write import write_overlay_png
    from emseg.model.modelfile import default_model_path, load_model
    if not default_model_path().exists():
        return None
    model = load_model(default_model_path())
    page = tifffile.imread(ROOT / "data_samples" / "sample_stack.tif", key=4)
    labels = model.predict(page)
    return write_overlay_png(IMG / "demo_overlay.png", page, labels, class_names=model.classes, max_size=512)


if __name__ == "__main__":
    IMG.mkdir(parents=True, exist_ok=True)
    print(sparse_figure())
    print(demo_overlay())
