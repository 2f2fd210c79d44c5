"""Measuring: trained models rebuilt from a run, whole-split reconstruction metrics, sampling from any
prior, generation metrics with the judge, and a run's metrics.json content. No figures, no CLI.

Splits arrive as uint8 N x 1 x H x W tensors (on any device) and are processed in batches on `device`.
"""
from __future__ import annotations

import dataclasses
import itertools

import torch
from tqdm import tqdm

import metrics
from config import PRIORS, Config
from dataset import Split, batches, to_float
from modules import VQVAE, build_prior
from runs import (RunError, autocast, checkpoint_config, checkpoint_path, find_run, load_checkpoint, load_state,
                  use_bf16)


def evenly(images: torch.Tensor, n: int) -> torch.Tensor:
    """n items spread evenly over a split (its slices are ordered by case and position)."""
    return images[torch.linspace(0, len(images) - 1, min(n, len(images))).long()]


# Slices per encoder pass when a whole split is encoded. The quantizer's fp32 distance matrix (positions x K)
# grows with the batch: 256 slices at the paper preset's 64x64 grid and K=512 make a 2 GB matrix, 64 a quarter
# of that, for the same indices and no loss of speed (bench in EXPERIMENTS.md).
ENCODE_BATCH = 64


@torch.no_grad()
def encode_split(vqvae, images_u8, batch_size: int, device, bf16: bool = False, mirror: bool = False) -> torch.Tensor:
    """Code-index maps of a whole split, N x h x w on `device`: int16 while K allows, to keep them small.
    mirror: the maps of the slices' left-right mirror images instead (each batch flipped, not the split)."""
    dtype = torch.int16 if vqvae.cfg.num_codes <= torch.iinfo(torch.int16).max else torch.int32
    out = []
    for x in batches(images_u8, batch_size):
        x = x.flip(-1) if mirror else x
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


def reconstructions(vqvae, images_u8, device, bf16: bool = False) -> torch.Tensor:
    """The VQ-VAE's reconstructions of a whole split, N x 1 x H x W float."""
    return torch.cat([rec for _, rec, _ in reconstruct(vqvae, images_u8, 64, device, bf16)])


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


def sample_codes(prior, n: int, seed: int, device, settings) -> torch.Tensor:
    """n index maps from any prior with its config section's sampler settings, deterministic for a seed."""
    return prior.sample(n, torch.Generator().manual_seed(seed), device=device, **settings.sampling())


def fingerprint(vqvae) -> list[float]:
    """A few numbers that change whenever the codebook does: a prior is only valid for its own VQ-VAE."""
    codes = vqvae.quantizer.codebook.detach().double().cpu()
    return [float(codes.sum()), float(codes.abs().sum()), float(codes[::7].pow(2).sum())]


# ---------------------------------------------------------------- a run's models

def load_vqvae(run_dir, device="cpu", which: str = "best") -> tuple[VQVAE, Config]:
    """The run's VQ-VAE rebuilt from its checkpoint alone, in eval mode, with the checkpoint's config."""
    run_dir = find_run(run_dir)
    path = checkpoint_path(run_dir, "vqvae", which)
    if not path.is_file():
        path = checkpoint_path(run_dir, "vqvae")
    ckpt = load_checkpoint(path)
    cfg = checkpoint_config(ckpt, path)
    model = VQVAE(cfg.model)
    load_state(model, ckpt["models"]["vqvae"], path)
    return model.to(device).eval(), cfg


def trained_priors(run_dir) -> list[str]:
    return [name for name in PRIORS if checkpoint_path(run_dir, name).is_file()]


def load_prior(run_dir, name: str, vqvae, device="cpu"):
    """The run's prior `name` rebuilt from its checkpoint alone, in eval mode, with the config it was trained
    with; refused in one line when it was trained on another VQ-VAE than `vqvae` (its codes would mean nothing)."""
    run_dir = find_run(run_dir)
    path = checkpoint_path(run_dir, name)
    if not path.is_file():
        raise RunError(f"{run_dir}: no {name} prior in this run ({path.name} missing; trained: "
                       f"{', '.join(trained_priors(run_dir)) or 'none'})")
    ckpt = load_checkpoint(path)
    if ckpt["state"].get("vqvae") != fingerprint(vqvae):
        raise RunError(f"{path}: trained on another VQ-VAE than {run_dir}'s (copied from another run?); "
                       f"retrain it with driver.py --resume --run-dir {run_dir} --prior {name}")
    cfg = checkpoint_config(ckpt, path)
    prior = build_prior(name, cfg)
    load_state(prior, ckpt["models"]["prior"], path)
    return prior.to(device).eval(), cfg


# ---------------------------------------------------------------- generation

def judge_settings(judge, bf16: bool) -> dict:
    """metrics.c2st's keyword arguments: the config's JudgeConfig fields, and the run's precision."""
    return {**dataclasses.asdict(judge), "bf16": bf16}


def training_draw(images_u8: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """`n` training slices drawn at random across the whole split (seeded): what a generator that samples the
    training distribution perfectly would hand the judge, many people mixed as in generated sets."""
    g = torch.Generator().manual_seed(seed)
    return images_u8[torch.randperm(len(images_u8), generator=g)[:n]]


def real_reference(vqvae, splits: dict[str, Split], judge, device, bf16: bool) -> dict:
    """What generated slices are compared with: float CPU slices of validation and test, the training split,
    the test split's index maps, the VQ-VAE's reconstructions of validation and test, and the judge's
    real-vs-real scores.

    The judge's reference is a random draw of training slices against the test split (and the same slices'
    reconstructions against the test reconstructions), not validation against test: generated sets mix many
    people, as a training draw does, while the validation split is a few people whose differences from the
    test split's few the classifier learns and, on the held-out halves' other people, reads backwards (on
    six people a side, validation-vs-test scored 0.17, far from its 0.5: README, the judge)."""
    real = {s: to_float(splits[s].images) for s in ("validate", "test")}
    real["train"] = splits["train"].images  # uint8: the nearest-slice search makes a chunk float at a time
    real["test_idx"] = encode_split(vqvae, splits["test"].images, ENCODE_BATCH, device, bf16)
    for s in ("validate", "test"):
        real[f"{s}_recon"] = reconstructions(vqvae, splits[s].images, device, bf16)
    draw = training_draw(splits["train"].images, len(splits["test"]))
    real["judge"] = judge_settings(judge, bf16)
    as_real, as_recon = metrics.c2st_pairs([(to_float(draw), real["test"]),
                                            (reconstructions(vqvae, draw, device, bf16), real["test_recon"])],
                                           **real["judge"])
    real["c2st_real"], real["c2st_recon_real"] = as_real["auc"], as_recon["auc"]
    return real


def generation_metrics(samples: torch.Tensor, sample_idx: torch.Tensor, real: dict, num_codes: int) -> dict:
    """Generated slices against real ones, next to the same figure for real slices as the reference.

    `real` is `real_reference`'s dict. The judge (C2ST) compares samples with the real test slices and with
    the VQ-VAE's reconstructions of them (the decoder's blur then shared, it measures the prior alone), each
    next to the same test on a random draw of training slices (`real_reference`).
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
    vs_real, vs_recon = metrics.c2st_pairs([(samples, real["test"]), (samples, real["test_recon"])], **real["judge"])
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
        "c2st": vs_real["auc"],
        "c2st_real": real["c2st_real"],
        "c2st_recon": vs_recon["auc"],
        "c2st_recon_real": real["c2st_recon_real"],
        "n_samples": n,
    }


def samples_to_draw(cfg: Config, n_validate: int) -> int:
    """How many samples the generation metrics and the judge use: the run's `n_samples`, at most as many as there
    are validation slices (generation_metrics and tune compare sets of equal size, so more would go unused)."""
    return min(cfg.n_samples, n_validate)


@torch.no_grad()
def evaluate_run(vqvae, cfg: Config, splits: dict[str, Split], priors: dict, device) -> tuple[dict, dict]:
    """metrics.json's measurements, and what the figures show: test and validation reconstruction metrics, and
    for each prior in `priors` ({name: model}) `samples_to_draw` samples with the generation metrics.
    Returns (results, samples {name: (slices, index maps)})."""
    bf16 = use_bf16(device, cfg.runtime.amp)
    n = samples_to_draw(cfg, len(splits["validate"]))
    # Minutes on a CPU, most of them the judge's classifiers (two for the real reference, two per prior): a bar
    # that names the part under way.
    with tqdm(total=1 + 2 * len(priors) + bool(priors), desc="evaluation", unit="part", leave=False) as bar:
        bar.set_postfix_str("reconstructions")
        results = {s: evaluate_vqvae(vqvae, splits[s].images, 64, device, bf16) for s in ("test", "validate")}
        bar.update()
        samples = {}
        for name, prior in priors.items():
            bar.set_postfix_str(f"{n} {name} samples")
            samples.update(sample_priors(vqvae, cfg, {name: prior}, device, n))
            bar.update()
        if priors:
            bar.set_postfix_str("the judge on real slices")
            real = real_reference(vqvae, splits, cfg.judge, device, bf16)
            bar.update()
        for name in priors:
            bar.set_postfix_str(f"the judge on {name} samples")
            results[f"generation_{name}"] = generation_metrics(*samples[name], real, cfg.model.num_codes)
            bar.update()
    if cfg.prior in samples:
        results["generation"] = results[f"generation_{cfg.prior}"]
    return results, samples


def tune_sampling(prior, name: str, vqvae, cfg: Config, splits: dict[str, Split], grid: dict[str, list],
                  device) -> list[dict]:
    """Judge every combination of the sampling settings in `grid` ({setting: values}) on the VALIDATION split,
    never the test split: `samples_to_draw` samples against the VQ-VAE's reconstructions of the validation
    slices (the prior alone), with MS-SSIM diversity beside it. Returns one row per combination,
    {**settings, "c2st_recon_val", "ms_ssim", "ms_ssim_real"}, best first (`rank_settings`)."""
    bf16 = use_bf16(device, cfg.runtime.amp)
    recon = reconstructions(vqvae, splits["validate"].images, device, bf16)
    judge = judge_settings(cfg.judge, bf16)
    diversity_real = metrics.mean_pairwise_ms_ssim(recon)
    combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]

    def drawn(settings: dict) -> torch.Tensor:
        part = dataclasses.replace(getattr(cfg, name), **settings)
        return decode_indices(vqvae, sample_codes(prior, samples_to_draw(cfg, len(recon)), cfg.seed, device, part),
                              bf16=bf16)

    rows = []
    # Two settings judged together, as the evaluation judges its two tests (metrics.c2st_pairs: on CPU their
    # classifiers keep every core busy); two at a time, so that only two settings' samples are held at once.
    for i in range(0, len(combos), 2):
        pair = combos[i:i + 2]
        samples = [drawn(settings) for settings in pair]
        judged = metrics.c2st_pairs([(s, recon) for s in samples], **judge)
        rows += [{**settings, "c2st_recon_val": j["auc"], "ms_ssim": metrics.mean_pairwise_ms_ssim(s),
                  "ms_ssim_real": diversity_real} for settings, s, j in zip(pair, samples, judged)]
    return rank_settings(rows)


def rank_settings(rows: list[dict], band: float = 0.05) -> list[dict]:
    """Best first: the lowest judge score among the rows whose MS-SSIM diversity is within `band` of the real
    slices' own, then the rest. Both ways: a sampler that repeats one likely map is less diverse than real
    slices and may fool a per-slice judge; one that draws noise is more diverse than they are."""
    return sorted(rows, key=lambda r: (abs(r["ms_ssim"] - r["ms_ssim_real"]) > band, r["c2st_recon_val"]))


def sample_priors(vqvae, cfg: Config, priors: dict, device, n: int | None = None) -> dict:
    """{name: (slices, index maps)}: n (default `cfg.n_samples`) new slices from each prior, with the run's seed."""
    bf16 = use_bf16(device, cfg.runtime.amp)
    samples = {}
    for name, prior in priors.items():
        idx = sample_codes(prior, n or cfg.n_samples, cfg.seed, device, getattr(cfg, name))
        samples[name] = (decode_indices(vqvae, idx, bf16=bf16), idx)
    return samples


def nearest_training(samples: dict, splits: dict[str, Split], n: int = 8) -> dict:
    """{prior: (SSIM, slice) of the nearest training slice of each of its first n samples}, for the
    memorisation figure; `samples` is `sample_priors`'s dict. The training split stays uint8 (a float copy of an
    OASIS-size split at 256 px would be 2.5 GB): the search makes one chunk float at a time."""
    nearest = {}
    for name, (images, _) in samples.items():
        ssim, index = metrics.nearest_neighbours(images[:n], splits["train"].images)
        nearest[name] = (ssim, to_float(splits["train"].images[index]))
    return nearest


def reconstruction_example(vqvae, cfg: Config, splits: dict[str, Split], device, n: int = 8):
    """(originals, reconstructions, index maps) of n test slices spread over the split, for the figures."""
    return next(reconstruct(vqvae, evenly(splits["test"].images, n), n, device, use_bf16(device, cfg.runtime.amp)))
