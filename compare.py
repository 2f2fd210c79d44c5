"""Compare generators on ONE frozen VQ-VAE of a finished run: train each, measure each, print one table.

    python compare.py runs/001-quick-builtin gan:wgan-gp-latent gan:wgan-gp gan:hinge-r1 gan:report --gan-epochs 120
    python compare.py runs/001-quick-builtin maskgit pixelcnn

Every variant, and the judge, take this version's settings for the run's preset (not the run's own), so that
one table compares this version's generators on the run's VQ-VAE, and tables of different runs compare.

A variant is a prior name (config.PRIORS), for the GAN optionally with a recipe (config.GAN_RECIPES). Each
trains into RUN/compare/<variant>/ on the run's VQ-VAE and data (resumable: a finished variant is only measured
again), then is measured as driver.py measures its priors (evaluate.generation_metrics: Frechet distance,
MS-SSIM diversity, nearest-training SSIM, the judge against real slices and against reconstructions, each next
to its real-vs-real reference), with the seconds of training steps (from each epoch's rate, so a resumed
variant counts all its epochs; per-epoch evaluation excluded) and the seconds to sample 64 maps. Writes
RUN/compare/<variant>/metrics.json and a sample grid, and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path


import figures
from config import DEFAULT_GAN_RECIPE, GAN_RECIPES, PRIORS, gan_recipe, preset
from dataset import ensure_builtin, load_splits
from evaluate import decode_indices, generation_metrics, load_vqvae, real_reference, sample_codes, samples_to_draw
from runs import RunError, at_least, find_run, parse_device, use_bf16, write_json
from train import train_prior

COLUMNS = ("frechet_distance", "ms_ssim", "nn_ssim", "c2st", "c2st_recon")


def parse_variant(text: str) -> tuple[str, str | None]:
    name, _, recipe = text.partition(":")
    if name not in PRIORS or (recipe and (name != "gan" or recipe not in GAN_RECIPES)):
        raise argparse.ArgumentTypeError(f"{text!r}: use a prior ({', '.join(PRIORS)}) or gan:RECIPE "
                                         f"({', '.join(GAN_RECIPES)})")
    return name, recipe or None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, help="a finished driver.py run (its best VQ-VAE is used, frozen)")
    p.add_argument("variants", nargs="+", type=parse_variant, metavar="VARIANT",
                   help="prior or gan:RECIPE, e.g. maskgit pixelcnn gan:wgan-gp-latent gan:wgan-gp gan:report")
    p.add_argument("--gan-epochs", type=at_least(1), help="GAN epochs for every GAN variant (default: the run's)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    return p.parse_args(argv)


def variant_config(cfg, name: str, recipe: str | None, gan_epochs: int | None):
    cfg = dataclasses.replace(cfg, prior=name)
    if name == "gan":
        cfg.gan = gan_recipe(recipe or DEFAULT_GAN_RECIPE, cfg.gan)
        cfg.gan = dataclasses.replace(cfg.gan, epochs=gan_epochs or cfg.gan.epochs)
    return cfg


def measure(prior, name: str, cfg, vqvae, real: dict, device) -> dict:
    """Generation metrics of `samples_to_draw` samples, and the seconds to sample 64 maps."""
    t = time.perf_counter()
    sample_codes(prior, 64, cfg.seed + 1, device, getattr(cfg, name))
    sample_64_s = time.perf_counter() - t
    idx = sample_codes(prior, samples_to_draw(cfg, len(real["validate"])), cfg.seed, device, getattr(cfg, name))
    samples = decode_indices(vqvae, idx, bf16=use_bf16(device, cfg.runtime.amp))
    return {**generation_metrics(samples, idx, real, cfg.model.num_codes), "sample_64_s": sample_64_s}, samples


def table(rows: dict[str, dict]) -> str:
    first = next(iter(rows.values()))
    head = ["variant", "train s", "sample 64 s", *COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
             "| real reference | | | " + " | ".join(f"{first[c + '_real']:.3f}" for c in COLUMNS) + " |"]
    for label, r in rows.items():
        lines.append(f"| {label} | {r['train_s']:.0f} | {r['sample_64_s']:.1f} | "
                     + " | ".join(f"{r[c]:.3f}" for c in COLUMNS) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    run_dir = find_run(args.run_dir)
    device = parse_device(args.device)
    vqvae, cfg = load_vqvae(run_dir, device)
    # This version's judge and priors at the run's preset, whatever the run trained: a table compares this
    # version's generators on the run's VQ-VAE, and tables of different runs compare with each other.
    fresh = preset(cfg.preset)
    cfg.judge, cfg.gan, cfg.pixelcnn, cfg.maskgit = fresh.judge, fresh.gan, fresh.pixelcnn, fresh.maskgit
    splits = load_splits(cfg.data_dir or ensure_builtin(), cfg.model.image_size)
    real = real_reference(vqvae, splits, cfg.judge, device, use_bf16(device, cfg.runtime.amp))
    rows = {}
    for name, recipe in args.variants:
        label = f"{name}:{recipe}" if recipe else name
        out = run_dir / "compare" / label.replace(":", "-")
        vcfg = variant_config(cfg, name, recipe, args.gan_epochs)
        prior, history = train_prior(name, vcfg, vqvae, splits, out, device, resume=True)
        # Seconds of training steps, from each epoch's rate in the history: the same for a resumed variant.
        train_s = sum(len(splits["train"]) / v["images_per_s"] for v in history["val"])
        result, samples = measure(prior.eval(), name, vcfg, vqvae, real, device)
        rows[label] = {**result, "train_s": train_s}
        write_json(rows[label], out / "metrics.json")
        figures.save_montage(samples[:64], out / "samples.png", f"{label}: 64 samples")
        print(table({label: rows[label]}).splitlines()[-1], flush=True)
    print(table(rows))
    return rows


if __name__ == "__main__":
    try:
        main()
    except RunError as e:
        raise SystemExit(f"error: {e}")
