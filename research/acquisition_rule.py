"""Issue 14, session 10: does re-imaging S's training films (config acquisition_p) earn a place in `detect`?
Validation only; the test split is never loaded.

S loses most of its validation AUC to blur and a lower resolution when every validation film is re-acquired that way
(research/shift_robustness.py, session 9), so it may have learned one site's imaging chain as part of "normal". The
test pools of both shared sets are such other sites, and so is the held-out NIH check; they may not be used to find
out. This script reads two shift_robustness JSONs per set, twin runs (same GAN, same seed, same S config but for
acquisition_p) against the variant, and applies the rule below, written before the variant's numbers existed:

    adopt acquisition_p in `detect` iff, on the means over the seeds of each set,
      (a) the shipped score (each run's own `auto` terms) on the validation split as it is falls by no more than
          0.005 on either set, and
      (b) the same score's mean AUC over the 11 simulated acquisition shifts rises on both sets.

    A later variant on top of the chosen one (--rule gain, written before its runs too: session 10's lesion_p 0.7, then
    acquisition_p 1.0)
    must earn its place on validation as it is, without giving the robustness back:
      adopt iff the mean gain of the shipped score over the sets is at least 0.005, neither set falls by more than
      0.005, and neither set's mean over the shifts falls by more than 0.005.

    Session 11, re-imaging the GAN's training films too (config gan_acquisition_p 0.5, on top of the default; --rule
    gan, written before its runs): twins are the default's runs (same GAN seed, same S), the variant retrains only the
    GAN. Its re-imaging simulates blur, sharpening, resolution and noise, which are among the 11 shifts, so those
    cannot judge it alone; the held-out shifts (data/acquisition.HELDOUT_SHIFTS) do:
      adopt iff (a) the shipped score on validation as it is falls by no more than 0.005 on either set, (b) its mean
      over the held-out shifts rises on both sets, and (c) its mean over the 11 shifts falls by no more than 0.005 on
      either set.

    Session 11, S's training films shown through a random monotone display curve (config lut_p 0.5, S only, on top of
    the default with gan_acquisition_p; --rule lut, written before its runs). The held-out family found histogram
    equalisation breaking every term on NIH (0.59); lut_p simulates display curves, so the two display shifts (lut,
    equalise) are no longer held out for it and the other five are:
      adopt iff (a) the shipped score on validation as it is falls by no more than 0.005 on either set, (b) its mean
      over heel, scatter, grid, collimate and marker falls by no more than 0.005 on either set, (c) its mean over the
      11 shifts falls by no more than 0.005 on either set, and (d) its mean over lut and equalise rises on both sets.

    Session 12, every film histogram-equalised within itself before every network, in training and scoring (config
    film_norm equalise, on top of the default; --rule norm, written before its runs): GAN and S both retrained (plain
    `train`; session 11 showed a plain train writes the joined twins' weights). It is blind to any monotone display
    curve by construction, so lut, equalise (and gamma, contrast among the 11) cannot judge it alone; the same four
    conditions as --rule lut judge it: (a) validation as it is within 0.005 on either set, (b) heel, scatter, grid,
    collimate and marker within 0.005 on either set, (c) the 11 shifts within 0.005 on either set, (d) lut and equalise
    up on both sets. If NIH's runs fail (a), (b) or (c), the pediatric runs are not made (the rule cannot pass).

    Session 13, S's training films moved twice as far and stretched in aspect (config detector_jitter 2, S only,
    retrained by research/detector_readings.py on session 11's one-S default runs, whose S it otherwise reproduces;
    --rule geometry, written before its runs). Positioning and aspect ratio are among neither the 11 shifts (but for
    zoom 0.9/1.1, which the default already trains on) nor the held-out ones, so both families judge it:
      adopt iff the mean gain of the shipped score on validation as it is over the sets is at least 0.005, neither
      set falls by more than 0.005, and neither set's mean over the 11 shifts nor over the 7 held-out shifts falls by
      more than 0.005.

    python research/acquisition_rule.py --set nih runs/x14c10/shift-nih-f25k100.json runs/x14c10/shift-nih-f25k100a50.json \
        --set kermany runs/x14c10/shift-kermany-f25k100.json runs/x14c10/shift-kermany-f25k100a50.json
"""

from __future__ import annotations

import argparse
import json

import numpy as np

MAX_LOSS = 0.005
DISPLAY = ("lut", "equalise")


def summary(path: str) -> dict[str, np.ndarray]:
    """Per run (in file order): the shipped score and seg alone, unshifted, mean over the shifts and worst shift."""
    doc = json.loads(open(path).read())
    rows: dict[str, list[float]] = {}
    for run in doc.values():
        shifts, heldout = run["shifts"], run.get("heldout", {})  # "heldout": shift_robustness.py since session 11
        others = [s for s in shifts if s != "none"]
        for key, term in (("full", run["chosen"]), ("seg", "seg")):
            rows.setdefault(key, []).append(shifts["none"][term])
            rows.setdefault(f"{key}_shifted", []).append(float(np.mean([shifts[s][term] for s in others])))
            rows.setdefault(f"{key}_worst", []).append(min(shifts[s][term] for s in others))
            if heldout:
                rows.setdefault(f"{key}_heldout", []).append(float(np.mean([h[term] for h in heldout.values()])))
                display = [s for s in heldout if s in DISPLAY]  # --rule lut: the held-out shifts lut_p simulates
                rows.setdefault(f"{key}_display", []).append(float(np.mean([heldout[s][term] for s in display])))
                rows.setdefault(f"{key}_unseen", []).append(float(np.mean([heldout[s][term] for s in heldout if s not in DISPLAY])))
    return {k: np.array(v) for k, v in rows.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rule", choices=("robust", "gain", "gan", "lut", "norm", "geometry"), default="robust",
                    help="robust: (a) and (b) above; gain: the later rule; gan: session 11's rule for gan_acquisition_p; lut: for lut_p; "
                    "norm: session 12's for film_norm (lut's conditions); geometry: session 13's for detector_jitter")
    ap.add_argument("--set", nargs=3, action="append", required=True, metavar=("NAME", "TWINS_JSON", "VARIANT_JSON"))
    a = ap.parse_args()
    full, shifted, heldout, display, unseen = [], [], [], [], []  # per set: the variant's mean change of the shipped score
    for name, twins, variant in a.set:
        t, v = summary(twins), summary(variant)
        print(f"{name} ({len(t['full'])} seeds)")
        for key in [k for k in t if k in v]:
            d = v[key] - t[key]
            print(f"  {key:13s} twins {t[key].mean():.4f} ± {t[key].std():.4f}  variant {v[key].mean():.4f} ± {v[key].std():.4f}"
                  f"  Δ {d.mean():+.4f} (by seed {' '.join(f'{x:+.3f}' for x in d)})")
        full.append((v["full"] - t["full"]).mean())
        shifted.append((v["full_shifted"] - t["full_shifted"]).mean())
        if a.rule in ("gan", "lut", "norm", "geometry"):  # needs both JSONs with held-out shifts
            heldout.append((v["full_heldout"] - t["full_heldout"]).mean())
            display.append((v["full_display"] - t["full_display"]).mean())
            unseen.append((v["full_unseen"] - t["full_unseen"]).mean())
    held = min(full) >= -MAX_LOSS
    if a.rule in ("lut", "norm"):
        kept_unseen, kept, rose = min(unseen) >= -MAX_LOSS, min(shifted) >= -MAX_LOSS, min(display) > 0
        print(f"(a) unshifted full score within {MAX_LOSS} on every set: {held}; (b) the 5 unseen held-out shifts within "
              f"{MAX_LOSS}: {kept_unseen}; (c) the 11 shifts within {MAX_LOSS}: {kept}; (d) lut + equalise up on every set: {rose}")
        adopt = held and kept_unseen and kept and rose
    elif a.rule == "gan":
        rose, kept = min(heldout) > 0, min(shifted) >= -MAX_LOSS
        print(f"(a) unshifted full score within {MAX_LOSS} on every set: {held}; (b) held-out shifts' mean up on every set: "
              f"{rose}; (c) the 11 shifts' mean within {MAX_LOSS}: {kept}")
        adopt = held and rose and kept
    elif a.rule == "geometry":
        kept, kept_held = min(shifted) >= -MAX_LOSS, min(heldout) >= -MAX_LOSS
        print(f"mean gain over the sets {np.mean(full):+.4f} (needs >= {MAX_LOSS}); no set below -{MAX_LOSS}: {held}; "
              f"the 11 shifts within {MAX_LOSS}: {kept}; the 7 held-out shifts within {MAX_LOSS}: {kept_held}")
        adopt = np.mean(full) >= MAX_LOSS and held and kept and kept_held
    elif a.rule == "robust":
        rose = min(shifted) > 0
        print(f"(a) unshifted full score within {MAX_LOSS} on every set: {held}; (b) shifted mean up on every set: {rose}")
        adopt = held and rose
    else:
        kept = min(shifted) >= -MAX_LOSS
        print(f"mean gain over the sets {np.mean(full):+.4f} (needs >= {MAX_LOSS}); no set below -{MAX_LOSS}: {held}; "
              f"shifted means held within {MAX_LOSS}: {kept}")
        adopt = np.mean(full) >= MAX_LOSS and held and kept
    print("decision:", "adopt" if adopt else "keep today's default")


if __name__ == "__main__":
    main()
