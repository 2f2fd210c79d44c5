"""Use a trained run: evaluate, reconstruct, generate, redraw figures. Works on any device, whatever it was trained on.

    python predict.py evaluate    --run RUN [--split test | --images DIR] [--out m.json]
    python predict.py reconstruct --run RUN --images DIR --out OUT
    python predict.py generate    --run RUN --n 16 --out OUT [--seed S] [--prior gan|pixelcnn]
    python predict.py figures     --run RUN
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import figures
import metrics
from config import Config
from dataset import DataError, ensure_builtin, load_folder, load_split, load_splits, to_float
from evaluate import decode_indices, encode_split, evaluate_vqvae, evenly, generation_metrics, reconstruct, sample_codes
from runs import (PRIOR_FILES, RunError, at_least, find_run, keep_freed_host_memory, load_checkpoint, load_prior,
                  load_vqvae, pick_device, use_bf16, write_json)

PRIORS = ("gan", "pixelcnn")


# ---------------------------------------------------------------- library: used by driver.py too

def run_config(run_dir) -> Config:
    """The run's current settings (prior kind, samples, seed): config.json, which a resume may have updated
    since the VQ-VAE checkpoint was written."""
    path = find_run(run_dir) / "config.json"
    if not path.is_file():
        return load_vqvae(run_dir)[1]
    return Config.from_dict(json.loads(path.read_text()))


def run_data_dir(cfg: Config) -> Path:
    return Path(cfg.data_dir) if cfg.data_dir else ensure_builtin()


def trained_priors(run_dir) -> list[str]:
    return [k for k in PRIORS if (Path(run_dir) / PRIOR_FILES[k]).is_file()]


def generate(run_dir, vqvae, kind: str, n: int, seed: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """n new slices (float CPU, [0, 1]) and their index maps from the run's prior of `kind`."""
    prior, cfg = load_prior(run_dir, kind, device)
    cfg = dataclasses.replace(cfg, prior=dataclasses.replace(cfg.prior, kind=kind))
    idx = sample_codes(prior, vqvae, n, seed, device, cfg)
    return decode_indices(vqvae, idx, bf16=use_bf16(device, cfg.train.amp)), idx


def evaluate_run(run_dir, splits: dict, device, priors=None) -> dict:
    """metrics.json content: test reconstruction metrics and generation metrics for each trained prior; draws figures."""
    run_dir = Path(run_dir)
    vqvae, cfg = load_vqvae(run_dir, device)
    bf16 = use_bf16(device, cfg.train.amp)
    results = {"test": evaluate_vqvae(vqvae, splits["test"].images, 64, device, bf16),
               "validate": evaluate_vqvae(vqvae, splits["validate"].images, 64, device, bf16)}
    real = {s: to_float(splits[s].images) for s in ("train", "validate", "test")}
    real["test_idx"] = encode_split(vqvae, splits["test"].images, 64, device, bf16)
    run_cfg = run_config(run_dir)
    samples = {}
    for kind in priors or trained_priors(run_dir):
        images, idx = generate(run_dir, vqvae, kind, run_cfg.n_samples, run_cfg.seed, device)
        samples[kind] = (images, idx)
        results[f"generation_{kind}"] = generation_metrics(images, idx, real, cfg.model.num_codes)
    if run_cfg.prior.kind in samples:
        results["generation"] = results[f"generation_{run_cfg.prior.kind}"]
    draw_figures(run_dir, vqvae, cfg, splits, samples, device, real["train"])
    return results


def draw_figures(run_dir, vqvae, cfg: Config, splits: dict, samples: dict, device, train_float=None) -> list[Path]:
    """Every figure of a run, from its checkpoints' histories, its models and samples {kind: (slices, index maps)}."""
    out = Path(run_dir) / "figures"
    made = []
    vq = load_checkpoint(Path(run_dir) / "vqvae_last.pt")["state"]["history"]
    steps, losses, recon = zip(*[(r[0], r[1], r[2]) for r in vq["train"]]) if vq["train"] else ((), (), ())
    made.append(figures.save_curves({"total loss": (steps, losses), "reconstruction MSE": (steps, recon)},
                                    out / "vqvae_loss.png", "VQ-VAE training loss", "step", "loss", logy=True))
    epochs = [v["epoch"] for v in vq["val"]]
    made.append(figures.save_curves({"SSIM": (epochs, [v["ssim"] for v in vq["val"]]),
                                     "codebook usage": (epochs, [v["codebook_usage"] for v in vq["val"]])},
                                    out / "val_ssim.png", "validation split, after each epoch", "epoch", ""))
    shown = evenly(splits["test"].images, 8)
    x, rec, idx = next(reconstruct(vqvae, shown, 8, device, use_bf16(device, cfg.train.amp)))
    made.append(figures.save_reconstructions(x, rec, out / "reconstructions.png",
                                             "test slices: original, reconstruction, error"))
    made.append(figures.save_code_map(x[len(x) // 2], idx[len(x) // 2], cfg.model.num_codes, out / "code_map.png"))
    if (Path(run_dir) / "gan_last.pt").is_file():
        gan = load_checkpoint(Path(run_dir) / "gan_last.pt")["state"]["history"]["train"]
        s, ld, lg, dr, df = zip(*gan) if gan else ((),) * 5
        made.append(figures.save_curves({"D loss": (s, ld), "G loss": (s, lg), "D(real)": (s, dr), "D(fake)": (s, df)},
                                        out / "gan_losses.png", "GAN training", "step", ""))
    if (Path(run_dir) / "pixelcnn_last.pt").is_file():
        val = load_checkpoint(Path(run_dir) / "pixelcnn_last.pt")["state"]["history"]["val"]
        made.append(figures.save_curves({"validation": ([v["epoch"] for v in val], [v["val_bits_per_code"] for v in val])},
                                        out / "pixelcnn_nll.png", "PixelCNN validation NLL", "epoch", "bits per code"))
    if samples:  # the pipeline figure shows the PixelCNN when there is one: it measured the better prior
        images, sample_idx = samples.get("pixelcnn", next(iter(samples.values())))
        made.append(figures.save_pipeline(x[len(x) // 2], idx[len(x) // 2], rec[len(x) // 2], sample_idx[0], images[0],
                                          cfg.model.num_codes, out / "pipeline.png",
                                          f"{cfg.preset} preset, {Path(cfg.data_dir).name if cfg.data_dir else 'built-in data'}"))
    train_float = to_float(splits["train"].images) if train_float is None else train_float
    for kind, (images, _) in samples.items():
        made.append(figures.save_montage(images[:64], out / f"samples_{kind}.png", f"{min(len(images), 64)} samples, {kind} prior"))
        made.append(figures.save_zoom(images, out / f"samples_{kind}_zoom.png", f"samples, {kind} prior"))
        ssim, nearest = metrics.nearest_neighbours(images[:8], train_float)
        made.append(figures.save_side_by_side(
            {"sample": images[:8], "nearest train": train_float[nearest]}, out / f"nearest_{kind}.png",
            f"{kind} samples over their nearest training slices (SSIM {', '.join(f'{v:.2f}' for v in ssim.tolist())})"))
    return made


# ---------------------------------------------------------------- CLI

def load_images(folder, cfg: Config, skip_bad: bool = False) -> tuple[torch.Tensor, list[str]]:
    array, names = load_folder(folder, cfg.model.image_size, skip_bad=skip_bad)
    return torch.from_numpy(array), names


def save_png(image: torch.Tensor, path: Path) -> None:
    Image.fromarray((image[0].clamp(0, 1).numpy() * 255).round().astype(np.uint8)).save(path)


def cmd_evaluate(args, device) -> None:
    vqvae, cfg = load_vqvae(args.run, device)
    if args.images:
        images, _ = load_images(args.images, cfg, args.skip_bad)
        where = str(args.images)
    else:
        images = load_split(run_data_dir(cfg), args.split, cfg.model.image_size, skip_bad=args.skip_bad).images
        where = f"{args.split} split"
    result = evaluate_vqvae(vqvae, images, 64, device, use_bf16(device, cfg.train.amp))
    result.update(images=where, run=str(args.run))
    for key in ("ssim", "psnr", "mse", "codebook_usage", "perplexity", "n_images"):
        print(f"{key:15s} {result[key]:.4f}" if isinstance(result[key], float) else f"{key:15s} {result[key]}")
    if args.out:
        write_json(result, args.out)
        print(f"wrote {args.out}")


def cmd_reconstruct(args, device) -> None:
    vqvae, cfg = load_vqvae(args.run, device)
    images, names = load_images(args.images, cfg, args.skip_bad)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    originals, recons = [], []
    for x, rec, _ in reconstruct(vqvae, images, 64, device, use_bf16(device, cfg.train.amp)):
        originals.append(x)
        recons.append(rec)
    originals, recons = torch.cat(originals), torch.cat(recons)
    for name, rec in zip(names, recons):
        save_png(rec, out / f"{Path(name).stem.removesuffix('.nii')}_recon.png")
    show = torch.linspace(0, len(names) - 1, min(8, len(names))).long()
    figures.save_reconstructions(originals[show], recons[show], out / "side_by_side.png",
                                 f"{args.images}: SSIM {metrics.ssim(recons, originals):.3f} over {len(names)} slices")
    print(f"wrote {len(names)} reconstructions and side_by_side.png to {out}")


def cmd_generate(args, device) -> None:
    vqvae, _ = load_vqvae(args.run, device)
    kind = args.prior or run_config(args.run).prior.kind
    if kind not in trained_priors(args.run):
        raise RunError(f"{args.run}: no {kind} prior trained in this run (trained: {', '.join(trained_priors(args.run)) or 'none'})")
    images, _ = generate(args.run, vqvae, kind, args.n, args.seed, device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        save_png(image, out / f"sample_{i:04d}.png")
    figures.save_montage(images, out / "grid.png", f"{args.n} samples, {kind} prior, seed {args.seed}")
    print(f"wrote {args.n} slices and grid.png to {out}")


def cmd_figures(args, device) -> None:
    vqvae, cfg = load_vqvae(args.run, device)
    splits = load_splits(run_data_dir(cfg), cfg.model.image_size)
    run_cfg = run_config(args.run)
    samples = {k: generate(args.run, vqvae, k, run_cfg.n_samples, run_cfg.seed, device)
               for k in trained_priors(args.run)}
    for path in draw_figures(args.run, vqvae, cfg, splits, samples, device):
        print(path)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def command(name, help_text):
        c = sub.add_parser(name, help=help_text, description=help_text)
        c.add_argument("--run", type=Path, required=True, help="run folder written by driver.py")
        c.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
        return c

    c = command("evaluate", "VQ-VAE metrics (SSIM, PSNR, MSE, codebook usage, perplexity) on a split or a folder")
    where = c.add_mutually_exclusive_group()
    where.add_argument("--split", default="test", choices=("train", "validate", "test"),
                       help="split of the run's data (default: test)")
    where.add_argument("--images", type=Path, help="any folder of PNG slices instead of a split")
    c.add_argument("--out", type=Path, help="also write the metrics to this JSON file")
    c.add_argument("--skip-bad", action="store_true", help="skip undecodable PNGs with a warning")
    c = command("reconstruct", "reconstruct a folder of PNG slices: PNGs and a side-by-side figure")
    c.add_argument("--images", type=Path, required=True, help="folder of PNG slices")
    c.add_argument("--out", type=Path, required=True, help="output folder")
    c.add_argument("--skip-bad", action="store_true", help="skip undecodable PNGs with a warning")
    c = command("generate", "new slices from the run's prior: PNGs and a grid")
    c.add_argument("--n", type=at_least(1), default=16, help="number of slices (default: 16)")
    c.add_argument("--out", type=Path, required=True, help="output folder")
    c.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    c.add_argument("--prior", choices=PRIORS, help="which prior, for runs trained with --prior both "
                                                   "(default: the run's own)")
    command("figures", "redraw every figure of a run into RUN/figures from its checkpoints")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        device = pick_device(args.device)
        if device.type == "cpu":
            keep_freed_host_memory()
        {"evaluate": cmd_evaluate, "reconstruct": cmd_reconstruct, "generate": cmd_generate,
         "figures": cmd_figures}[args.command](args, device)
    except (DataError, RunError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
