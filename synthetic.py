"""Procedural OASIS-like axial brain MRI slices: the project's built-in data.

Anyone without the real OASIS (or other) slices can still run the whole pipeline end to end: this module
draws skull-stripped T1-style axial slices (black background, folded grey-matter ribbon over bright white
matter, dark sulci, interhemispheric fissure, lateral ventricles, deep grey nuclei, a mild bias field and
noise) and writes them in exactly the OASIS PNG layout (``keras_png_slices_{train,validate,test}/
case_XXX_slice_Y.nii.png``, 32 slices per case).

Each case is one random "anatomy" (size, aspect, tilt, ventricle size, fold pattern) whose parameters vary
smoothly with slice height, so a case's 32 slices look like a contiguous stack rather than 32 unrelated
pictures. Everything is vectorised numpy over the whole (slice, y, x) volume: the default 52-case set takes
seconds. Output is a deterministic function of the seed.

    python synthetic.py OUT_DIR [--cases 40 6 6] [--size 256] [--seed 0]
    python synthetic.py OUT_DIR --figure images/synthetic_vs_real.png --real DIR
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from dataset import SPLITS, split_folder_name

N_SLICES = 32

# Tissue intensities on the real set's 0..255 scale (its 99.5th brain percentile is mapped to 255).
WM, GM, DEEP_GM, CSF = 240.0, 122.0, 180.0, 34.0

# Lateral ventricle centre line, anterior tip to occipital horn, in units of the brain's half width (u,
# lateral) and half length (v, posterior positive); radii in 256-grid pixels. "low" is the basal-ganglia
# level (frontal horns + atria: the butterfly), "high" the level of the ventricular bodies.
_VENT_LOW = np.array([(0.17, -0.47), (0.11, -0.38), (0.08, -0.22), (0.08, -0.05),
                      (0.15, 0.13), (0.25, 0.27), (0.30, 0.40)])
_VENT_HIGH = np.array([(0.10, -0.45), (0.12, -0.36), (0.15, -0.21), (0.18, -0.06),
                       (0.20, 0.08), (0.20, 0.19), (0.17, 0.29)])
_VENT_R_LOW = np.array([3.0, 7.0, 4.5, 2.5, 4.5, 7.0, 4.0])
_VENT_R_HIGH = np.array([3.5, 6.5, 5.5, 5.0, 5.0, 5.5, 4.0])

# Deep grey nuclei (mirrored to both sides): centre (u, v), semi-axes (px), tilt (rad), and the slice
# window (fraction of the stack, inferior = 0) in which they show.
_NUCLEI = (
    ((0.25, -0.33), (6.5, 11.0), 0.35, (0.15, 0.80)),   # caudate head
    ((0.40, -0.07), (7.5, 20.0), 0.18, (-0.3, 0.60)),   # putamen
    ((0.15, 0.09), (11.0, 16.0), -0.10, (-0.3, 0.55)),  # thalamus
)


# ---------------------------------------------------------------- smooth helpers

def _sigmoid(x):
    return 0.5 + 0.5 * np.tanh(0.5 * x)


def _ramp(t, lo, hi):
    s = np.clip((t - lo) / (hi - lo), 0.0, 1.0)
    return s * s * (3 - 2 * s)


def _window(t, lo, hi, soft=0.12):
    return _ramp(t, lo - soft, lo + soft) * (1 - _ramp(t, hi - soft, hi + soft))


def _angular_waves(rng, n, m_max, amp, z_rate):
    """Random harmonics in angle that drift slowly with slice height."""
    return [(float(amp * rng.uniform(0.3, 1.0) / np.sqrt(n)), float(rng.integers(2, m_max + 1)),
             float(rng.normal(0, z_rate)), float(rng.uniform(0, 2 * np.pi))) for _ in range(n)]


def _eval_angular(waves, theta, z):
    return sum(a * np.sin(m * theta + kz * z + ph) for a, m, kz, ph in waves)


def _plane_waves(rng, n, amp, wavelength, z_rate):
    """A smooth random 3D field as a sum of plane waves (cheap, seamless, deterministic)."""
    out = []
    for _ in range(n):
        k, d = 2 * np.pi / rng.uniform(*wavelength), rng.uniform(0, 2 * np.pi)
        out.append((float(amp * rng.uniform(0.5, 1.0) / np.sqrt(n)), float(k * np.cos(d)), float(k * np.sin(d)),
                    float(rng.normal(0, z_rate)), float(rng.uniform(0, 2 * np.pi))))
    return out


def _eval_plane(waves, u, v, z):
    return sum(a * np.sin(kx * u + ky * v + kz * z + ph) for a, kx, ky, kz, ph in waves)


def _chaikin(points, times=1):
    """Corner-cutting subdivision along axis -2: turns a coarse control polygon into a smooth curve."""
    for _ in range(times):
        a, b = points[..., :-1, :], points[..., 1:, :]
        mid = np.stack([0.75 * a + 0.25 * b, 0.25 * a + 0.75 * b], axis=-2)
        mid = mid.reshape(*points.shape[:-2], -1, points.shape[-1])
        points = np.concatenate([points[..., :1, :], mid, points[..., -1:, :]], axis=-2)
    return points


def _segment_field(qx, qy, curve):
    """Signed distance from points (qx, qy) to a tube along curve (n, P, 3: x, y, radius), per slice."""
    x, y, rad = (curve[:, :, i, None] for i in range(3))
    ax, ay, ar = x[:, :-1], y[:, :-1], rad[:, :-1]
    dx, dy, dr = x[:, 1:] - ax, y[:, 1:] - ay, rad[:, 1:] - ar
    px, py = qx - ax, qy - ay
    s = np.clip((px * dx + py * dy) / np.maximum(dx * dx + dy * dy, 1e-6), 0, 1)
    ex, ey = px - s * dx, py - s * dy
    return (np.sqrt(ex * ex + ey * ey) - (ar + s * dr)).min(axis=1)


def _gather(table, index):
    """table (n_slices, K) looked up with integer index (n_slices, H, W), as float32."""
    flat = np.take_along_axis(table.astype(np.float32), index.reshape(len(index), -1), 1)
    return flat.reshape(index.shape)


# ---------------------------------------------------------------- one case

def _case_params(rng, n_slices):
    atrophy = float(rng.beta(1.6, 3.5))   # one knob for age-like change: wider sulci, bigger ventricles
    n_sulci = int(rng.integers(31, 39))
    return dict(
        half_width=rng.uniform(70, 79), half_length=rng.uniform(84, 94), egg=rng.uniform(0.03, 0.08),
        tilt=rng.normal(0, 0.05), centre=rng.normal(0, 2.5, 2) + (0, 2), atrophy=atrophy,
        z_peak=rng.uniform(0.2, 0.4) * (n_slices - 1), z_radius=rng.uniform(58, 75),
        outline=_angular_waves(rng, 5, 6, 0.03, 0.02),
        n_sulci=n_sulci,
        sulcus_depth=rng.uniform(16, 34, n_sulci) * rng.choice([0.5, 1.0], n_sulci, p=[0.15, 0.85]),
        sulcus_width=rng.uniform(0.6, 1.6, n_sulci) + 1.6 * atrophy, sulcus_rate=rng.normal(0, 0.08, n_sulci),
        sulcus_phase=rng.uniform(0, 2 * np.pi, n_sulci),
        crown_depth=rng.uniform(5, 16, n_sulci) * (rng.random(n_sulci) < 0.6),
        jitter=_plane_waves(rng, 6, 1.5, (40, 90), 0.03), bend=_plane_waves(rng, 8, 2.6, (15, 40), 0.05),
        sylvian_depth=rng.uniform(30, 40), gm_thickness=rng.uniform(3.2, 3.9), squareness=rng.uniform(2.0, 2.4),
        fissure=(rng.uniform(0.34, 0.44), rng.uniform(0.40, 0.52), rng.uniform(0.0, 0.5) + 0.8 * atrophy),
        medial_depth=rng.uniform(-8, 8, 16), medial_spacing=rng.uniform(13, 18),
        vent_scale=rng.uniform(0.7, 1.0) + 0.9 * atrophy, vent_asym=rng.normal(0, 0.06),
        vent_shift=rng.normal(0, 0.015, (len(_VENT_LOW), 2)),
        nuclei_jitter=rng.normal(0, 0.02, (len(_NUCLEI), 2)),
        bias=rng.normal(0, 0.04, 4), texture=_plane_waves(rng, 10, 0.04, (12, 40), 0.05),
        noise=rng.uniform(2.0, 4.0), noise_seed=int(rng.integers(2**32)),
    )


def _frame(p, size):
    """Brain-centred, tilt-corrected coordinates in 256-grid pixels (u lateral, v posterior)."""
    scale = 256.0 / size
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    x = (xx - size / 2 + 0.5) * scale - np.float32(p["centre"][0])
    y = (yy - size / 2 + 0.5) * scale - np.float32(p["centre"][1])
    c, s = float(np.cos(p["tilt"])), float(np.sin(p["tilt"]))
    return c * x + s * y, -s * x + c * y


def _outline_radius(p, theta, z):
    """Distance from the centre to the brain surface along angle theta: an egg-shaped, lumpy ellipse
    whose size follows a sphere-like profile through the stack."""
    a, b = float(p["half_width"]), float(p["half_length"])
    n = float(p["squareness"])      # >2: flatter sides than an ellipse, like a real brain
    ellipse = (np.abs(np.cos(theta) / a) ** n + np.abs(np.sin(theta) / b) ** n) ** (-1 / n)
    stack = np.sqrt(np.clip(1 - ((z - p["z_peak"]) / p["z_radius"]) ** 2, 0.25, 1.0)).astype(np.float32)
    return ellipse * (1 + float(p["egg"]) * np.sin(theta)) * (1 + _eval_angular(p["outline"], theta, z)) * stack


def _sulcal_depths(p, z, t):
    """Per-slice depth of every sulcus (n_slices, n_sulci): drifting with height, shallow at the poles
    (where they would run alongside the midline fissure), plus a deep Sylvian fissure each side low down."""
    n = p["n_sulci"]
    angle = 2 * np.pi * np.arange(n) / n
    depth = p["sulcus_depth"] * (1 + 0.3 * np.sin(p["sulcus_rate"] * z[:, None] + p["sulcus_phase"]))
    pole = np.abs(np.abs(np.angle(np.exp(1j * angle))) - np.pi / 2)   # angular distance to front/back
    depth = depth * (1 - 0.85 * np.exp(-(pole / 0.25) ** 2))
    sylvian = p["sylvian_depth"] * (1 - _ramp(t, 0.45, 0.85))
    for k in _sylvian_index(n):
        depth[:, k] = np.maximum(depth[:, k], sylvian)
    return depth


def _sulcal_widths(p, t):
    """CSF width of every sulcus per slice: the Sylvian fissures gape at the lower levels."""
    n = p["n_sulci"]
    width = np.tile(np.maximum(p["sulcus_width"], 0), (len(t), 1))
    for k in _sylvian_index(n):
        width[:, k] += 3.0 * (1 - _ramp(t, 0.3, 0.8))
    return width


def _sylvian_index(n):
    return [int(np.rint(target * n / (2 * np.pi))) % n for target in (-0.25, np.pi + 0.25)]


def _radial_sulci(p, u, v, theta, depth, r, z, t):
    """Distance to the nearest sulcus wall: sulci run in from the surface at jittered angles and bend
    with depth; every other gap may hold a shallow dimple that splits a gyral crown."""
    n = p["n_sulci"]
    warp = _eval_plane(p["jitter"], u, v, z) + _eval_plane(p["bend"], u, v, z) * np.clip(depth / 14, 0, 1.6)
    phase = (n / (2 * np.pi)) * theta + warp / (2 * np.pi)
    spacing = (2 * np.pi / n) * np.maximum(r, 1.0)
    walls, notch = [], 0.0
    crowns = np.broadcast_to(p["crown_depth"], (len(t), n))
    families = ((0.0, _sulcal_depths(p, z[:, 0, 0], t), _sulcal_widths(p, t)), (0.5, crowns, np.zeros_like(crowns)))
    for offset, depths, widths in families:
        k = np.rint(phase + offset)
        across = np.abs(phase + offset - k) * spacing
        k = k.astype(np.int64) % n
        length, width = _gather(depths, k), _gather(widths, k)
        dist = np.where(depth < length, across, np.hypot(across, depth - length))
        if offset == 0:     # only true sulci gape at the surface and dent the outline between gyral crowns
            dist = dist - 1.0 * np.exp(-np.maximum(depth, 0) / 2.5)
            notch = 2.0 * np.exp(-(across / 3.0) ** 2) * (length > 3)
        walls.append(dist - 0.5 * width)
    return np.minimum(*walls), notch


def _midline(p, u, v, depth):
    """Distance to the interhemispheric fissure (front and back) and to the short sulci that fold the
    medial surface alongside it."""
    front, back, width = p["fissure"]
    b = float(p["half_length"])
    reach = np.where(v < 0, front * b, back * b).astype(np.float32)
    wobble = p["sulcus_phase"][:2]      # any fixed per-case phases will do
    mu = u - 1.5 * np.sin(v / 23.0 + float(wobble[0])) - 0.8 * np.sin(v / 7.0 + float(wobble[1]))
    fissure = np.where(depth < reach, np.abs(mu), np.hypot(mu, depth - reach)) - 0.5 * width

    spacing = float(p["medial_spacing"])
    phase = v / spacing + 0.4 * np.sin(np.abs(mu) / 9.0 + v / 31.0) + 0.5 * (mu > 0)   # sides out of step
    k = np.rint(phase)
    across = np.abs(phase - k) * spacing
    length = np.take(p["medial_depth"], (k.astype(np.int64) + 1000 * (mu > 0)) % len(p["medial_depth"]))
    medial = np.where(np.abs(mu) < length, across, np.hypot(across, np.abs(mu) - length)) - 0.3
    medial = np.where(depth < reach - 2, medial, np.inf)
    return np.minimum(fissure, medial)


def _cortex(p, u, v, theta, depth, r, z, t):
    """Grey-matter and sulcal-CSF fractions, and the outline depth with notches at sulcal mouths."""
    radial, notch = _radial_sulci(p, u, v, theta, depth, r, z, t)
    wall = np.minimum(radial, _midline(p, u, v, depth))
    gm = _sigmoid((float(p["gm_thickness"]) - np.minimum(depth, wall)) / 0.55)
    csf = _sigmoid(-wall / 0.4)
    return gm, csf, depth - notch


def _ventricle_fraction(p, u, v, t):
    """Lateral ventricles as tubes of varying radius along a curved centre line, morphing from the
    butterfly (frontal horns + atria) to the bodies as the slices rise, split by a septum."""
    hi = _ramp(t, 0.45, 1.0)[:, None, None]
    line = ((1 - hi) * _VENT_LOW + hi * _VENT_HIGH + p["vent_shift"]) * (p["half_width"], p["half_length"])
    show = np.stack([_ramp(t, 0.05, 0.35), _ramp(t, 0.05, 0.35), _ramp(t, 0.3, 0.65), _ramp(t, 0.35, 0.75),
                     _ramp(t, 0.15, 0.4), _ramp(t, 0.1, 0.35), _ramp(t, 0.1, 0.35)], axis=1)
    radius = ((1 - hi[:, :, 0]) * _VENT_R_LOW + hi[:, :, 0] * _VENT_R_HIGH) * show * p["vent_scale"] - 2.0
    curve = _chaikin(np.concatenate([line, radius[..., None]], axis=-1)).astype(np.float32)

    box = (np.abs(u) < 0.45 * p["half_width"]) & (np.abs(v) < 0.6 * p["half_length"])
    qx, qy = np.abs(u[box]), v[box]                         # mirrored: one centre line serves both sides
    inside = _segment_field(qx, qy, curve) / (1 + float(p["vent_asym"]) * np.sign(u[box]))
    third = np.hypot(qx, np.maximum(np.abs(qy) - 0.12 * p["half_length"], 0))
    third = third[None] + 2.0 - 3.0 * _window(t, 0.15, 0.5, 0.1)[:, None]
    septum = _sigmoid((qx - 1.0) / 0.35)
    field = np.zeros((len(t),) + u.shape, np.float32)
    field[:, box] = np.maximum(_sigmoid(-inside / 0.45) * septum, _sigmoid(-third / 0.4))
    return field


def _hindbrain(p, u, v, t):
    """Lowest slices only: the quadrigeminal cistern (a dark arc behind the midbrain) and the striped
    folia of the cerebellar vermis behind it. Returns (csf fraction, folia grey fraction)."""
    a, b = float(p["half_width"]), float(p["half_length"])
    low = (1 - _ramp(t, 0.12, 0.32))[:, None, None]
    dv = v - 0.04 * b
    ring = np.abs(np.hypot(u, dv) - 0.2 * a) - 1.2
    arc = _sigmoid(-ring / 0.5) * _sigmoid((dv - 0.08 * a) / 1.5)
    ell = np.hypot(u / (0.17 * a), (v - 0.33 * b) / (0.14 * b))
    vermis = _sigmoid((1 - ell) * 10) * (0.5 + 0.5 * np.cos(2 * np.pi * np.hypot(u, v - 0.1 * b) / 4.5))
    lower = (1 - _ramp(t, 0.05, 0.2))[:, None, None]
    return arc * low, 0.8 * vermis * lower


def _nuclei_fraction(p, u, v, t):
    """Deep grey nuclei as soft ellipses, mirrored about the midline, each in its own slice window."""
    au = np.abs(u)
    frac = np.zeros((len(t),) + u.shape, np.float32)
    for ((cu, cv), (ru, rv), tilt, (lo, hi)), (ju, jv) in zip(_NUCLEI, p["nuclei_jitter"]):
        du, dv = au - float((cu + ju) * p["half_width"]), v - float((cv + jv) * p["half_length"])
        c, s = float(np.cos(tilt)), float(np.sin(tilt))
        ell = np.hypot((c * du + s * dv) / ru, (-s * du + c * dv) / rv)
        shown = _window(t, lo, hi)[:, None, None]
        frac = np.maximum(frac, _sigmoid((1 - ell) * min(ru, rv) / 1.2)[None] * shown)
    return frac


def _bias_field(c, u, v, t):
    """Smooth multiplicative coil-like shading: a gentle tilt in-plane and through the stack plus a bowl."""
    c = [float(x) for x in c]
    through = (c[3] * (t - 0.5)).astype(np.float32)[:, None, None]
    return 1 + c[0] * u / 128 + c[1] * v / 128 + c[2] * (u * u + v * v) / 128**2 + through


def _brain_box(p, u, v):
    """Row and column slices that surely contain the brain, so the work skips most of the background."""
    reach = p["half_length"] * (1 + p["egg"]) * (1 + sum(abs(w[0]) for w in p["outline"])) + 4
    inside = np.hypot(u, v) < reach
    ys, xs = np.nonzero(inside.any(1))[0], np.nonzero(inside.any(0))[0]
    if len(ys) == 0:
        return slice(0, 0), slice(0, 0)
    return slice(ys[0], ys[-1] + 1), slice(xs[0], xs[-1] + 1)


def synthetic_case(case_seed: int, size: int = 256, n_slices: int = N_SLICES) -> np.ndarray:
    """One case: uint8 (n_slices, size, size), slice 0 inferior, anterior up, background exactly 0."""
    rng = np.random.default_rng(case_seed)
    p = _case_params(rng, n_slices)
    full_u, full_v = _frame(p, size)
    rows, cols = _brain_box(p, full_u, full_v)
    u, v = full_u[rows, cols], full_v[rows, cols]
    r, theta = np.hypot(u, v), np.arctan2(v, u)
    z = np.arange(n_slices, dtype=np.float32)[:, None, None]
    t = np.linspace(0, 1, n_slices) if n_slices > 1 else np.zeros(1)
    depth = _outline_radius(p, theta, z) - r

    gm, csf, outline = _cortex(p, u, v, theta, depth, r, z, t)
    img = WM * (1 + _eval_plane(p["texture"], u, v, z)) * (1 - gm) + GM * gm
    nuclei = _nuclei_fraction(p, u, v, t)
    img = img * (1 - nuclei) + DEEP_GM * nuclei
    cistern, folia = _hindbrain(p, u, v, t)
    img = img * (1 - folia) + GM * folia
    csf = np.maximum(csf, cistern)
    img = img * (1 - csf) + CSF * csf
    vent = _ventricle_fraction(p, u, v, t)
    img = img * (1 - vent) + CSF * vent

    img = img * _bias_field(p["bias"], u, v, t)
    noise = np.random.default_rng(p["noise_seed"]).standard_normal(img.shape, dtype=np.float32)
    img += float(p["noise"]) * noise
    edge = np.clip(outline * (size / 256.0) + 0.5, 0, 1)      # anti-aliased outline, one output pixel wide
    out = np.zeros((n_slices, size, size), np.uint8)
    out[:, rows, cols] = np.rint(np.where(edge > 0, np.clip(img * edge, 1, 255), 0))
    return out


# ---------------------------------------------------------------- the OASIS-layout set

def slice_filename(case: int, slice_index: int) -> str:
    return f"case_{case:03d}_slice_{slice_index}.nii.png"


def case_seed(seed: int, case: int) -> int:
    """Independent, reproducible seed per (set seed, case number)."""
    return int(np.random.SeedSequence([seed, case]).generate_state(1)[0])


def _write_case(folder: Path, case: int, volume: np.ndarray) -> None:
    for i, image in enumerate(volume):
        Image.fromarray(image).save(folder / slice_filename(case, i))


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished set into out: one rename when out is absent or empty, else one per split."""
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if not out.exists():
        os.replace(tmp, out)
        return
    for split in SPLITS:
        os.replace(tmp / split_folder_name(split), out / split_folder_name(split))
    tmp.rmdir()


def write_synthetic_dataset(out_dir, cases=(40, 6, 6), size: int = 256, seed: int = 0,
                            progress: bool = True) -> dict[str, int]:
    """Write the synthetic set in the OASIS layout under out_dir; returns slices written per split.

    Case numbers run on across splits (train 001-040, validate 041-046, test 047-052 by default) so no
    case is in two splits. The set is built in a hidden sibling folder and renamed into place at the end,
    so an interrupted run leaves nothing that looks like a dataset.
    """
    out = Path(out_dir).resolve()      # resolved so that "." still has a parent to hold the temp folder
    present = [split_folder_name(s) for s in SPLITS if (out / split_folder_name(s)).exists()]
    if present:
        raise FileExistsError(f"{out} already holds a slice set ({', '.join(present)}); "
                              "delete those folders or choose another out_dir")
    if len(cases) != len(SPLITS) or min(cases) < 0:
        raise ValueError(f"cases must be three non-negative counts (train, validate, test), got {cases!r}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    jobs = []
    for split, count in zip(SPLITS, cases):
        (tmp / split_folder_name(split)).mkdir()
        jobs += [(split, len(jobs) + i + 1) for i in range(count)]
    try:
        for split, case in _progress(jobs, progress):
            _write_case(tmp / split_folder_name(split), case, synthetic_case(case_seed(seed, case), size))
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {split: count * N_SLICES for split, count in zip(SPLITS, cases)}


def _progress(items, enabled):
    if not enabled:
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc="synthetic cases", unit="case")


# ---------------------------------------------------------------- comparison figure

_NAME = re.compile(r"case_(\d+)_slice_(\d+)\.nii\.png$")


def _index_slices(folder) -> dict[int, dict[int, Path]]:
    """{case: {slice: path}} for every OASIS-named PNG under folder (a split folder or a set root)."""
    cases: dict[int, dict[int, Path]] = {}
    for path in sorted(Path(folder).rglob("case_*_slice_*.nii.png")):
        m = _NAME.search(path.name)
        if m:
            cases.setdefault(int(m.group(1)), {})[int(m.group(2))] = path
    if not cases:
        raise FileNotFoundError(f"no case_XXX_slice_Y.nii.png files under {folder}")
    return cases


def _pick(cases, positions, rng):
    """One random case per column, showing the slice at the same relative height in its stack."""
    picks = []
    for pos in positions:
        slices = cases[rng.choice(sorted(cases))]
        order = sorted(slices)
        picks.append(slices[order[int(round(pos * (len(order) - 1)))]])
    return picks


DS002748_CREDIT = ("Real slices: OpenNeuro ds002748 v1.0.5 (CC0), Bezmaternykh et al., "
                   "doi:10.18112/openneuro.ds002748.v1.0.5")


def side_by_side_figure(synthetic_dir, real_dir, out_png, n=6, seed=0,
                        real_label="real\n(OpenNeuro ds002748)", credit=DS002748_CREDIT) -> None:
    """Top row: n built-in synthetic slices; bottom row: n real slices at the same stack positions.
    Pass real_label and credit when the real row comes from another source. figures.py draws it."""
    from figures import save_captioned_rows

    rng = np.random.default_rng(seed)
    positions = np.linspace(0.05, 0.95, n)
    rows = {"built-in synthetic": _pick(_index_slices(synthetic_dir), positions, rng),
            real_label: _pick(_index_slices(real_dir), positions, rng)}
    save_captioned_rows({label: [(path.name.replace(".nii.png", ""), np.asarray(Image.open(path).convert("L")))
                                 for path in paths] for label, paths in rows.items()},
                        out_png, "Built-in synthetic slices (top) vs real T1 slices (bottom), same stack positions",
                        credit)


# ---------------------------------------------------------------- CLI

def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", help="where to write keras_png_slices_{train,validate,test}/")
    ap.add_argument("--cases", type=int, nargs=3, default=(40, 6, 6), metavar=("TRAIN", "VAL", "TEST"))
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--figure", metavar="PNG", help="also draw a synthetic-vs-real comparison figure here")
    ap.add_argument("--real", metavar="DIR", help="real OASIS-layout slices for --figure")
    args = ap.parse_args(argv)
    if args.figure and not args.real:
        ap.error("--figure needs --real DIR")
    if not (Path(args.out_dir) / split_folder_name("train")).is_dir():
        counts = write_synthetic_dataset(args.out_dir, tuple(args.cases), args.size, args.seed)
        print(f"wrote {counts} slices to {args.out_dir}")
    if args.figure:
        side_by_side_figure(args.out_dir, args.real, args.figure, seed=args.seed)
        print(f"wrote {args.figure}")


if __name__ == "__main__":
    main()
