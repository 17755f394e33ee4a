"""README figure for issue 14: synthetic lesions on training normals next to real abnormal films, each with the
lesion detector's map. Validation films only (never test).

    python research/figure_lesions.py RUN --out docs/synthetic_vs_real.png
"""

from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from cxr_oneclass.data.specs import load_dataset  # noqa: E402
from cxr_oneclass.data.synthetic import Lesions, lung_masks  # noqa: E402
from cxr_oneclass.runs import DataProvenance, load_run  # noqa: E402
from cxr_oneclass.runtime import to_model_range  # noqa: E402


@torch.no_grad()
def lesion_maps(model, films: np.ndarray) -> np.ndarray:
    x = to_model_range(torch.from_numpy(np.ascontiguousarray(films)))
    return torch.sigmoid(model.det.eval()(x))[:, 0].numpy()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=6)
    ap.add_argument("--seed", type=int, default=4)
    a = ap.parse_args()
    model, _, doc = load_run(a.run)
    prov = DataProvenance.from_doc(doc, a.run)
    ds = load_dataset(prov.spec, model.cfg.image_size, prov.split_seed, splits=("train", "val"))
    train, val = ds["train"], ds["val"]
    rng = np.random.default_rng(a.seed)
    pick = rng.choice(len(train), a.n, replace=False)
    x = torch.from_numpy(train.images[pick]).float().div(255).unsqueeze(1)
    lungs = torch.from_numpy(lung_masks(train.images[pick], None, keep=model.cfg.lung_keep, floor=model.cfg.lung_floor)).unsqueeze(1)
    synth, mask, _ = Lesions(gen=torch.Generator().manual_seed(a.seed), p_abnormal=1.0)(x, lungs)
    synth_u8 = (synth[:, 0].numpy() * 255).round().astype(np.uint8)
    abn = val.images[val.labels == 1]
    real = abn[rng.choice(len(abn), a.n, replace=False)]
    rows = [
        ("normal film + synthetic lesion", synth_u8, "gray"),
        ("its lesion mask (training target)", mask[:, 0].numpy(), "gray"),
        ("detector map", lesion_maps(model, synth_u8), "inferno"),
        ("real abnormal film (validation)", real, "gray"),
        ("detector map", lesion_maps(model, real), "inferno"),
    ]
    fig, axes = plt.subplots(len(rows), a.n, figsize=(1.6 * a.n, 1.75 * len(rows)))
    for r, (label, imgs, cmap) in enumerate(rows):
        for c in range(a.n):
            ax = axes[r, c]
            ax.imshow(imgs[c], cmap=cmap, vmin=0, vmax=255 if imgs.dtype == np.uint8 else 1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(label, fontsize=6)
    fig.suptitle(f"{ds.spec.rsplit('/', 2)[-2]}: synthetic lesions vs real abnormal films", fontsize=8)
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
