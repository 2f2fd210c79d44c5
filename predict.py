"""Use a trained run: evaluate, reconstruct, generate, redraw figures. Works on any device, whatever it was trained on.

    python predict.py evaluate    --run RUN [--split test | --images DIR] [--out m.json]
    python predict.py reconstruct --run RUN --images DIR --out OUT
    python predict.py generate    --run RUN --n 16 --out OUT [--seed S] [--prior NAME]
    python predict.py figures     --run RUN
    python predict.py tune        --run RUN [--prior NAME] [--temperature 1.0 0.9] [--top-k 0 4 16] [--steps 8 12]
                                  [--choice-temperature 4.5 20] [--order confidence random]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

import figures
import metrics
from config import MASKGIT_ORDERS, PRIORS, Config
from dataset import DataError, ensure_builtin, load_folder, load_split, load_splits
from evaluate import (decode_indices, evaluate_vqvae, load_prior, load_vqvae, nearest_training, reconstruct,
                      reconstruction_example, sample_codes, sample_priors, trained_priors, tune_sampling)
from runs import (RunError, at_least, atomic_save, checkpoint_path, find_run, keep_freed_host_memory, load_checkpoint,
                  load_histories, output_path, parse_device, positive_float, run_config, use_bf16, write_config,
                  write_json, writing)


def data_dir(cfg) -> Path:
    return Path(cfg.data_dir) if cfg.data_dir else ensure_builtin()


def load_images(folder, size: int, skip_bad: bool) -> tuple[torch.Tensor, list[str]]:
    array, names = load_folder(folder, size, skip_bad=skip_bad)
    return torch.from_numpy(array), names


def cmd_evaluate(args, device) -> None:
    if args.out:
        output_path(args.out, "file")
    vqvae, cfg = load_vqvae(args.run, device)
    if args.images:
        images, _ = load_images(args.images, cfg.model.image_size, args.skip_bad)
        where = str(args.images)
    else:
        images = load_split(data_dir(cfg), args.split, cfg.model.image_size, skip_bad=args.skip_bad).images
        where = f"{args.split} split"
    result = evaluate_vqvae(vqvae, images, 64, device, use_bf16(device, cfg.runtime.amp))
    result.update(images=where, run=str(args.run))
    for key in ("ssim", "psnr", "mse", "codebook_usage", "perplexity", "n_images"):
        print(f"{key:15s} {result[key]:.4f}" if isinstance(result[key], float) else f"{key:15s} {result[key]}")
    if args.out:
        try:
            with writing(args.out):
                write_json(result, args.out)
        except RunError:
            print(json.dumps(result, default=float))  # measured all the same: keep it on stdout
            raise
        print(f"wrote {args.out}")


def cmd_reconstruct(args, device) -> None:
    out = output_path(args.out, "folder")
    vqvae, cfg = load_vqvae(args.run, device)
    images, names = load_images(args.images, cfg.model.image_size, args.skip_bad)
    batches = list(reconstruct(vqvae, images, 64, device, use_bf16(device, cfg.runtime.amp)))
    originals, recons = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    show = torch.linspace(0, len(names) - 1, min(8, len(names))).long()
    with writing(out):
        out.mkdir(exist_ok=True)
        for name, rec in zip(names, recons):
            figures.save_png(rec, out / f"{Path(name).stem.removesuffix('.nii')}_recon.png")
        figures.save_reconstructions(originals[show], recons[show], out / "side_by_side.png",
                                     f"{args.images}: SSIM {metrics.ssim(recons, originals):.3f} over {len(names)} "
                                     "slices")
    print(f"wrote {len(names)} reconstructions and side_by_side.png to {out}")


def cmd_generate(args, device) -> None:
    out = output_path(args.out, "folder")
    vqvae, _ = load_vqvae(args.run, device)
    name = args.prior or run_config(args.run).prior
    prior, cfg = load_prior(args.run, name, vqvae, device)
    idx = sample_codes(prior, args.n, args.seed, device, getattr(cfg, name))
    images = decode_indices(vqvae, idx, bf16=use_bf16(device, cfg.runtime.amp))
    with writing(out):
        out.mkdir(exist_ok=True)
        for i, image in enumerate(images):
            figures.save_png(image, out / f"sample_{i:04d}.png")
        figures.save_montage(images, out / "grid.png", f"{args.n} samples, {name} prior, seed {args.seed}")
    print(f"wrote {args.n} slices and grid.png to {out}")


def cmd_figures(args, device) -> None:
    vqvae, _ = load_vqvae(args.run, device)
    cfg = run_config(args.run)
    splits = load_splits(data_dir(cfg), cfg.model.image_size)
    names = trained_priors(args.run)
    priors = {name: load_prior(args.run, name, vqvae, device)[0] for name in names}
    samples = sample_priors(vqvae, cfg, priors, device)
    nearest = nearest_training(samples, splits)
    histories = load_histories(args.run, ("vqvae", *names))
    example = reconstruction_example(vqvae, cfg, splits, device)
    for path in figures.save_run_figures(Path(args.run) / "figures", cfg, histories, example, samples, nearest):
        print(path)


def cmd_tune(args, device) -> None:
    run = find_run(args.run)
    vqvae, _ = load_vqvae(run, device)
    cfg = run_config(run)
    name = args.prior or cfg.prior
    prior, _ = load_prior(run, name, vqvae, device)
    settings = getattr(cfg, name).sampling()
    top_k = args.top_k or ([0, 4, 16] if "top_k" in settings else None)  # the default grid, where it applies
    grid = {k: v for k, v in (("top_k", top_k), ("temperature", args.temperature), ("steps", args.steps),
                              ("choice_temperature", args.choice_temperature), ("order", args.order)) if v}
    missing = set(grid) - set(settings)
    if missing:
        raise RunError(f"the {name} prior has no sampling setting {', '.join(sorted(missing))} to tune")
    rows = tune_sampling(prior, name, vqvae, cfg, load_splits(data_dir(cfg), cfg.model.image_size), grid, device)
    print("  ".join(f"{k:>11}" for k in grid) + "  judge vs validation reconstructions  MS-SSIM (validation)")
    for r in rows:
        cells = (f"{r[k]:>11}" if isinstance(r[k], str) else f"{r[k]:11g}" for k in grid)  # order is a word
        print("  ".join(cells) + f"  {r['c2st_recon_val']:35.3f}  {r['ms_ssim']:.3f} "
              f"({r['ms_ssim_real']:.3f})")
    best = {k: rows[0][k] for k in grid}
    if args.dry_run:
        print(f"best: {best} (--dry-run: nothing changed)")
        return
    keep_sampling(run, name, best)
    print(f"kept {best} in {run / 'config.json'} and {checkpoint_path(run, name).name}")


def keep_sampling(run: Path, name: str, settings: dict) -> None:
    """The chosen settings into the run's config.json and the prior's checkpoint, which generate reads."""
    def updated(cfg: Config) -> Config:
        setattr(cfg, name, dataclasses.replace(getattr(cfg, name), **settings))
        return cfg

    write_config(updated(run_config(run)), run)
    path = checkpoint_path(run, name)
    ckpt = load_checkpoint(path)
    ckpt["config"] = updated(Config.from_dict(ckpt["config"])).to_dict()
    atomic_save(ckpt, path)


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
    c.add_argument("--prior", choices=PRIORS, help="which prior, for runs trained with --prior all "
                                                   "(default: the run's own)")
    command("figures", "redraw every figure of a run into RUN/figures from its checkpoints")
    c = command("tune", "choose the prior's sampling settings on the VALIDATION split by the judge (C2ST against "
                        "the VQ-VAE's reconstructions), and keep the best in the run for generate and figures")
    c.add_argument("--prior", choices=PRIORS, help="which prior (default: the run's own)")
    c.add_argument("--top-k", type=at_least(0), nargs="+",
                   help="PixelCNN and MaskGIT: top-k values to try; 0 samples from the whole distribution "
                        "(default: 0 4 16)")
    c.add_argument("--temperature", type=positive_float, nargs="+", default=[1.0],
                   help="temperatures to try; for the GAN, the standard deviation of its input noise "
                        "(default: 1.0)")
    c.add_argument("--steps", type=at_least(1), nargs="+",
                   help="MaskGIT decoding steps to try (default: the run's, not tuned)")
    c.add_argument("--choice-temperature", type=positive_float, nargs="+",
                   help="MaskGIT: noise on the confidence that picks which drawn codes stay at each step; higher "
                        "is closer to a random order (default: the run's, not tuned)")
    c.add_argument("--order", choices=MASKGIT_ORDERS, nargs="+",
                   help="MaskGIT: which drawn codes a step keeps, the likeliest ('confidence') or a random subset "
                        "drawn from the unsmoothed conditionals ('random'; wants more steps) (default: the run's)")
    c.add_argument("--dry-run", action="store_true", help="print the table and change nothing")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        device = parse_device(args.device)
        if device.type == "cpu":
            keep_freed_host_memory()
        {"evaluate": cmd_evaluate, "reconstruct": cmd_reconstruct, "generate": cmd_generate,
         "figures": cmd_figures, "tune": cmd_tune}[args.command](args, device)
    except (DataError, RunError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outputs are written one whole file at a time; nothing else to undo
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
