"""Typed run configuration and presets.

`paper` is the faithful recipe of Tang et al. (ISBI 2019, §3.1). A preset fills every field; single CLI flags
override single values (`resolve`). The resolved config is saved with every run and inside every checkpoint.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, fields
from typing import Any

from .data.normalise import FILM_NORMS
from .errors import ConfigError
from .model.geometry import n_down_layers
from .scoring.terms import AUTO_TERMS, TERM_NAMES

VARIANTS = ("u", "u+e", "u+d", "full")


# Upper bounds far above any sensible chest X-ray model (the paper: 64 px, width 64, latent 100, batch 64).
# The synthetic lesions S can be taught (data/synthetic.py draws them; here so that a config can be checked alone).
DETECTOR_PICKS = ("val", "shifted")
LESION_KINDS = ("opacity", "diffuse", "nodule", "effusion", "pneumothorax", "patch", "blur")
LIMITS = {"image_size": 1024, "width": 512, "detector_width": 512, "detectors": 16, "detector_steps": 10**8, "detector_batch": 65536, "latent_dim": 4096, "batch_size": 65536, "epochs": 100000, "steps": 10**8,
          "num_threads": 1024}


@dataclass
class Config:
    # --- data ---
    image_size: int = 64  # paper: 64x64 grayscale
    # --- model (paper §2.2, §3.1) ---
    variant: str = "full"  # u | u+e | u+d | full: which of U, E, D are trained and scored
    latent_dim: int = 100  # paper: latent vector size 100
    width: int = 64  # channels of the first encoder layer, doubled per layer (DCGAN widths)
    skips: int = -1  # U-Net skip connections kept, counted from the deepest level; -1 = all (4 at 64 px)
    noise_std: float = 0.05  # std of the Gaussian noise added to U's input in training (images scaled to [-1, 1])
    init_std: float = 0.02  # conv weights ~ N(0, init_std); see nets.init_weights for why not N(0, 1)
    # --- loss weights (eq. 5): lambda_1, lambda_2, lambda_3, and 1 for L_F ---
    w_rec: float = 20.0
    w_adv: float = 4.0
    w_enc: float = 8.0
    w_feat: float = 1.0
    adv_loss: str = "bce"  # bce: eq. 2 for U; feature: L2 between D's deepest features on x and x' (GANomaly)
    score_terms: str = "rec+adv+enc"  # '+'-joined terms (scoring/terms.py) of those the variant has, or auto
    # weights: A = w_rec·rec + w_adv·adv + w_enc·enc (+ 1·ssim + 1·fdist), as the paper.
    # standardised: each term centred and scaled on validation normals (median, IQR), then summed with weight 1.
    score_norm: str = "weights"
    fdist_features: str = "u"  # features of fdist: u (U's encoder, pooled), z (U's latent), ez (E's latent of x')
    # --- lesion detector S (issue 14): a segmentation U-Net trained after the GAN to find synthetic lesions drawn
    # onto the training normals, mostly in their lung fields (data/synthetic.py); score term seg. Width 0: no detector.
    detector_width: int = 0
    detectors: int = 1  # S's trained, each from its own random stream, whose lesion probabilities are averaged
    detector_steps: int = 1000
    detector_batch: int = 32
    detector_lr: float = 1e-3
    detector_ema: float = 0.99  # decay of the weights' moving average that scores
    lesion_p: float = 0.5  # share of the detector's training films that get synthetic lesions
    lesion_kinds: str = "all"  # '+'-joined LESION_KINDS S is taught (data/synthetic.py), or all
    # Where the lesions land: each film's lung mask (the darker `lung_keep` of its lung region) is raised to at least
    # `lung_floor` everywhere, so that a share of the lesions lands outside the lungs, fainter there (1: anywhere).
    lung_floor: float = 0.0
    lung_keep: float = 0.7
    # Share of S's training films imaged again after their lesions are drawn (blur, sharpening, a lower resolution,
    # noise: data/synthetic.reacquire), so that S does not take one site's imaging chain for normal anatomy.
    acquisition_p: float = 0.0
    # The same for the GAN's training films (U, D, E): a share of each batch imaged again, so that U's reconstruction
    # and the feature terms (ssim, fdist, sdist) take another imaging chain for normal too.
    gan_acquisition_p: float = 0.0
    # Share of S's training films shown through a random monotone display curve after all that (data/synthetic.relut):
    # another site's LUT or processing (windowing, equalisation) must not look like disease.
    lut_p: float = 0.0
    # How far S's training films are moved (data/synthetic.jitter): 1 is shift ±6%, zoom ±8%, rotation ±4.6 degrees;
    # k scales those ranges and, above 1, also stretches one axis against the other by up to ±10%·(k - 1), so that
    # another site's positioning and aspect ratio do not look like disease (and S cannot learn the few training
    # films by heart).
    detector_jitter: float = 1.0
    # Which of S's 8 readings is kept: the best seg AUC on the validation films as they are ("val"), or the best mean
    # over them and each simulated acquisition shift of data/acquisition.SHIFTS ("shifted": a reading that holds on
    # another site's films rather than one that peaks on this one's).
    detector_pick: str = "val"
    # Each film as every network sees it (data/normalise.py): as it comes ("none"), or histogram-equalised within
    # itself ("equalise": invariant to any monotone display curve, another site's window or LUT), in training and scoring.
    film_norm: str = "none"
    # --- operating point: the threshold is set on validation abnormals at this sensitivity (`calibrate` refits it)
    target_sensitivity: float = 0.95
    # --- optimisation ---
    epochs: int = 15
    steps: int = 0  # optimiser steps; > 0 replaces epochs (the last pass over the data may be partial)
    batch_size: int = 64
    lr: float = 5e-4
    beta1: float = 0.5
    beta2: float = 0.999
    seed: int = 0
    # --- runtime ---
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    num_threads: int = 0  # torch intra-op threads; 0 = torch's default

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        self._check_types()
        if self.variant not in VARIANTS:
            raise ConfigError(f"unknown variant {self.variant!r}; choose one of {', '.join(VARIANTS)}")
        size = self.image_size
        if size < 16 or size & (size - 1):
            raise ConfigError(f"image size must be a power of two >= 16, got {size}")
        max_skips = n_down_layers(size)
        if not -1 <= self.skips <= max_skips:
            raise ConfigError(f"skips must be -1 (all) or 0..{max_skips} at image size {size}, got {self.skips}")
        for name in ("epochs", "batch_size", "latent_dim", "width"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"precision must be fp32 or bf16, got {self.precision!r}")
        if self.adv_loss not in ("bce", "feature"):
            raise ConfigError(f"adv-loss must be bce or feature, got {self.adv_loss!r}")
        bad = set(self.score_terms.split("+")) - set(TERM_NAMES)
        if self.score_terms != "auto" and (bad or not self.score_terms):
            raise ConfigError(f"score terms must be auto or '+'-joined {'/'.join(TERM_NAMES)}, got {self.score_terms!r}")
        if self.score_norm not in ("weights", "standardised"):
            raise ConfigError(f"score-norm must be weights or standardised, got {self.score_norm!r}")
        if self.score_terms == "auto" and self.score_norm != "standardised":
            raise ConfigError("score terms auto sums standardised terms: use it with score-norm standardised")
        if self.fdist_features not in ("u", "z", "ez"):
            raise ConfigError(f"fdist-features must be u, z or ez, got {self.fdist_features!r}")
        if self.fdist_features == "ez" and not self.uses_e:
            raise ConfigError("fdist-features ez needs the encoder E (variant u+e or full)")
        if not 0 < self.target_sensitivity <= 1:
            raise ConfigError(f"target-sensitivity must be in (0, 1], got {self.target_sensitivity}")
        if self.steps < 0:
            raise ConfigError(f"steps must be >= 0, got {self.steps}")
        if self.detector_width < 0 or self.detector_steps < 1 or self.detector_batch < 2 or self.detectors < 1:
            raise ConfigError("detector-width must be >= 0, detectors and detector-steps >= 1 and detector-batch >= 2")
        if not 0 <= self.detector_ema < 1 or not 0 < self.lesion_p <= 1 or self.detector_lr <= 0:
            raise ConfigError("detector-ema must be in [0, 1), lesion-p in (0, 1] and detector-lr > 0")
        if not 0 <= self.lung_floor <= 1 or not 0 < self.lung_keep <= 1:
            raise ConfigError(f"lung-floor must be in [0, 1] and lung-keep in (0, 1], got {self.lung_floor} and {self.lung_keep}")
        if not 0 <= self.acquisition_p <= 1:
            raise ConfigError(f"acquisition-p must be in [0, 1], got {self.acquisition_p}")
        if not 0 <= self.detector_jitter <= 4:
            raise ConfigError(f"detector-jitter must be in [0, 4], got {self.detector_jitter}")
        if not 0 <= self.lut_p <= 1:
            raise ConfigError(f"lut-p must be in [0, 1], got {self.lut_p}")
        if not 0 <= self.gan_acquisition_p <= 1:
            raise ConfigError(f"gan-acquisition-p must be in [0, 1], got {self.gan_acquisition_p}")
        if self.detector_pick not in DETECTOR_PICKS:
            raise ConfigError(f"detector-pick must be one of {', '.join(DETECTOR_PICKS)}, got {self.detector_pick!r}"[:200])
        if self.film_norm not in FILM_NORMS:
            raise ConfigError(f"film-norm must be one of {', '.join(FILM_NORMS)}, got {self.film_norm!r}"[:200])
        kinds = self.lesion_kinds.split("+")
        if self.lesion_kinds != "all" and (not set(kinds) <= set(LESION_KINDS) or len(set(kinds)) != len(kinds)):
            raise ConfigError(f"lesion-kinds must be all or '+'-joined kinds of {', '.join(LESION_KINDS)}, got {self.lesion_kinds!r}"[:300])
        if "seg" in self.score_terms.split("+") and not self.uses_s:
            raise ConfigError("score term seg needs the lesion detector: set detector-width > 0")
        if self.noise_std < 0 or self.lr <= 0:
            raise ConfigError("noise-std must be >= 0 and lr > 0")

    def _check_types(self) -> None:
        """Each value of its field's type (a config.json can say anything: `"width": 8.0`, `true`, a string), and
        sizes within what a chest X-ray model needs (a crafted config must not allocate gigabytes)."""
        for f in fields(self):
            value, want = getattr(self, f.name), type(f.default)
            ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
            if want is float and isinstance(value, int) and not isinstance(value, bool):
                ok = True
            if not ok:
                raise ConfigError(f"{f.name.replace('_', '-')} must be {want.__name__}, got {value!r}"[:200])
        for name, top in LIMITS.items():
            if getattr(self, name) > top:
                raise ConfigError(f"{name.replace('_', '-')} must be <= {top}, got {getattr(self, name)}"[:200])

    @property
    def n_skips(self) -> int:
        return n_down_layers(self.image_size) if self.skips < 0 else self.skips

    @property
    def uses_d(self) -> bool:
        return self.variant in ("u+d", "full")

    @property
    def uses_e(self) -> bool:
        return self.variant in ("u+e", "full")

    @property
    def uses_s(self) -> bool:
        return self.detector_width > 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config keys: {', '.join(unknown)}")
        return cls(**data)


PRESETS: dict[str, dict[str, Any]] = {
    # Tang et al. 2019, §3.1: 64 px, batch 64, Adam(5e-4, 0.5, 0.999), lambdas 20/4/8, 15 epochs, latent 100.
    "paper": {},
    # The paper's networks and training, scored by what separated abnormal films on validation splits of both real
    # sets (docs/RESULTS.md, issue 7): 1 - SSIM(x, x') (structure U fails to reproduce) plus the Mahalanobis
    # distance of E's re-encoding of x' from the training normals', each standardised on validation normals.
    # The paper's 20·L1 ranks pneumonia *below* normal on the pediatric set (smooth films reconstruct easily).
    # `auto` picks, per data set and on its validation split only, which of ssim, fdist and sdist to sum: ssim+fdist
    # on the real sets, sdist (small lesions) on the phantoms (docs/RESULTS.md, issues 3 and 7).
    "best": {"score_terms": "auto", "score_norm": "standardised", "fdist_features": "ez"},
    # `best` plus the lesion detector S (issue 14): a segmentation U-Net trained after the GAN to find synthetic
    # lesions drawn into the lung fields of the training normals; `auto` may add its term seg to the sum. On the
    # validation splits of both real sets, every seed, auto chose a sum with seg over the best sum without it
    # (docs/RESULTS.md, issue 14). Its lesions: lung masks that keep the opaque parts of the lungs too (lung_keep 1),
    # and about half of the lesions outside the lungs, fainter there (lung_floor 0.25): chosen among six placements by
    # a rule fixed before the sweep, on validation of both sets, 3 seeds (NIH +0.027, pediatric +0.000). Half of S's
    # training films are imaged again after their lesions (acquisition_p 0.5: blur, sharpening, resolution, noise),
    # so that S does not take the training site's imaging chain for anatomy: chosen by a rule fixed before the runs
    # (research/acquisition_rule.py), validation as it is held (NIH +0.004, pediatric +0.002) and validation
    # re-acquired 11 ways rose on both sets (+0.014, +0.003; S alone on the pediatric set +0.012, worst shift +0.05).
    # Half of the GAN's training films are imaged the same way (gan_acquisition_p 0.5), so that the GAN-side terms
    # (ssim, fdist, sdist) take another chain for normal too: chosen by a rule fixed before the runs, judged on 7
    # acquisition shifts no training simulates (data/acquisition.HELDOUT_SHIFTS): validation as it is NIH +0.011,
    # pediatric -0.001; held-out shifts +0.011, +0.000 (research/acquisition_rule.py --rule gan).
    # One S (detectors 1). Session 12 adopted two S's averaged, on pairs emulated from other seeds' S's; real runs of
    # the pair (5 NIH seeds, 3 pediatric) gained +0.002 and at most +0.001 on validation, under the rule's 0.005 (research/
    # detector_count.py; docs/RESULTS.md, session 14), so `detect` went back to one S: about 0.36x `best`'s scoring
    # time and 4-5 minutes of training saved. `--detectors K` still trains and averages K S's.
    "detect": {"score_terms": "auto", "score_norm": "standardised", "fdist_features": "ez", "detector_width": 16,
               "lung_floor": 0.25, "lung_keep": 1.0, "acquisition_p": 0.5, "gan_acquisition_p": 0.5},
}


# What a plain `train` (and `demo`) uses: `detect`, chosen on the validation splits of both real sets (issue 14);
# `best` beat `paper` on validation and test of both (issue 7). `--preset paper` always selects the faithful recipe.
DEFAULT_PRESET = "detect"


# Methods an experiment can compare: the paper's ablation variants and two baselines written in this project,
# trained with the same data, preprocessing, epochs and evaluation (overrides on top of the chosen preset).
METHODS: dict[str, dict[str, Any]] = {
    "u": {"variant": "u"},
    "u+e": {"variant": "u+e"},
    "u+d": {"variant": "u+d"},
    "full": {"variant": "full"},
    # Plain convolutional autoencoder: no skips, a small latent, scored by reconstruction error.
    # The baselines are the peers as published: never this project's lesion detector.
    "ae": {"variant": "u", "skips": 0, "latent_dim": 32, "noise_std": 0.0, "score_terms": "rec", "detector_width": 0},
    # GANomaly (Akcay et al., 2018): encoder-decoder-encoder without skips, adversarial feature matching,
    # weights w_adv 1, w_rec 50, w_enc 1, no feature-map loss, scored by the latent distance.
    "ganomaly": {
        "variant": "full", "skips": 0, "noise_std": 0.0, "adv_loss": "feature",
        "w_rec": 50.0, "w_adv": 1.0, "w_enc": 1.0, "w_feat": 0.0, "score_terms": "enc", "detector_width": 0,
    },
}


def method_config(method: str, base: Config) -> Config:
    """`base` with a method's overrides (see METHODS)."""
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    changes = dict(METHODS[method])
    variant = changes.get("variant", base.variant)
    if base.fdist_features == "ez" and variant not in ("u+e", "full"):
        changes.setdefault("fdist_features", "z")  # no E to re-encode x': measure U's own latent instead
    return dataclasses.replace(base, **changes)


def resolve(preset: str = DEFAULT_PRESET, **overrides: Any) -> Config:
    """A preset's config with single values overridden; `None` overrides are ignored (flag not given)."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    values = dict(PRESETS[preset])
    known = {f.name for f in fields(Config)}
    for key, value in overrides.items():
        if value is None:
            continue
        if key not in known:
            raise ConfigError(f"unknown option {key!r}")
        values[key] = value
    return Config(**values)


def replace(cfg: Config, **changes: Any) -> Config:
    return dataclasses.replace(cfg, **changes)


__all__ = ["Config", "DEFAULT_PRESET", "PRESETS", "VARIANTS", "TERM_NAMES", "AUTO_TERMS", "METHODS", "method_config", "resolve", "replace", "n_down_layers"]
