"""The population check (scoring/population.py) on the two shared sets: fitted on one set's training normals
(limit on its validation normals), applied to its own validation and test splits and to the other set.

    python research/population_shift.py [--data-root ../shared/data] [--size 64]

Prints, per (model set, batch): the batch shift (warning above population.SHIFT_LIMIT) and the share of films
outside the population one by one. Uses no model: the check looks only at the films.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from cxr_oneclass.data.specs import load_dataset
from cxr_oneclass.scoring.population import SHIFT_LIMIT, BatchCheck, fit_population

SETS = ("nih-pneumonia-128", "kermany-pediatric-128")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data-root", default="../shared/data")
    p.add_argument("--size", type=int, default=64)
    args = p.parse_args()
    logging.disable(logging.WARNING)
    data = {n: load_dataset(f"csv:{Path(args.data_root) / n / 'manifest.csv'}", args.size, 0) for n in SETS}
    print(f"| model set | batch | films | shift (limit {SHIFT_LIMIT}) | outside one by one | warning |")
    print("|---|---|---|---|---|---|")
    for own in SETS:
        other = next(n for n in SETS if n != own)
        tr, va, te = data[own]["train"], data[own]["val"], data[own]["test"]
        pop = fit_population(tr.images[tr.labels == 0], va.images[va.labels == 0])
        ot = data[other]["test"]
        for name, images in (("own validation (all)", va.images), ("own test (all)", te.images),
                             ("own test abnormals", te.images[te.labels == 1]), (f"{other} test normals", ot.images[ot.labels == 0]),
                             (f"{other} test (all)", ot.images)):
            check = BatchCheck(pop)
            check.add(images)
            v = check.verdict()
            print(f"| {own} | {name} | {v['n']} | {v['shift']:.3f} | {v['share_outside']:.1%} | {'yes' if v['warning'] else 'no'} |")


if __name__ == "__main__":
    main()
