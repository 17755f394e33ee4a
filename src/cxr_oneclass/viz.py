"""Pictures for people: heat-map overlays. Headless (Agg) matplotlib; files written atomically."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
from matplotlib import colormaps  # noqa: E402
from PIL import Image  # noqa: E402

from .io_utils import atomic_path  # noqa: E402
from .scoring.terms import HEATMAP_DISPLAY, RESIDUAL  # noqa: E402

HEAT_LABEL, HEAT_MAX = HEATMAP_DISPLAY[RESIDUAL]  # the default: the residual |x - x'| (see terms.HEATMAP_DISPLAY)


def overlay(image_u8: np.ndarray, heat: np.ndarray, alpha: float = 0.5, heat_max: float = HEAT_MAX) -> np.ndarray:
    """Grey image with the heat map blended on top as colour (full colour at `heat_max`): uint8 (H, W, 3)."""
    grey = np.repeat(image_u8[..., None].astype(np.float32) / 255.0, 3, axis=2)
    h = np.clip(heat / heat_max, 0, 1)
    colour = colormaps["inferno"](h)[..., :3]
    a = alpha * h[..., None]  # transparent where the residual is small, so the anatomy stays readable
    return np.clip(np.rint(255 * ((1 - a) * grey + a * colour)), 0, 255).astype(np.uint8)


def save_overlay(path: str | Path, image_u8: np.ndarray, heat: np.ndarray, upscale: int = 4, heat_max: float = HEAT_MAX) -> None:
    """PNG of the image with its heat map, enlarged (nearest) so 64 px maps are visible."""
    rgb = overlay(image_u8, heat, heat_max=heat_max)
    im = Image.fromarray(rgb)
    if upscale > 1:
        im = im.resize((rgb.shape[1] * upscale, rgb.shape[0] * upscale), Image.Resampling.NEAREST)
    with atomic_path(path) as tmp:
        im.save(tmp, format="PNG")


def save_fig(fig, path: str | Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def roc_figure(path: str | Path, curves: dict[str, tuple[np.ndarray, np.ndarray]], title: str = "ROC") -> None:
    """One ROC curve per entry: name -> (labels, scores); the AUC goes in the legend."""
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_auc_score, roc_curve

    fig, ax = plt.subplots(figsize=(5, 5))
    for name, (labels, scores) in curves.items():
        fpr, tpr, _ = roc_curve(labels, scores)
        ax.plot(fpr, tpr, lw=2 if name == "all" else 1.2, label=f"{name} (AUC {roc_auc_score(labels, scores):.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="1 - specificity (normals flagged)", ylabel="sensitivity", title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=8)
    save_fig(fig, path)


def examples_figure(path: str | Path, rows: list[tuple[str, np.ndarray, np.ndarray, np.ndarray, float]], title: str = "",
                    heat_label: str = HEAT_LABEL, heat_max: float = HEAT_MAX) -> None:
    """A grid, one row per example: (label, image uint8, reconstruction in [-1,1], heat map, score).

    Columns: input, reconstruction, heat map (`heat_label`, full colour at `heat_max`), heat map over the input.
    """
    import matplotlib.pyplot as plt

    n = len(rows)
    fig, axes = plt.subplots(n, 4, figsize=(7.2, 1.85 * n), squeeze=False)
    for r, (label, image, recon, heat, score) in enumerate(rows):
        recon_u8 = np.clip((recon.astype(np.float32) + 1) * 127.5, 0, 255).astype(np.uint8)
        panels = [(image, "gray", None), (recon_u8, "gray", None), (heat.astype(np.float32), "inferno", heat_max), (overlay(image, heat.astype(np.float32), heat_max=heat_max), None, None)]
        for c, (img, cmap, vmax) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(img, cmap=cmap, vmin=0, vmax=vmax if vmax else (255 if cmap == "gray" else None))
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(("input", "reconstruction", heat_label, "overlay")[c], fontsize=9)
        axes[r, 0].set_ylabel(f"{label}\nscore {score:.2f}", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_fig(fig, path)
