"""Evaluation metrics: tensors in, numbers out.

Images are float tensors N x 1 x H x W; every metric clips them to [0, 1] first
and uses data range 1. Nothing here does I/O, plotting or logging, and nothing is
downloaded: all randomness is seeded, so every number is reproducible.
"""
from __future__ import annotations

import functools
import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from skimage.metrics import structural_similarity

__all__ = [
    "ssim_per_image", "ssim", "psnr_per_image", "psnr", "code_usage", "perplexity",
    "SliceFeatures", "slice_features", "frechet_distance", "kernel_inception_distance",
    "ms_ssim", "mean_pairwise_ms_ssim", "nearest_neighbour_ssim", "code_histogram_distance",
]

# skimage's SSIM spends its time in scipy filters, which release the GIL, so a few
# threads help; each result depends only on its own pair, so order/threads never
# change the numbers.
_SSIM_THREADS = max(1, min(4, os.cpu_count() or 1))


def _clip(x: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1]; uint8 slices (0-255, as a split is cached) are scaled, so whole splits can stay
    uint8 and only the chunk at hand is made float."""
    if x.dim() != 4 or x.shape[1] != 1:
        raise ValueError(f"expected N x 1 x H x W images, got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        return x.float().div_(255.0)
    return x.detach().float().clamp(0.0, 1.0)


def _np_images(x: torch.Tensor) -> np.ndarray:
    return _clip(x)[:, 0].cpu().double().numpy()


def _ssim_pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """skimage SSIM of a[i] vs b[i] (float64 H x W arrays in [0,1])."""
    side = min(a.shape[-2:])
    win = min(7, side if side % 2 else side - 1)  # skimage needs an odd window that fits

    def one(i: int) -> float:
        return structural_similarity(a[i], b[i], data_range=1.0, win_size=win)

    if len(a) < 2 or _SSIM_THREADS == 1:
        return np.array([one(i) for i in range(len(a))], dtype=np.float64)
    with ThreadPoolExecutor(_SSIM_THREADS) as pool:
        return np.array(list(pool.map(one, range(len(a)))), dtype=np.float64)


# ----------------------------------------------------------------------------- reconstruction

def ssim_per_image(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """SSIM per image: ``skimage.metrics.structural_similarity(x_i, y_i, data_range=1)``
    on the clipped images in float64 (skimage defaults: 7x7 uniform window, K1=0.01,
    K2=0.03; images under 7 px use the largest odd window that fits).
    Returns an (N,) float64 CPU tensor."""
    if x.shape != y.shape:
        raise ValueError(f"shape mismatch {tuple(x.shape)} vs {tuple(y.shape)}")
    return torch.from_numpy(_ssim_pairs(_np_images(x), _np_images(y)))


def ssim(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean of :func:`ssim_per_image` over the batch."""
    return float(ssim_per_image(x, y).mean())


def psnr_per_image(x: torch.Tensor, y: torch.Tensor, max_db: float = 100.0) -> torch.Tensor:
    """PSNR per image: ``10 * log10(1 / MSE)`` (data range 1, MSE over all pixels of the
    clipped image, computed in float64), capped at ``max_db``. Identical images
    (MSE = 0, PSNR = inf) give exactly ``max_db`` so that means stay finite.
    Returns an (N,) float64 CPU tensor."""
    if x.shape != y.shape:
        raise ValueError(f"shape mismatch {tuple(x.shape)} vs {tuple(y.shape)}")
    mse = (_clip(x).double() - _clip(y).double()).pow(2).flatten(1).mean(1)
    return (10.0 * torch.log10(1.0 / mse)).clamp(max=max_db).cpu()


def psnr(x: torch.Tensor, y: torch.Tensor, max_db: float = 100.0) -> float:
    """Mean of :func:`psnr_per_image` (each image capped at ``max_db``)."""
    return float(psnr_per_image(x, y, max_db).mean())


def code_usage(counts: torch.Tensor) -> float:
    """Fraction of the K codebook entries used at least once: ``mean(counts > 0)``,
    where ``counts`` (K,) holds each code's occurrences over a whole split."""
    return float((torch.as_tensor(counts) > 0).double().mean())


def perplexity(counts: torch.Tensor) -> float:
    """Codebook perplexity ``exp(-sum_k p_k ln p_k)`` with ``p = counts / counts.sum()``
    (0 ln 0 = 0): K when all K codes are used equally often, 1 when one code is used."""
    c = torch.as_tensor(counts).double().flatten().cpu()
    if c.sum() <= 0:
        raise ValueError("counts must have a positive sum")
    p = c[c > 0] / c.sum()
    return float(torch.exp(-(p * p.log()).sum()))


# ----------------------------------------------------------------------------- generation

class SliceFeatures(torch.nn.Module):
    """Fixed random-weight CNN embedding of 2D slices, used for FD/KID in place of Inception.

    The input (N x 1 x H x W in [0,1], H, W >= 16) is clipped, resized (bilinear,
    antialiased) to 128 x 128 and mapped to [-1, 1]. Four stages of
    3x3 conv -> ReLU -> 2x2 average pool (16, 32, 64, 128 channels; He-normal weights
    and small normal biases drawn from a CPU ``torch.Generator`` seeded 0; never
    trained) see 128, 64, 32 and 16 px maps. The feature vector (F = 544, float64)
    is the spatial mean and std of every channel at every stage (480) plus an 8 x 8
    average-pooled thumbnail of the input (64).

    Why it is sound for comparing slice distributions: random convolutional features
    are a known-workable embedding for Frechet/KID-style statistics (they preserve
    much of the input's information, cf. Naeem et al. 2020); here the first stage
    responds to intensity and edges, per-channel stds at deeper stages to texture and
    structure at growing scales, and the thumbnail to coarse layout (brain position,
    size, ventricles). It needs no download, is identical on every run, and matches on
    CPU and CUDA up to float32 tolerance (convolutions run in float32 with TF32 off).

    Limits: this is not Inception, and not trained on anything, so it encodes no
    semantic notion of anatomy; FD/KID values in this space are NOT comparable with
    published FID/KID numbers, only with other numbers computed by this repo's
    SliceFeatures (same code, same seed). Slices are squashed to a square.
    """

    size = 128
    widths = (16, 32, 64, 128)
    thumb = 8

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        cin = 1
        for i, cout in enumerate(self.widths):
            fan_in = cin * 9
            self.register_buffer(f"w{i}", torch.randn(cout, cin, 3, 3, generator=g) * math.sqrt(2.0 / fan_in))
            self.register_buffer(f"b{i}", torch.randn(cout, generator=g) * 0.1)
            cin = cout
        self.num_features = 2 * sum(self.widths) + self.thumb ** 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _clip(x)
        if min(x.shape[-2:]) < 16:
            raise ValueError("SliceFeatures needs images of at least 16 x 16")
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear",
                          align_corners=False, antialias=True)
        feats = [F.adaptive_avg_pool2d(x, self.thumb).flatten(1)]
        h = x * 2.0 - 1.0
        # TF32 would make CUDA features differ from CPU by ~1e-3; keep plain float32.
        with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True, allow_tf32=False):
            for i in range(len(self.widths)):
                h = F.relu(F.conv2d(h, getattr(self, f"w{i}"), getattr(self, f"b{i}"), padding=1))
                std, mean = torch.std_mean(h.flatten(2), dim=2, unbiased=False)
                feats += [mean, std]
                h = F.avg_pool2d(h, 2)
        return torch.cat([f.double() for f in feats], dim=1)


_FEATURE_CACHE: dict[str, SliceFeatures] = {}


@torch.no_grad()
def slice_features(images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """:class:`SliceFeatures` of ``images`` (computed in batches on the images' device,
    no grad, module cached per device). Returns an N x 544 float64 CPU tensor."""
    key = str(images.device)
    if key not in _FEATURE_CACHE:
        _FEATURE_CACHE[key] = SliceFeatures().to(images.device)
    net = _FEATURE_CACHE[key]
    return torch.cat([net(images[i:i + batch_size]).cpu() for i in range(0, len(images), batch_size)])


def _np_feats(f) -> np.ndarray:
    f = f.detach().cpu().numpy() if isinstance(f, torch.Tensor) else np.asarray(f)
    f = f.astype(np.float64)
    if f.ndim != 2:
        raise ValueError("features must be N x F")
    return f


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(feat_a, feat_b) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (the FID formula):
    ``|mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2))`` with unbiased
    covariances, in float64. ``tr((S_a S_b)^(1/2))`` is computed as the sum of square
    roots of the eigenvalues of the symmetric PSD matrix ``S_a^(1/2) S_b S_a^(1/2)``
    (same value, real by construction); tiny negative results are clamped to 0."""
    a, b = _np_feats(feat_a), _np_feats(feat_b)
    if len(a) < 2 or len(b) < 2:
        raise ValueError("need at least 2 samples per set")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    r = _sqrtm_psd(s_a)
    ev = np.linalg.eigvalsh(r @ s_b @ r)
    tr_covmean = np.sqrt(np.clip(ev, 0, None)).sum()
    fd = ((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2.0 * tr_covmean
    return float(max(fd, 0.0))


def kernel_inception_distance(feat_a, feat_b, subsets: int = 50, subset_size: int | None = None,
                              seed: int = 0) -> tuple[float, float | None]:
    """KID: unbiased MMD^2 with the polynomial kernel ``k(x, y) = (x.y / d + 1)^3``
    (d = feature dimension), estimated on ``subsets`` random subsets of ``subset_size``
    rows drawn without replacement from each set (default ``min(1000, len(a), len(b))``;
    numpy ``default_rng(seed)``). Returns (mean, std) over the subsets; the std is None when every subset
    would be the whole of both sets (the estimate uses all pairs, so it would be one value repeated)."""
    a, b = _np_feats(feat_a), _np_feats(feat_b)
    m = min(subset_size or 1000, len(a), len(b))
    if m < 2:
        raise ValueError("need at least 2 samples per set")
    whole = m == len(a) == len(b)
    if whole:
        subsets = 1
    d = a.shape[1]
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        kxx = (x @ x.T / d + 1) ** 3
        kyy = (y @ y.T / d + 1) ** 3
        kxy = (x @ y.T / d + 1) ** 3
        mmd = ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (m * (m - 1)) \
            - 2.0 * kxy.mean()
        vals.append(mmd)
    vals = np.array(vals)
    return float(vals.mean()), None if whole else float(vals.std())


_MS_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def _gauss_filter(x: torch.Tensor, win: int, sigma: float = 1.5) -> torch.Tensor:
    """Separable gaussian filter, "valid" (no padding) as in Wang et al."""
    coords = torch.arange(win, dtype=x.dtype, device=x.device) - (win - 1) / 2
    g = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    g = g / g.sum()

    def band(n: int) -> torch.Tensor:
        # n x (n - win + 1) banded matrix: one matmul per axis is ~5x faster on CPU
        # than conv2d with a 1 x win kernel
        m = torch.zeros(n, n - win + 1, dtype=x.dtype, device=x.device)
        cols = torch.arange(n - win + 1, device=x.device)
        for k in range(win):
            m[cols + k, cols] = g[k]
        return m

    return band(x.shape[-2]).T @ x @ band(x.shape[-1])


def ms_ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Multi-scale SSIM per image (Wang, Simoncelli & Bovik 2003), in batched torch on
    the images' device: ``prod_{j<M} relu(cs_j)^w_j * relu(ssim_M)^w_M`` with weights
    (0.0448, 0.2856, 0.3001, 0.2363, 0.1333), an 11x11 gaussian window (sigma 1.5,
    no padding), K1=0.01, K2=0.03, data range 1 and 2x2 average pooling between scales.
    M = 5 when the smaller side is >= 176 px; smaller images use the largest M whose
    coarsest scale still fits the window (>= 11 px), with the first M weights
    renormalised to sum to 1 (images under 11 px use one scale and a smaller odd window).
    relu keeps negative cs/ssim terms from producing NaN. Returns an (N,) float64 tensor
    on the images' device."""
    if x.shape != y.shape:
        raise ValueError(f"shape mismatch {tuple(x.shape)} vs {tuple(y.shape)}")
    # float32 filtering: ~3x faster on CPU than float64, results within ~1e-5
    x, y = _clip(x), _clip(y)
    side = min(x.shape[-2:])
    win = min(11, side if side % 2 else side - 1)
    scales = 1
    while scales < 5 and side // 2 ** scales >= win:
        scales += 1
    w = torch.tensor(_MS_WEIGHTS[:scales], dtype=torch.float64, device=x.device)
    w = w / w.sum()
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    n = x.shape[0]
    out = torch.ones(n, dtype=torch.float64, device=x.device)
    for j in range(scales):
        # one filter call for all five moments
        mx, my, exx, eyy, exy = _gauss_filter(torch.cat([x, y, x * x, y * y, x * y]), win).split(n)
        sxx, syy, sxy = exx - mx * mx, eyy - my * my, exy - mx * my
        cs = (2 * sxy + c2) / (sxx + syy + c2)
        if j < scales - 1:
            out = out * F.relu(cs.flatten(1).double().mean(1)) ** w[j]
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
        else:
            lum = (2 * mx * my + c1) / (mx * mx + my * my + c1)
            out = out * F.relu((lum * cs).flatten(1).double().mean(1)) ** w[j]
    return out


@torch.no_grad()
def mean_pairwise_ms_ssim(images: torch.Tensor, n_pairs: int = 500, seed: int = 0,
                          batch_size: int = 64) -> float:
    """Diversity: mean :func:`ms_ssim` over ``n_pairs`` distinct unordered pairs (i != j)
    drawn with numpy ``default_rng(seed)`` (all pairs if there are fewer). Lower means
    more diverse; identical images give 1."""
    n = len(images)
    if n < 2:
        raise ValueError("need at least 2 images")
    total = n * (n - 1) // 2
    if total <= n_pairs:
        pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    else:
        rng = np.random.default_rng(seed)
        seen, pairs = set(), []
        while len(pairs) < n_pairs:
            i, j = sorted(int(v) for v in rng.choice(n, 2, replace=False))
            if (i, j) not in seen:
                seen.add((i, j))
                pairs.append((i, j))
    idx = torch.tensor(pairs, dtype=torch.long)
    vals = []
    for k in range(0, len(idx), batch_size):
        ii, jj = idx[k:k + batch_size, 0], idx[k:k + batch_size, 1]
        vals.append(ms_ssim(images[ii.to(images.device)], images[jj.to(images.device)]).cpu())
    return float(torch.cat(vals).mean())


@torch.no_grad()
def nearest_neighbour_ssim(samples: torch.Tensor, reference: torch.Tensor, candidates: int = 8,
                           chunk: int = 1024) -> torch.Tensor:
    """Memorisation check: for each sample, the highest :func:`ssim_per_image` SSIM to any
    slice of ``reference``. The search is approximate: the ``candidates`` references
    nearest in L2 distance between 4x average-pooled (clipped) images are found first
    (chunked, on the tensors' device), then exact skimage SSIM is computed on those only
    and the max taken. Returns an (N,) float64 CPU tensor."""
    return nearest_neighbours(samples, reference, candidates, chunk)[0]


@torch.no_grad()
def nearest_neighbours(samples: torch.Tensor, reference: torch.Tensor, candidates: int = 8,
                       chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(SSIM, index into ``reference``) of each sample's nearest reference slice, found as in
    :func:`nearest_neighbour_ssim`. ``reference`` may be a uint8 split: it is made float a chunk at a time."""
    if samples.shape[1:] != reference.shape[1:]:
        raise ValueError("samples and reference must have the same C x H x W")
    dev = samples.device
    k = min(candidates, len(reference))
    factor = 4 if min(samples.shape[-2:]) >= 8 else 1
    s = F.avg_pool2d(_clip(samples), factor).flatten(1)
    s_sq = (s * s).sum(1, keepdim=True)
    dists = []
    for i in range(0, len(reference), chunk):
        r = F.avg_pool2d(_clip(reference[i:i + chunk]), factor).flatten(1).to(dev)
        dists.append(s_sq + (r * r).sum(1)[None] - 2.0 * s @ r.T)
    top = torch.cat(dists, 1).topk(k, dim=1, largest=False).indices.cpu()  # N x k
    cand = _np_images(reference[top.flatten().to(reference.device)])
    smp = np.repeat(_np_images(samples), k, axis=0)
    best, which = torch.from_numpy(_ssim_pairs(smp, cand).reshape(-1, k)).max(1)
    return best, top.gather(1, which[:, None])[:, 0]


def code_histogram_distance(idx_a: torch.Tensor, idx_b: torch.Tensor, num_codes: int) -> float:
    """Jensen-Shannon divergence (base 2, so in [0, 1]) between the code-frequency
    histograms of two integer index tensors of any shape:
    ``JS(p, q) = KL(p || m)/2 + KL(q || m)/2`` with ``m = (p + q)/2``. 0 for identical
    histograms, 1 for disjoint supports."""
    def hist(idx):
        idx = torch.as_tensor(idx).flatten().long().cpu()
        if len(idx) == 0 or idx.min() < 0 or idx.max() >= num_codes:
            raise ValueError("indices must be non-empty and in [0, num_codes)")
        h = torch.bincount(idx, minlength=num_codes).double()
        return h / h.sum()

    p, q = hist(idx_a), hist(idx_b)
    m = (p + q) / 2

    def kl(u):
        nz = u > 0
        return (u[nz] * torch.log2(u[nz] / m[nz])).sum()

    return float((0.5 * kl(p) + 0.5 * kl(q)).clamp(0.0, 1.0))


# ----------------------------------------------------------------------------- the judge

class _JudgeNet(torch.nn.Module):
    """Small CNN for the two-sample test: per scale a strided 3x3 conv and a second 3x3 conv, down to <= 8 px, then each
    feature's mean and standard deviation over the slice and a logit: it scores what is common to a slice's texture and
    layout, not where one bright pixel sits. The second conv per scale, and a leaky slope of 0.01 rather than 0.2, are
    what let it see a missing folded rim or ventricles in as many steps (README, the judge's calibration); the slope is
    not 0, because a network of plain ReLUs can die into a constant output, which scores exactly 0.5 ("cannot tell them
    apart") for any pair (seen at 128 px). It also tells a few people from a few others, which is why its reference is a
    training draw, not validation.

    No normalisation layers: a batch statistic shared by both classes would leak labels between items."""

    def __init__(self, size: int, width: int = 16):
        super().__init__()
        layers, c_in, c = [], 1, width
        while size > 8:
            layers += [torch.nn.Conv2d(c_in, c, 3, stride=2, padding=1), torch.nn.LeakyReLU(0.01, inplace=True),
                       torch.nn.Conv2d(c, c, 3, padding=1), torch.nn.LeakyReLU(0.01, inplace=True)]
            c_in, c, size = c, min(2 * c, 4 * width), size // 2
        self.features = torch.nn.Sequential(*layers)
        self.head = torch.nn.Linear(2 * c_in, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x.contiguous(memory_format=torch.channels_last) * 2 - 1)
        # Each feature's mean and its spread over the slice: speckle barely moves a feature's mean but raises its
        # spread from the first step, so the classifier need not first grow a texture detector from a mean alone
        # (with the mean only, it sat at chance for 500-1500+ steps, and 1000 steps caught speckle or not by seed).
        return self.head(torch.cat([h.mean((2, 3)), h.float().std((2, 3)).to(h.dtype)], 1)).flatten()


def _halves(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Contiguous halves, not a shuffle: real splits are ordered by person, and a person's neighbouring
    # slices on both sides of the split would let the classifier recognise people instead of realism.
    return torch.arange(n // 2), torch.arange(n // 2, 2 * (n // 2))


def _jitter(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A random shift (up to 1/16 of the side, wrapping round) and left-right flip of the whole batch. Without
    it the classifier memorises the training half's individual slices (100% on them) and learns little that
    carries over to the held-out half; shifted and mirrored slices leave it only what every slice shares."""
    reach = max(1, x.shape[-1] // 16)
    dy, dx = torch.randint(-reach, reach + 1, (2,), generator=g).tolist()
    x = torch.roll(x, (dy, dx), dims=(2, 3))
    return x.flip(3) if torch.rand((), generator=g) < 0.5 else x


def _judge_net(size: int, seed: int, device) -> _JudgeNet:
    """A fresh classifier whose initial weights depend on `seed` alone (the global generator is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _JudgeNet(size).to(device, memory_format=torch.channels_last)


def _c2st_once(net: _JudgeNet, a: torch.Tensor, b: torch.Tensor, seed: int, steps: int, batch_size: int, lr: float,
               bf16: bool) -> tuple:
    """One classifier, trained on one half of each set: (AUC, accuracy at logit 0) on the other halves."""
    first, second = _halves(len(a))
    fit, held = (first, second) if seed % 2 == 0 else (second, first)  # odd seeds swap the halves
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr, fused=a.device.type in ("cpu", "cuda"))
    x = torch.cat([a[fit], b[fit]])
    y = torch.cat([torch.zeros(len(fit)), torch.ones(len(fit))]).to(a.device)
    mixed = torch.autocast(a.device.type, torch.bfloat16, enabled=bf16)
    with torch.enable_grad():  # grad mode is per thread: a worker thread does not inherit the caller's
        for _ in range(steps):
            pick = torch.randint(len(x), (min(batch_size, len(x)),), generator=g).to(a.device)
            with mixed:
                logits = net(_jitter(x[pick], g))
            loss = F.binary_cross_entropy_with_logits(logits, y[pick])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():  # scored in float32: bf16 logits (8-bit mantissa) tie often, and ties read as AUC 0.5
        score_a, score_b = net(a[held]).cpu(), net(b[held]).cpu()
    accuracy = float(torch.cat([score_a <= 0, score_b > 0]).float().mean())
    return auc(score_b, score_a), accuracy


def _side_by_side(jobs: list, device: torch.device) -> list:
    """The results of independent callables, in order. On CPU each runs on one thread, as many at once as the
    process has threads: a small classifier's ops are too small to share well between cores (a second thread
    shortens its step by about a fifth), while separate classifiers keep every core busy. One thread per
    classifier also makes its result the same whatever the machine's thread count. On an accelerator they run
    one after another."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        return [job() for job in jobs]

    def single_threaded(job):
        torch.set_num_threads(1)  # process-wide, and read per thread: each worker sets it before its first op
        return job()

    try:
        with ThreadPoolExecutor(min(threads, len(jobs))) as pool:
            return list(pool.map(single_threaded, jobs))
    finally:
        torch.set_num_threads(threads)


def auc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties counting half."""
    diff = positive.double()[:, None] - negative.double()[None, :]
    return float((diff > 0).double().mean() + 0.5 * (diff == 0).double().mean())


def c2st(a: torch.Tensor, b: torch.Tensor, seeds: int = 3, steps: int = 1000, batch_size: int = 32,
         lr: float = 5e-4, max_size: int = 128, bf16: bool = False) -> dict:
    """Classifier two-sample test: how well a small CNN tells set ``a`` from set ``b`` (N x 1 x H x W).

    Both sets are cut to the same size n (the first n of each) and into contiguous halves; a fresh
    :class:`_JudgeNet` is trained for ``steps`` Adam steps on randomly shifted and mirrored batches from one
    half of each (balanced, labels 0/1) and scored on the other halves. Real splits are ordered by person, so
    the halves hold different people: the judge must tell realism, not recognise people. Odd seeds swap the
    halves, so every item is held out at least once. Images larger than ``max_size`` are average-pooled down
    to it (fine texture at the code-grid scale survives a 2x pool).

    The score is the held-out AUC, P(a held-out ``b`` item scores above a held-out ``a`` item): 0.5 means the
    sets cannot be told apart, 1.0 that they always can. Not the accuracy at logit 0, which is also returned:
    the held-out people differ from the training half's, and a classifier that ranks every generated slice
    above every real one can still have all its held-out scores shifted across 0 by who those people are,
    which made accuracy swing between seeds on real-vs-real and understate how clearly fakes were told.
    ``bf16`` trains under bfloat16 autocast (channels-last either way; held-out scores are always float32):
    on hardware with fast bf16 it is about twice as fast; the scores then differ from float32's by a little more
    than rounding.
    Returns {"auc": mean over ``seeds`` runs, "accuracy", "std" (of the AUC), "runs" (AUCs), "n"}.
    Deterministic for given inputs and precision; on CPU also whatever the thread count (each classifier runs on
    one thread, several side by side).
    """
    return c2st_pairs([(a, b)], seeds, steps, batch_size, lr, max_size, bf16)[0]


def c2st_pairs(pairs: list, seeds: int = 3, steps: int = 1000, batch_size: int = 32, lr: float = 5e-4,
               max_size: int = 128, bf16: bool = False) -> list[dict]:
    """:func:`c2st` of each pair (a, b) in ``pairs``, every pair's classifiers side by side: on CPU two tests
    of three seeds keep two cores busy for three rounds, where one test at a time leaves a core idle in every
    second round. The results are the same as one :func:`c2st` per pair."""
    tests = [_judge_sets(a, b, max_size) for a, b in pairs]
    nets = [_judge_net(a.shape[-1], s, a.device) for a, _ in tests for s in range(seeds)]  # seeding: not thread-safe
    jobs = [functools.partial(_c2st_once, nets[i * seeds + s], a, b, s, steps, batch_size, lr, bf16)
            for i, (a, b) in enumerate(tests) for s in range(seeds)]
    runs = _side_by_side(jobs, tests[0][0].device)
    return [_c2st_summary(runs[i * seeds:(i + 1) * seeds], len(a)) for i, (a, _) in enumerate(tests)]


def _judge_sets(a: torch.Tensor, b: torch.Tensor, max_size: int) -> tuple:
    """Both sets cut to the same size, clipped to [0, 1] on a's device, and average-pooled to at most max_size."""
    n = min(len(a), len(b))
    if n < 4:
        raise ValueError("need at least 4 images per set")
    a, b = _clip(a[:n]), _clip(b[:n]).to(a.device)
    while a.shape[-1] > max_size:
        a, b = F.avg_pool2d(a, 2), F.avg_pool2d(b, 2)
    return a, b


def _c2st_summary(runs: list, n: int) -> dict:
    t = torch.tensor([r[0] for r in runs], dtype=torch.float64)
    return {"auc": float(t.mean()), "accuracy": sum(r[1] for r in runs) / len(runs),
            "std": float(t.std()) if len(runs) > 1 else 0.0, "runs": t.tolist(), "n": n}
