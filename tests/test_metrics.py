import math
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage.metrics import structural_similarity

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import metrics  # noqa: E402


def blobs(n, size=32, seed=0):
    """Smooth random 'slice-like' images: a bright ellipse with low-frequency texture."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    ab = 0.6 + 0.3 * torch.rand(n, 2, 1, 1, generator=g)
    mask = ((xx / ab[:, 0]) ** 2 + (yy / ab[:, 1]) ** 2 < 1).float()
    tex = F.interpolate(torch.randn(n, 1, 4, 4, generator=g), size=(size, size), mode="bicubic",
                        align_corners=False)[:, 0]
    return (mask * (0.5 + 0.15 * tex)).clamp(0, 1)[:, None]


def blur(x):
    k = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])
    k = (k[:, None] * k[None]) / 256
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), k.view(1, 1, 5, 5))


def noise(n, size=32, seed=1):
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- reconstruction

def test_identical_images_ssim_one_psnr_max():
    x = blobs(4)
    assert torch.allclose(metrics.ssim_per_image(x, x), torch.ones(4, dtype=torch.float64))
    assert metrics.ssim(x, x) == pytest.approx(1.0)
    assert torch.equal(metrics.psnr_per_image(x, x), torch.full((4,), 100.0, dtype=torch.float64))
    assert metrics.psnr(x, x, max_db=60.0) == 60.0


def test_ssim_matches_skimage_and_is_deterministic():
    x, y = blobs(5, 24), noise(5, 24)
    y = (0.7 * x + 0.3 * y)
    ours = metrics.ssim_per_image(x, y)
    ref = [structural_similarity(x[i, 0].double().numpy(), y[i, 0].double().numpy(), data_range=1.0)
           for i in range(5)]
    assert ours.dtype == torch.float64 and ours.shape == (5,)
    np.testing.assert_allclose(ours.numpy(), ref, rtol=0, atol=1e-12)
    assert torch.equal(ours, metrics.ssim_per_image(x, y))


def test_ssim_tiny_images_and_clipping():
    x = noise(2, 5)
    assert metrics.ssim(x, x) == pytest.approx(1.0)
    # out-of-range values are clipped before comparison
    assert metrics.ssim(x + 2.0, torch.ones_like(x)) == pytest.approx(1.0)


def test_psnr_known_value():
    x = torch.full((3, 1, 16, 16), 0.3)
    assert metrics.psnr_per_image(x, x + 0.1).numpy() == pytest.approx([20.0] * 3, abs=1e-5)
    assert metrics.psnr(x, x + 0.01) == pytest.approx(40.0, abs=1e-4)


def test_code_usage_and_perplexity():
    assert metrics.code_usage(torch.tensor([3, 0, 1, 0])) == 0.5
    assert metrics.perplexity(torch.tensor([5, 5, 5, 5])) == pytest.approx(4.0)
    assert metrics.perplexity(torch.tensor([0, 7, 0])) == pytest.approx(1.0)
    assert metrics.perplexity(torch.tensor([1, 1, 0, 0])) == pytest.approx(2.0)


# ---------------------------------------------------------------- generation

def test_slice_features_deterministic_and_shape():
    x = blobs(6, 20)
    a, b = metrics.SliceFeatures()(x), metrics.SliceFeatures()(x)
    assert a.dtype == torch.float64 and a.shape == (6, metrics.SliceFeatures().num_features)
    assert torch.equal(a, b)
    assert torch.allclose(metrics.slice_features(x, batch_size=4), a, atol=1e-6)


@pytest.fixture(scope="module")
def feats():
    real, real2 = blobs(64, 32, 0), blobs(64, 32, 1)
    return {k: metrics.slice_features(v) for k, v in
            dict(real=real, real2=real2, blur=blur(real), noise=noise(64)).items()}


def test_frechet_distance_sanity(feats):
    self_fd = metrics.frechet_distance(feats["real"], feats["real"])
    assert self_fd == pytest.approx(0.0, abs=1e-6)
    same = metrics.frechet_distance(feats["real"], feats["real2"])
    blurred = metrics.frechet_distance(feats["real"], feats["blur"])
    noisy = metrics.frechet_distance(feats["real"], feats["noise"])
    # with 64 samples in 544 dims the finite-sample bias of FD is of the order of a mild
    # blur, so only the blur-vs-self and everything-vs-noise orderings are robust here
    assert self_fd < blurred < noisy
    assert noisy > 10 * max(same, blurred)


def test_kid_sanity(feats):
    m_self, _ = metrics.kernel_inception_distance(feats["real"], feats["real"], subsets=5)
    m_blur, _ = metrics.kernel_inception_distance(feats["real"], feats["blur"], subsets=5)
    m_noise, s_noise = metrics.kernel_inception_distance(feats["real"], feats["noise"], subsets=5,
                                                         subset_size=32)
    assert abs(m_self) < 1e-3 and m_self < m_blur < m_noise and s_noise > 0
    whole, spread = metrics.kernel_inception_distance(feats["real"], feats["noise"])  # subsets = both whole sets
    assert whole > 0 and spread is None
    assert metrics.kernel_inception_distance(feats["real"], feats["noise"], subsets=5, subset_size=32) \
        == (m_noise, s_noise)


def test_ms_ssim():
    x = blobs(4, 32)
    assert torch.allclose(metrics.ms_ssim(x, x), torch.ones(4, dtype=torch.float64), atol=1e-6)
    v = [metrics.ms_ssim(x, (x + s * noise(4, 32) - s / 2)).mean().item() for s in (0.05, 0.2, 0.8)]
    assert 1 > v[0] > v[1] > v[2] >= 0
    assert torch.isfinite(metrics.ms_ssim(noise(3, 8), noise(3, 8, seed=2))).all()


def test_mean_pairwise_ms_ssim():
    same = blobs(1, 32).repeat(6, 1, 1, 1)
    assert metrics.mean_pairwise_ms_ssim(same, n_pairs=10) == pytest.approx(1.0, abs=1e-6)
    assert metrics.mean_pairwise_ms_ssim(noise(10, 32), n_pairs=20) < 0.2


def test_nearest_neighbour_ssim_finds_copy():
    ref = blobs(50, 32, 3)
    samples = torch.cat([ref[[7, 31]], noise(2, 32)])
    nn = metrics.nearest_neighbour_ssim(samples, ref, candidates=4)
    assert nn.shape == (4,)
    assert nn[:2].numpy() == pytest.approx([1.0, 1.0])
    assert (nn[2:] < 0.5).all()
    # the prefilter can only miss the true best match, never exceed it; with every
    # reference as a candidate the search is exact
    exact = metrics.ssim_per_image(samples[2:3].expand(50, -1, -1, -1), ref).max()
    assert nn[2] <= exact
    assert metrics.nearest_neighbour_ssim(samples[2:3], ref, candidates=50)[0] == exact


def test_code_histogram_distance():
    a = torch.randint(0, 8, (4, 5, 5), generator=torch.Generator().manual_seed(0))
    assert metrics.code_histogram_distance(a, a.flip(0), 8) == pytest.approx(0.0, abs=1e-12)
    assert metrics.code_histogram_distance(torch.tensor([0, 1, 1]), torch.tensor([[2, 3]]), 4) \
        == pytest.approx(1.0)
    d = metrics.code_histogram_distance(torch.tensor([0, 1]), torch.tensor([1, 2]), 3)
    assert 0 < d < 1 and math.isfinite(d)


def test_c2st_cannot_tell_two_halves_of_one_set_apart():
    images = blobs(128, seed=0)
    result = metrics.c2st(images[::2], images[1::2], seeds=3, steps=100)
    assert 0.35 <= result["auc"] <= 0.65 and result["n"] == 64 and len(result["runs"]) == 3


@pytest.mark.parametrize("bf16", [False, True])
def test_c2st_tells_slices_from_blank_images(bf16):
    images = blobs(64, seed=1)
    assert metrics.c2st(images, torch.zeros_like(images), seeds=3, steps=100, bf16=bf16)["auc"] >= 0.95


def test_c2st_is_deterministic_for_its_inputs():
    a, b = blobs(32, seed=2), blobs(32, seed=3)
    assert metrics.c2st(a, b, seeds=2, steps=20) == metrics.c2st(a, b, seeds=2, steps=20)


def test_c2st_is_the_same_whatever_the_thread_count_and_grad_mode():
    # 64 px in bf16 for 100 steps: small enough to be quick, large enough that a classifier trained at two threads
    # ends with other scores than at one (smaller images, or float32 for fewer steps, ended the same)
    a, b = blobs(32, 64, seed=2), blobs(32, 64, seed=3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = [metrics.c2st(a, b, seeds=k, steps=100, bf16=True) for k in (1, 2)]
        torch.set_num_threads(2)
        with torch.no_grad():  # evaluation calls it so; its classifiers train on worker threads all the same
            two = [metrics.c2st(a, b, seeds=k, steps=100, bf16=True) for k in (1, 2)]  # one classifier: one thread
        assert torch.get_num_threads() == 2  # given back as it was
    finally:
        torch.set_num_threads(threads)
    assert one == two


def test_c2st_pairs_is_one_c2st_per_pair():
    a, b, c = blobs(32, seed=2), blobs(32, seed=3), blobs(24, seed=4)
    assert metrics.c2st_pairs([(a, b), (c, a)], seeds=3, steps=20) == \
        [metrics.c2st(a, b, seeds=3, steps=20), metrics.c2st(c, a, seeds=3, steps=20)]


def test_auc_by_hand():
    assert metrics.auc(torch.tensor([3.0, 4.0]), torch.tensor([1.0, 2.0])) == 1.0
    assert metrics.auc(torch.tensor([1.0, 4.0]), torch.tensor([2.0, 3.0])) == 0.5
    assert metrics.auc(torch.tensor([2.0]), torch.tensor([2.0, 1.0])) == 0.75  # a tie counts half


def test_nearest_neighbours_take_a_uint8_split_as_it_is_cached():
    g = torch.Generator().manual_seed(0)
    split = torch.randint(0, 256, (12, 1, 16, 16), generator=g, dtype=torch.uint8)
    samples = split[[3, 7]].float() / 255
    ssim_u8, idx_u8 = metrics.nearest_neighbours(samples, split)
    ssim_f, idx_f = metrics.nearest_neighbours(samples, split.float() / 255)
    assert idx_u8.tolist() == idx_f.tolist() == [3, 7] and torch.allclose(ssim_u8, ssim_f)
