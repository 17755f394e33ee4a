"""Synthetic frontal (PA) chest radiograph phantoms with known abnormalities.

Anatomy is modelled as attenuation (soft-tissue-equivalent thickness, summed over
body, lungs, heart, mediastinum and bones), then projected to a film-like image:
bright = dense, dark = air.  Geometry lives in normalised coordinates
(x, y in [-1, 1], y pointing down, image right = patient's left), so any size works.

Randomness is keyed per image: the normal anatomy, exposure and detector noise of
image ``i`` depend only on ``(seed, stream, i)``; an abnormality draws from its own
key and is added to the attenuation map before projection, so the same image with
and without the abnormality differs only inside the mask (plus <= 1 px of blur).

Masks mark pixels whose attenuation the abnormality changed by more than _TAU (the
change is zeroed elsewhere), so "mask" = where the image differs from its normal twin
(for cardiomegaly: the enlarged heart minus the normal heart).  Per-image severity is
``severity * U(0.8, 1.2)``; lesion position, side and count are random.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields

import numpy as np

log = logging.getLogger(__name__)

ABNORMALITIES: tuple[str, ...] = ("nodule", "consolidation", "effusion", "cardiomegaly", "pneumothorax")
KINDS: tuple[str, ...] = ("normal",) + ABNORMALITIES

_AIR = 1.0  # soft tissue displaced per unit of aerated lung depth
_TISSUE = 0.3  # fraction of normal lung "depth" that is still tissue and blood
_TAU = 0.02  # |attenuation change| above which a pixel counts as abnormal
_CHUNK_PIXELS = 1 << 15  # pixels per chunk: temporaries (128 KiB) stay in cache; bounds memory
_F = np.float32
_MIN_SIZE, _MAX_SIZE = 32, 1024

# (name, low, high): per-image uniform draws, in this order, for the normal anatomy and exposure.
_NORMAL_PARAMS = (
    ("rot", -0.05, 0.05), ("dx", -0.04, 0.04), ("dy", -0.04, 0.04), ("zoom", 0.94, 1.06),
    ("body_w", 0.86, 0.98), ("neck_w", 0.15, 0.2), ("neck_y", -0.86, -0.76), ("shoulder_y", -0.6, -0.45),
    ("body_t", 0.9, 1.1), ("lung_w", 0.92, 1.03), ("lung_wl", 0.94, 1.0), ("apex_y", -0.76, -0.64),
    ("dome_r", 0.3, 0.45), ("dome_dl", 0.02, 0.07), ("dome_h", 0.1, 0.16), ("ctr", 0.38, 0.48),
    ("tilt", 0.6, 0.8), ("heart_ar", 0.6, 0.72), ("heart_dy", -0.04, 0.04), ("med_w", 0.085, 0.11),
    ("knob_r", 0.045, 0.065), ("rib_sp", 0.125, 0.145), ("rib_y0", -0.8, -0.72), ("rib_a", 0.3, 0.42),
    ("clav_y", -0.58, -0.5), ("clav_s", 0.05, 0.14), ("ves_p1", 0.0, 6.283), ("ves_p2", 0.0, 6.283),
    ("ves_p3", 0.0, 6.283), ("ves_amp", 0.8, 1.2), ("hilum_y", -0.04, 0.06), ("bubble", 0.0, 1.0),
    ("spine_ph", 0.0, 6.283), ("contrast", 1.25, 1.7), ("gamma", 0.85, 1.2), ("lo", 0.0, 0.05),
    ("hi", 0.93, 1.0), ("noise", 0.004, 0.014), ("blur", 0.08, 0.22),
)
_N_ABN_DRAWS = 32


def _ss(x, edge):
    """Soft step: 0 for x <= 0, 1 for x >= edge (linear ramp; cheap)."""
    return np.clip(x * (1.0 / edge), 0.0, 1.0)


def _atan2(y, x):
    """Polynomial arctan2 (max error ~1e-5 rad); ~10x faster than np.arctan2 on float32."""
    ay, ax = np.abs(y), np.abs(x)
    swap = ay > ax
    a = np.minimum(ay, ax) / (np.maximum(ay, ax) + 1e-12)
    s = a * a
    r = ((((-0.0117212 * s + 0.05265332) * s - 0.11643287) * s + 0.19354346) * s - 0.33262347) * s * a + a
    r = np.where(swap, 1.5707964 - r, r)
    r = np.where(x < 0, 3.1415927 - r, r)
    return np.where(y < 0, -r, r)


def _normal_params(keys):
    rngs = [np.random.default_rng(list(k) + [0]) for k in keys]
    u = np.stack([r.random(len(_NORMAL_PARAMS)) for r in rngs]).astype(_F)
    p = {name: (lo + (hi - lo) * u[:, j]).reshape(-1, 1, 1) for j, (name, lo, hi) in enumerate(_NORMAL_PARAMS)}
    return p, rngs  # rngs continue to supply the detector noise


def _lung_frame(p):
    """Per-side lung ellipse (centre x, radius x) for right (image left) and left lungs."""
    lw = p["lung_w"]
    cxr, rxr = 0.42 * lw, 0.37 * lw
    cxl, rxl = cxr * p["lung_wl"], rxr * p["lung_wl"]
    return cxr, rxr, cxl, rxl


def _heart_geom(p, ctr=None):
    """Heart = left-ventricle ellipse (tilted, apex down-left of patient) + right-atrium ellipse.

    Sized so that the transverse cardiac width / thorax width == ctr (default: the normal p["ctr"]);
    a larger ctr (cardiomegaly) grows the heart mostly towards the patient's left and down.
    """
    cxr, rxr, cxl, rxl = _lung_frame(p)
    thorax = cxr + rxr + cxl + rxl
    ctr0 = p["ctr"]
    ctr = ctr0 if ctr is None else ctr
    w0, w = ctr0 * thorax, ctr * thorax
    x_right = -0.3 * w0 - 0.4 * (w - w0)  # right heart border (image left)
    x_left = x_right + w  # left heart border (apex, image right)
    c, s = np.cos(p["tilt"]), np.sin(p["tilt"])
    a = 0.58 * w
    b = p["heart_ar"] * a
    hw = np.sqrt((a * c) ** 2 + (b * s) ** 2)
    dome_l = p["dome_r"] + p["dome_dl"]
    yh = dome_l - 0.17 + p["heart_dy"] + 0.6 * (w - w0)
    xh = x_left - hw
    ra_rx, ra_ry = 0.22 * w, 0.3 * w
    ra = (x_right + ra_rx, p["dome_r"] - 0.06 + 0.1 * (w - w0), ra_rx, ra_ry)
    return (xh, yh, a, b, c, s), ra


def _heart_occ(X, Y, geom):
    (xh, yh, a, b, c, s), (xr, yr, rx, ry) = geom
    dx, dy = X - xh, Y - yh
    q = ((c * dx + s * dy) / a) ** 2 + ((c * dy - s * dx) / b) ** 2
    q2 = ((X - xr) / rx) ** 2 + ((Y - yr) / ry) ** 2
    return np.clip((1.0 - np.minimum(q, q2)) * 7.0, 0.0, 1.0)


def _grid(p, size):
    t = (np.arange(size, dtype=_F) + _F(0.5)) * _F(2.0 / size) - _F(1.0)
    xs, ys = t.reshape(1, 1, -1) - p["dx"], t.reshape(1, -1, 1) - p["dy"]
    c, s = np.cos(p["rot"]), np.sin(p["rot"])
    z = 1.0 / p["zoom"]
    return (c * xs + s * ys) * z, (c * ys - s * xs) * z


def _anatomy(X, Y, p):
    """Attenuation components for a batch; returns dict of (n, H, W) float32 arrays."""
    ax = np.abs(X)
    lf = (X > 0).astype(_F)  # 1 on the patient's left (image right)
    # body outline: neck column, sloping shoulders with rounded tips, chest wall narrowing below the axillae
    cxr, rxr, cxl, rxl = _lung_frame(p)
    neck = np.sqrt(np.clip(1.0 - (X / p["neck_w"]) ** 2, 0.0, 1.0)) * (0.6 * p["body_t"])
    span = p["body_w"] - p["neck_w"]
    xt = np.clip(ax - p["neck_w"] - span + 0.16, 0.0, 0.16)
    y_top = p["neck_y"] + 0.8 * (p["shoulder_y"] - p["neck_y"]) * np.clip((ax - p["neck_w"]) / span, 0.0, 1.0)
    y_top = y_top + 0.16 - np.sqrt(0.0256 - xt * xt)
    chest_w = 0.5 * (cxr + rxr + cxl + rxl) + 0.1 + 0.06 * np.clip(Y - 0.4, 0.0, 1.0)
    axilla = np.clip((Y - p["shoulder_y"]) * (1.0 / 0.45), 0.0, 1.0)
    half_w = p["body_w"] + (np.minimum(chest_w, p["body_w"]) - p["body_w"]) * axilla * (2.0 - axilla)
    torso = np.sqrt(np.clip(1.0 - (X / half_w) ** 2, 0.0, 1.0)) * _ss(Y - y_top, 0.05)
    body = np.maximum(torso * p["body_t"] * (0.8 + 0.2 * axilla), neck)
    in_body = _ss(torso - 0.2, 0.2)
    # lungs: tapered ellipses cut by the diaphragm domes (steep laterally: sharp costophrenic angles)
    cx, rx = cxr + (cxl - cxr) * lf, rxr + (rxl - rxr) * lf
    lry = 0.5 * (0.78 - p["apex_y"])
    lcy = p["apex_y"] + lry
    v = (Y - lcy) / lry
    u = (ax - cx) / (rx * (0.93 + 0.12 * v))
    q = u * u + v * v
    dd = (ax - cx) / rx + 0.15
    dl, dm = np.maximum(dd, 0.0), np.minimum(dd, 0.0)
    dome = p["dome_r"] + p["dome_dl"] * lf + p["dome_h"] * (dl * dl * (1.0 + 1.5 * dl * dl) + 0.4 * dm * dm)
    above = _ss(dome - Y, 0.015)
    inside = np.clip(1.0 - q, 0.0, 1.0)
    lung_occ = _ss(inside, 0.08) * above
    depth = lung_occ * (0.5 + 0.5 * np.sqrt(inside)) * (0.95 - 0.15 * v * v)
    # mediastinum (with aortic knob on the patient's left) and heart
    med = _ss(p["med_w"] - np.abs(X + 0.015), 0.02)
    kx, ky = X - (p["med_w"] + 0.015), Y - (lcy - 0.42 * lry)
    med = np.maximum(med, _ss(1.0 - (kx * kx + ky * ky) / p["knob_r"] ** 2, 0.25))
    heart = _heart_occ(X, Y, _heart_geom(p))
    # spine with vertebral bodies / disc spaces
    spine = _ss(0.075 - ax, 0.02) * (0.85 + 0.15 * np.cos(Y * (6.283 / 0.14) + p["spine_ph"]))
    # posterior ribs: curved arcs (rise, then fall laterally), spacing widening downwards
    lat = (cxr + rxr) + (cxl + rxl - cxr - rxr) * lf + 0.03
    t = ax / lat
    yr = np.maximum(Y - p["rib_y0"] - (-p["rib_a"] * t + 0.6 * t * t * t), -0.05)
    ph = yr / (p["rib_sp"] * (1.0 + 0.3 * yr))
    env = _ss(1.06 - t, 0.05) * in_body * (0.45 + 0.55 * lung_occ)
    ribs = np.clip(2.5 * np.cos(6.283 * ph) - 0.5, 0.0, 1.0) * (env * _ss(t - 0.12, 0.3) * _ss(10.3 - ph, 0.5))
    # anterior ribs: fainter, running down-medially; costal cartilage invisible medially
    ya = np.maximum(Y - p["rib_y0"] - 0.12 + 0.3 * t, -0.05)
    pha = ya / (p["rib_sp"] * 1.15 * (1.0 + 0.3 * ya))
    ribs_a = np.clip(2.0 * np.cos(6.283 * pha) - 0.8, 0.0, 1.0) * (env * _ss(t - 0.45, 0.2) * _ss(6.0 - pha, 0.5))
    # clavicles: gently S-shaped bars, lateral end higher
    tc = (ax - 0.1) / 0.7
    yc = p["clav_y"] - p["clav_s"] * tc + 0.025 * np.sin(6.283 * tc)
    dc = (Y - yc) * (1.0 / 0.03)
    clav = np.sqrt(np.clip(1.0 - dc * dc, 0.0, 1.0)) * (_ss(tc, 0.06) * _ss(1.0 - tc, 0.08) * in_body)
    # trachea (air column) down to the carina
    trach = _ss(0.04 - np.abs(X - 0.01), 0.015) * _ss(lcy - 0.5 * lry - Y, 0.03)
    # gastric bubble under the left dome (air above a flat fluid level)
    gx = (X - 0.42 * p["lung_w"]) * (1.0 / 0.09)
    gy = (Y - p["dome_r"] - p["dome_dl"] - 0.14) * (1.0 / 0.05)
    bubble = _ss(1.0 - gx * gx - gy * gy, 0.3) * _ss(0.4 - gy, 0.2) * (p["bubble"] > 0.4)
    # vascular markings: radiating from the hila, branching (2x, 4x angular frequency) and tapering
    hx = 0.17 + 0.03 * lf
    hy = lcy - 0.12 * lry + p["hilum_y"] - 0.04 * lf
    vx, vy = ax - hx, Y - hy
    r = np.sqrt(vx * vx + vy * vy) + 1e-3
    ang = _atan2(vy, vx) + 1.3 * lf
    ang = ang + 0.22 * np.sin(2.0 * ang + p["ves_p2"]) + 0.06 * np.sin(7.0 * r + p["ves_p3"])
    ves = np.zeros_like(X)
    for m, r0, r1, w0, amp in ((7.0, 0.08, 0.4, 0.018, 1.0), (14.0, 0.12, 0.55, 0.012, 0.7),
                               (28.0, 0.22, 0.65, 0.007, 0.5)):
        s = np.cos(m * ang + (m / 7.0) * p["ves_p1"])
        width = w0 * np.clip(1.0 - (r - r0) * (0.6 / (r1 - r0)), 0.3, 1.0)
        h = np.minimum(m * width / r, 1.5) ** 2
        thr = 1.0 - h * (0.5 - h * (1.0 / 24.0))  # cos of the half-angle of the vessel
        prof = np.clip((s - thr) / (1.0 - thr), 0.0, 1.0)
        ves = np.maximum(ves, amp * prof * (_ss(r - r0, 0.05) * _ss(r1 - r, 0.15)))
    hilum = np.clip(1.0 - (vx * vx * (1.0 / 0.005) + (vy - 0.03) ** 2 * (1.0 / 0.018)), 0.0, 1.0)
    vessels = (0.12 * ves + 0.3 * hilum) * p["ves_amp"] * lung_occ
    base = (body + 0.075 * ribs + 0.04 * ribs_a + 0.3 * clav + 0.12 * spine
            - 0.12 * trach - 0.25 * bubble)
    return {"base": base, "depth": depth * (1.0 - med), "lung_occ": lung_occ * (1.0 - med), "heart": heart,
            "above": above, "vessels": vessels, "ang": ang, "lf": lf, "u": u, "v": v}


def _compose(c, heart=None, fill=None, tissue=_TISSUE, vessels=None):
    """Total attenuation; `fill` = fraction of lung air replaced by fluid, `tissue` = lung tissue fraction."""
    heart = c["heart"] if heart is None else heart
    air = c["depth"] * (1.0 - 0.85 * heart)
    if fill is not None:
        air = air * (1.0 - fill)
    return (c["base"] + 0.08 * heart * c["above"] - (_AIR * (1.0 - tissue)) * air
            + (c["vessels"] if vessels is None else vessels))


# Abnormalities: each returns the abnormal attenuation map, given the grid X, Y, normal parameters p,
# anatomy components c (c["A"] = normal attenuation), abnormality draws q (n, _N_ABN_DRAWS),
# per-image severity sev (n, 1, 1) and pixel pitch px (n, 1, 1), all in anatomy coordinates.
def _nodule(X, Y, p, c, q, sev, px):
    """One (70%) to three round dense lesions in the lungs; radius and density grow with severity."""
    dA = np.zeros_like(X)
    n_nod = 1 + (q[:, 1] > 0.7) + (q[:, 2] > 0.75) * (q[:, 1] > 0.7)
    cxr, rxr, cxl, rxl = _lung_frame(p)
    lry = 0.5 * (0.78 - p["apex_y"])
    lcy = p["apex_y"] + lry
    for j in range(3):
        left = q[:, 3 + j, None, None] > 0.5
        cx, rx = np.where(left, cxl, cxr), np.where(left, rxl, rxr)
        uu = -0.45 + 0.95 * q[:, 6 + j, None, None]
        vv = -0.7 + 0.95 * q[:, 9 + j, None, None]
        uu = np.where(left & (uu < 0) & (vv > -0.2), -uu, uu)  # keep clear of the heart
        r = (0.035 + 0.085 * sev) * (0.8 + 0.4 * q[:, 12 + j, None, None])
        r = r * np.where(n_nod[:, None, None] > 1, 0.7, 1.0)
        r = np.maximum(r, 1.6 * px)
        nx = np.where(left, 1.0, -1.0) * (cx + uu * rx * 0.85)
        ny = np.minimum(lcy + vv * lry, p["dome_r"] - r - 0.06)
        present = (j < n_nod)[:, None, None]
        d2 = ((X - nx) ** 2 + (Y - ny) ** 2) / (r * r)
        dA += present * (0.16 + 0.44 * sev) * np.sqrt(np.clip(1.0 - d2, 0.0, 1.0))
    return c["A"] + dA


def _consolidation(X, Y, p, c, q, sev, px):
    """Patchy, ill-defined air-space opacity in one lung (air replaced by fluid), air bronchograms."""
    left = q[:, 1, None, None] > 0.5
    side = np.where(left, c["lf"], 1.0 - c["lf"])
    R = (0.13 + 0.2 * sev) * (0.85 + 0.3 * q[:, 2, None, None])
    cxr, rxr, cxl, rxl = _lung_frame(p)
    cx, rx = np.where(left, cxl, cxr), np.where(left, rxl, rxr)
    lry = 0.5 * (0.78 - p["apex_y"])
    lcy = p["apex_y"] + lry
    uu = -0.1 + 0.55 * q[:, 3, None, None]
    vv = -0.55 + 0.9 * q[:, 4, None, None]
    uu = np.where(left & (vv > -0.1), np.maximum(uu, 0.25), uu)  # not hidden behind the heart
    zx = np.where(left, 1.0, -1.0) * (cx + rx * uu)
    zy = np.minimum(lcy + lry * vv, p["dome_r"] - 0.1)
    env = np.zeros_like(X)
    for j in range(5):
        bx = zx + 1.2 * R * (q[:, 5 + j, None, None] - 0.5)
        by = zy + 1.2 * R * (q[:, 10 + j, None, None] - 0.5)
        rb = R * (0.45 + 0.4 * q[:, 15 + j, None, None])
        env += np.clip(1.0 - ((X - bx) ** 2 + (Y - by) ** 2) / (rb * rb), 0.0, 1.0)
    env = np.clip(1.3 * env, 0.0, 1.0) * side
    rot = q[:, 23, None, None] * 3.14
    xr, yr = np.cos(rot) * X + np.sin(rot) * Y, np.cos(rot) * Y - np.sin(rot) * X
    tex = (np.cos(23.0 * xr + 6.28 * q[:, 20, None, None])
           + np.cos(17.0 * (0.6 * xr + 0.8 * yr) + 6.28 * q[:, 21, None, None]))
    tex = tex + np.cos(29.0 * (-0.7 * xr + 0.7 * yr) + 6.28 * q[:, 22, None, None])
    fill = env * np.clip(0.75 + 0.18 * tex, 0.25, 1.0) * (0.28 + 0.67 * sev)
    # air bronchograms: dark branching tubes (radial from the hilum) inside the dense part
    bron = np.clip((np.cos(6.0 * c["ang"] + 6.28 * q[:, 24, None, None]) - 0.9) * 10.0, 0.0, 1.0)
    fill = fill * (1.0 - 0.6 * bron * np.clip((env - 0.6) * 3.0, 0.0, 1.0) * (sev > 0.3))
    return _compose(c, fill=fill)


def _effusion(X, Y, p, c, q, sev, px):
    """Fluid replacing lung air at a base (right, left or both): blunted angle, meniscus rising laterally."""
    which = q[:, 1, None, None]  # <0.45 right, <0.8 left, else both
    on = np.where(which < 0.45, 1.0 - c["lf"], np.where(which < 0.8, c["lf"], 1.0))
    h = (0.06 + 0.36 * sev) * (0.85 + 0.3 * q[:, 2, None, None])
    y_cp = p["dome_r"] + p["dome_dl"] * c["lf"] + 0.9 * p["dome_h"]
    lat = np.clip(0.5 + 0.5 * c["u"], 0.0, 1.0)  # 0 medial .. 1 lateral: meniscus curves up laterally
    y_m = y_cp - h - (0.08 + 0.14 * sev) * lat * lat + 0.04
    fill = np.clip((Y - y_m) * (1.0 / (0.04 + 0.05 * sev)), 0.0, 1.0) * on * (1.0 - c["heart"])
    return _compose(c, fill=fill)


def _cardiomegaly(X, Y, p, c, q, sev, px):
    """Heart enlarged to CTR >= 0.57 (+0.15 * severity), and at least 0.08 above this patient's normal."""
    target = np.maximum(0.57 + 0.15 * sev, p["ctr"] + 0.08) * (1.0 + 0.04 * q[:, 1, None, None])
    big = np.maximum(_heart_occ(X, Y, _heart_geom(p, target)), c["heart"])
    return _compose(c, heart=big)


def _pneumothorax(X, Y, p, c, q, sev, px):
    """Lung collapsed towards the hilum: apical/lateral rim without markings, darker, thin pleural line."""
    left = q[:, 1, None, None] > 0.5
    side = np.where(left, c["lf"], 1.0 - c["lf"])
    s = 1.0 - (0.08 + 0.3 * sev) * (0.85 + 0.3 * q[:, 2, None, None])
    u0, v0 = -0.95, 0.5
    uc, vc = (c["u"] - u0) / s + u0, (c["v"] - v0) / s + v0
    qc = uc * uc + vc * vc
    lry = 0.5 * (0.78 - p["apex_y"])
    dq = 2.0 * np.maximum(0.012, 0.8 * px) / (s * 0.4 * lry)  # ~1 px of q near the collapsed edge
    where = side * c["lung_occ"] * _ss(c["u"] + 0.75, 0.2)  # apical / lateral, not along the mediastinum
    g = _ss(qc - 1.0, dq) * where
    line = np.clip(1.0 - np.abs(qc - 1.0 - dq) / dq, 0.0, 1.0) * where
    ptx = _compose(c, tissue=_TISSUE * (1.0 - 0.6 * g), vessels=c["vessels"] * (1.0 - g))
    return ptx + 0.15 * line


_ABN_FUNCS = {"nodule": _nodule, "consolidation": _consolidation, "effusion": _effusion,
              "cardiomegaly": _cardiomegaly, "pneumothorax": _pneumothorax}


def _blur(img, w):
    """Separable 3-tap blur [w, 1-2w, w] with edge replication (spreads changes by <= 1 px)."""
    for axis in (1, 2):
        lo = np.concatenate([img.take([0], axis), img.take(np.arange(img.shape[axis] - 1), axis)], axis)
        hi = np.concatenate([img.take(np.arange(1, img.shape[axis]), axis), img.take([-1], axis)], axis)
        img = img * (1.0 - 2.0 * w) + w * (lo + hi)
    return img


def _render_chunk(keys, size: int, kind: str, severity: float):
    p, rngs = _normal_params(keys)
    X, Y = _grid(p, size)
    comp = _anatomy(X, Y, p)
    A = comp["A"] = _compose(comp)
    mask = np.zeros(X.shape, dtype=bool)
    if kind != "normal":
        q = np.stack([np.random.default_rng(list(k) + [1 + KINDS.index(kind)]).random(_N_ABN_DRAWS)
                      for k in keys]).astype(_F)
        sev = np.clip(severity * (0.8 + 0.4 * q[:, 0]), 0.0, 1.0).astype(_F).reshape(-1, 1, 1)
        px = (2.0 / size) / p["zoom"]  # pixel pitch in anatomy coordinates, per image
        dA = _ABN_FUNCS[kind](X, Y, p, comp, q, sev, px) - A
        mask = np.abs(dA) > _TAU
        A = A + dA * mask
    # film-like projection: saturating exposure curve, gamma, window, detector blur and noise
    img = 1.0 - np.exp(-p["contrast"] * np.maximum(A, 0.0))
    img = np.exp(p["gamma"] * np.log(np.maximum(img, 1e-6)))
    img = p["lo"] + (p["hi"] - p["lo"]) * img
    img = _blur(img, p["blur"])
    noise = np.stack([r.standard_normal((size, size), dtype=_F) for r in rngs])
    img = img + p["noise"] * (0.5 + 0.5 * img) * noise
    return np.clip(img, 0.0, 1.0).astype(_F, copy=False), mask


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; valid kinds: {', '.join(KINDS)}")


def _render_keys(keys, size, kind, severity):
    _check_kind(kind)
    if not _MIN_SIZE <= size <= _MAX_SIZE:
        raise ValueError(f"size must be in {_MIN_SIZE}..{_MAX_SIZE}, got {size}")
    if not 0.0 <= severity <= 1.0:
        raise ValueError(f"severity must be in [0, 1], got {severity}")
    n = len(keys)
    images = np.empty((n, size, size), dtype=_F)
    masks = np.zeros((n, size, size), dtype=bool)
    step = max(1, _CHUNK_PIXELS // (size * size))
    for a in range(0, n, step):
        images[a:a + step], masks[a:a + step] = _render_chunk(keys[a:a + step], size, kind, float(severity))
    return images, masks


def render(n: int, size: int = 64, seed: int = 0, kind: str = "normal",
           severity: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """n images of one kind ("normal" or one of ABNORMALITIES).

    Returns float32 images (n, size, size) in [0, 1] and bool masks (n, size, size) of
    where the abnormality is (all False for "normal").  Image i's normal anatomy,
    exposure and noise depend only on (seed, i), whatever ``kind`` is.
    """
    if n < 0 or seed < 0:
        raise ValueError(f"n and seed must be >= 0, got n={n}, seed={seed}")
    return _render_keys([(seed, 0, 0, i) for i in range(n)], size, kind, severity)


@dataclass(frozen=True)
class PhantomOptions:
    """Sizes and settings of the phantom data set (see ``make_splits``); validated on creation."""

    n_train: int = 1000  # normal only
    n_val_normal: int = 100
    n_val_abnormal: int = 100  # spread evenly over `types`
    n_test_normal: int = 200
    n_test_abnormal: int = 200  # spread evenly over `types`
    size: int = 64
    seed: int = 0
    severity: float = 0.5  # 0..1; 0.5 = "moderate"
    types: tuple[str, ...] = ABNORMALITIES

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "types":
                types = (value,) if isinstance(value, str) else tuple(value)
                bad = [t for t in types if t not in ABNORMALITIES]
                if not types or bad or len(set(types)) != len(types):
                    why = f"unknown {', '.join(map(repr, bad))}" if bad else "empty or repeated"
                    raise ValueError(f"bad value for 'types': {why}; give one or more distinct of "
                                     f"{', '.join(ABNORMALITIES)} joined with '+'")
                object.__setattr__(self, "types", types)
            elif f.name == "severity":
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                    raise ValueError(f"bad value for 'severity': {value!r}; must be a number in [0, 1]")
                object.__setattr__(self, "severity", float(value))
            else:
                lo, hi = (_MIN_SIZE, _MAX_SIZE) if f.name == "size" else (0, None)
                if (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo
                        or (hi is not None and value > hi)):
                    rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
                    raise ValueError(f"bad value for {f.name!r}: {value!r}; must be an integer {rng}")
                object.__setattr__(self, f.name, int(value))


@dataclass
class PhantomSplit:
    images: np.ndarray  # uint8 (N, size, size)
    labels: np.ndarray  # int64 (N,), 0 normal, 1 abnormal
    kinds: list[str]  # "normal" or the abnormality type, per image
    masks: np.ndarray  # bool (N, size, size)
    names: list[str]  # unique ids like "phantom/test/effusion/000012"

    def __len__(self) -> int:
        return len(self.labels)


_SPLIT_CODES = {"train": 1, "val": 2, "test": 3}  # stream 0 is `render`'s; each split has its own


def _spread(n: int, types: tuple[str, ...]) -> list[int]:
    """n split as evenly as possible over types (the first n % len(types) get one more)."""
    k, r = divmod(n, len(types))
    return [k + (i < r) for i in range(len(types))]


def _make_split(split: str, n_normal: int, n_abnormal: int, opts: PhantomOptions) -> PhantomSplit:
    parts = [("normal", n_normal)] + list(zip(opts.types, _spread(n_abnormal, opts.types)))
    total = sum(k for _, k in parts)
    images = np.empty((total, opts.size, opts.size), dtype=np.uint8)
    masks = np.zeros((total, opts.size, opts.size), dtype=bool)
    kinds: list[str] = []
    names: list[str] = []
    block = max(1, (1 << 22) // (opts.size * opts.size))  # float32 working set <= 16 MiB
    at = 0
    for kind, k in parts:
        # the stream key (seed, split, kind, index) keeps splits and kinds disjoint from each other
        keys = [(opts.seed, _SPLIT_CODES[split], KINDS.index(kind), i) for i in range(k)]
        for a in range(0, k, block):
            img, m = _render_keys(keys[a:a + block], opts.size, kind, opts.severity)
            images[at + a:at + a + len(img)] = np.rint(img * 255.0).astype(np.uint8)
            masks[at + a:at + a + len(img)] = m
        kinds += [kind] * k
        names += [f"phantom/{split}/{kind}/{i:06d}" for i in range(k)]
        at += k
    labels = np.array([kind != "normal" for kind in kinds], dtype=np.int64)
    return PhantomSplit(images=images, labels=labels, kinds=kinds, masks=masks, names=names)


def make_splits(opts: PhantomOptions) -> dict[str, PhantomSplit]:
    """Render the "train" (normal only), "val" and "test" splits.

    Within a split, images are ordered normals first, then each abnormality type in
    ``opts.types`` order (shuffle downstream if needed).
    """
    log.info("rendering phantom splits: %s", opts)
    out = {
        "train": _make_split("train", opts.n_train, 0, opts),
        "val": _make_split("val", opts.n_val_normal, opts.n_val_abnormal, opts),
        "test": _make_split("test", opts.n_test_normal, opts.n_test_abnormal, opts),
    }
    for name, sp in out.items():
        log.debug("phantom %s: %d images (%d abnormal)", name, len(sp.labels), int(sp.labels.sum()))
    return out


def parse_options(text: str) -> PhantomOptions:
    """Parse the part after 'phantom:' of a data spec.

    E.g. '' (defaults) or 'n_train=2000,size=128,seed=3,severity=0.3,types=nodule+effusion'.
    Unknown keys or bad values raise ValueError naming the key and listing valid keys/types.
    """
    text = text.strip()
    if text.startswith("phantom:"):
        text = text[len("phantom:"):].strip()
    valid = [f.name for f in fields(PhantomOptions)]
    kwargs: dict[str, object] = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, sep, value = (t.strip() for t in item.partition("="))
        if key not in valid:
            raise ValueError(f"unknown phantom option {key!r}; valid keys: {', '.join(valid)}")
        if not sep or not value:
            raise ValueError(f"phantom option {key!r} needs a value ({key}=...)")
        if key in kwargs:
            raise ValueError(f"phantom option {key!r} given twice")
        try:
            if key == "types":
                kwargs[key] = tuple(t.strip() for t in value.split("+"))
            elif key == "severity":
                kwargs[key] = float(value)
            else:
                kwargs[key] = int(value)
        except ValueError:
            kind = "a number" if key == "severity" else "an integer"
            raise ValueError(f"bad value for {key!r}: {value!r}; must be {kind}") from None
    return PhantomOptions(**kwargs)
