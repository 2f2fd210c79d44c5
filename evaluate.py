"""Inference over whole splits, shared by training and prediction: encode, reconstruct, sample, measure.

Splits arrive as uint8 N x 1 x H x W tensors (on any device) and are processed in batches on `device`.
"""
from __future__ import annotations

import torch

import metrics
from dataset import batches
from runs import autocast


def evenly(images: torch.Tensor, n: int) -> torch.Tensor:
    """n items spread evenly over a split (its slices are ordered by case and position)."""
    return images[torch.linspace(0, len(images) - 1, min(n, len(images))).long()]


@torch.no_grad()
def encode_split(vqvae, images_u8, batch_size: int, device, bf16: bool = False) -> torch.Tensor:
    """Code-index maps of a whole split, N x h x w on `device`: int16 while K allows, to keep them small."""
    dtype = torch.int16 if vqvae.cfg.num_codes <= torch.iinfo(torch.int16).max else torch.int32
    out = []
    for x in batches(images_u8, batch_size):
        with autocast(device, bf16):
            out.append(vqvae.encode_indices(x.to(device, non_blocking=True)).to(dtype))
    return torch.cat(out)


@torch.no_grad()
def reconstruct(vqvae, images_u8, batch_size: int, device, bf16: bool = False):
    """Yields (original, reconstruction clipped to [0, 1], index map) batches, originals and recons on CPU."""
    for x in batches(images_u8, batch_size):
        x = x.to(device, non_blocking=True)
        with autocast(device, bf16):
            recon, _, idx = vqvae(x)
        yield x.cpu(), recon.float().clamp_(0, 1).cpu(), idx


@torch.no_grad()
def evaluate_vqvae(vqvae, images_u8, batch_size: int, device, bf16: bool = False) -> dict:
    """Whole-split reconstruction metrics: MSE, SSIM and PSNR per image averaged, code usage and perplexity."""
    was_training = vqvae.training
    vqvae.eval()
    ssim, psnr, sq_err = [], [], []
    counts = torch.zeros(vqvae.cfg.num_codes, dtype=torch.long, device=device)
    for x, recon, idx in reconstruct(vqvae, images_u8, batch_size, device, bf16):
        ssim.append(metrics.ssim_per_image(recon, x))
        psnr.append(metrics.psnr_per_image(recon, x))
        sq_err.append((recon - x).pow(2).flatten(1).mean(1))
        counts += torch.bincount(idx.flatten(), minlength=len(counts))
    vqvae.train(was_training)
    return {
        "mse": float(torch.cat(sq_err).mean()),
        "ssim": float(torch.cat(ssim).mean()),
        "psnr": float(torch.cat(psnr).mean()),
        "codebook_usage": metrics.code_usage(counts.cpu()),
        "perplexity": metrics.perplexity(counts.cpu()),
        "n_images": len(images_u8),
    }


@torch.no_grad()
def decode_indices(vqvae, indices: torch.Tensor, batch_size: int = 64, bf16: bool = False) -> torch.Tensor:
    """Index maps -> slices in [0, 1] on CPU."""
    device = indices.device
    out = []
    for start in range(0, len(indices), batch_size):
        with autocast(device, bf16):
            out.append(vqvae.decode_indices(indices[start:start + batch_size].long()).float().clamp_(0, 1).cpu())
    return torch.cat(out)


def fixed_noise(n: int, dim: int, seed: int, device) -> torch.Tensor:
    """Normal noise drawn on the CPU from its own generator: the same samples on any device."""
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)).to(device)


@torch.no_grad()
def sample_gan(generator, vqvae, noise: torch.Tensor) -> torch.Tensor:
    was_training = generator.training
    generator.eval()
    _, idx = generator(noise, vqvae.quantizer)
    generator.train(was_training)
    return idx


def sample_codes(prior, vqvae, n: int, seed: int, device, cfg) -> torch.Tensor:
    """n index maps from either prior, deterministic for a seed."""
    if cfg.prior.kind == "pixelcnn":
        return prior.sample(n, generator=torch.Generator().manual_seed(seed), temperature=cfg.prior.temperature,
                            top_k=cfg.prior.top_k, device=device)
    return sample_gan(prior, vqvae, fixed_noise(n, cfg.gan.noise_dim, seed, device))


def generation_metrics(samples: torch.Tensor, sample_idx: torch.Tensor, real: dict, num_codes: int) -> dict:
    """Generated slices against real ones, next to the same figure for real test slices as the reference.

    `real` holds float CPU slices `test`, `validate`, `train` and the test split's index maps `test_idx`.
    The real reference uses as many validation slices as there are samples, evenly spread over the split,
    because the Frechet distance is biased upwards for small sets: like is compared with like.
    """
    n = min(len(samples), len(real["validate"]))  # the Frechet bias depends on n: compare equal-sized sets
    samples, sample_idx = samples[:n], sample_idx[:n]
    val_subset = evenly(real["validate"], n)
    test_subset = evenly(real["test"], n)
    f_gen = metrics.slice_features(samples)
    f_test = metrics.slice_features(real["test"])
    f_val = metrics.slice_features(val_subset)
    kid, kid_std = metrics.kernel_inception_distance(f_gen, f_test)
    kid_real, _ = metrics.kernel_inception_distance(f_val, f_test)
    return {
        "frechet_distance": metrics.frechet_distance(f_gen, f_test),
        "frechet_distance_real": metrics.frechet_distance(f_val, f_test),
        "kid": kid,
        "kid_std": kid_std,  # None when both sets were used whole: nothing to vary
        "kid_real": kid_real,
        "ms_ssim": metrics.mean_pairwise_ms_ssim(samples),
        "ms_ssim_real": metrics.mean_pairwise_ms_ssim(test_subset),
        "nn_ssim": float(metrics.nearest_neighbour_ssim(samples, real["train"]).mean()),
        "nn_ssim_real": float(metrics.nearest_neighbour_ssim(test_subset, real["train"]).mean()),
        "code_js": metrics.code_histogram_distance(sample_idx.cpu(), real["test_idx"].cpu(), num_codes),
        "n_samples": n,
    }
