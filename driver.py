"""The whole pipeline in one command: data -> VQ-VAE -> evaluation -> prior -> samples -> figures -> summary.

    python driver.py                                    # built-in synthetic slices, quick preset, CPU is fine
    python driver.py --data-dir ~/keras_png_slices_data # OASIS; on CUDA the paper preset is the default
    python driver.py --data-dir DIR --preset quick --run-dir runs/real --prior both
    torchrun --standalone --nproc_per_node=4 driver.py --data-dir DIR   # DistributedDataParallel, one run folder

Writes runs/<name>/: config.json, checkpoints, metrics.json, TensorBoard events (tensorboard --logdir runs)
and figures/. --resume continues a stopped run from its last checkpoints.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import time
from pathlib import Path

import torch

import figures
from config import CHOICES, DEFAULT_GAN_RECIPE, DEFAULT_PRIOR, GAN_RECIPES, PRESETS, PRIORS, Config, gan_recipe, preset
from dataset import BUILTIN_DIR, DataError, ensure_builtin, load_splits
from evaluate import evaluate_run, load_vqvae, nearest_training, reconstruction_example
from runs import (Interrupted, PeakMemory, RunError, at_least, barrier, check_same_architecture, checkpoint_path,
                  close_distributed, dist_info, init_distributed, load_checkpoint, parse_device, positive_float,
                  read_config, restore_config, resumable_run, run_folder, write_config, write_json)
from train import TrainingDiverged, make_writer, train_prior, train_vqvae

ALL = ("all", "both")  # train and compare every prior; "both" is the name from when there were two


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", help="OASIS folder holding keras_png_slices_{train,validate,test} (or its parent); "
                                      "default: the built-in synthetic slices, generated on first use")
    p.add_argument("--preset", choices=sorted(PRESETS), help="model and schedule preset (default: paper on CUDA "
                                                              "with --data-dir, else quick)")
    p.add_argument("--prior", choices=(*PRIORS, *ALL), default=None,
                   help=f"prior that generates new slices; 'all' trains and compares every prior, keeping the run's "
                        f"generator ('both' is accepted for 'all') (default: {DEFAULT_PRIOR})")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--run-dir", type=Path, help="run folder (default: runs/NNN-<preset>-<data>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its last checkpoints")
    p.add_argument("--seed", type=int, help="seed for weights, shuffling and sampling (default: 0)")
    p.add_argument("--epochs", type=at_least(1), help="VQ-VAE epochs (default: from the preset; paper 15, quick 20)")
    p.add_argument("--batch-size", type=at_least(1), help="VQ-VAE batch size (default: from the preset; 32)")
    p.add_argument("--lr", type=positive_float, help="VQ-VAE learning rate (default: from the preset; paper 1e-3, "
                                                     "quick 2e-3)")
    p.add_argument("--lr-schedule", choices=CHOICES["train.lr_schedule"],
                   help="VQ-VAE learning rate over training: constant (the report's) or cosine decay to 0 "
                        "(default: from the preset; paper constant, quick cosine)")
    p.add_argument("--num-codes", type=at_least(2), help="codebook size K (default: from the preset; paper 512)")
    p.add_argument("--code-dim", type=at_least(1), help="code dimension D (default: from the preset; paper 128)")
    p.add_argument("--gan-epochs", type=at_least(1), help="GAN epochs (default: from the preset; paper 30, "
                                                          "quick 480)")
    p.add_argument("--gan-lr", type=positive_float, help="GAN learning rate, generator and discriminator "
                                                         "(default: from the recipe; wgan-gp-latent 1e-4)")
    p.add_argument("--gan-recipe", choices=tuple(GAN_RECIPES),
                   help="GAN objective, what its critic sees and its regularisation: wgan-gp-latent (Wasserstein "
                        "loss, gradient penalty, 5 critic steps per generator step, on the encoder's continuous "
                        "outputs; the generator's map is snapped to codes only to decode; samples from a moving "
                        "average of the generator), wgan-gp (the same on the code maps, latest generator), "
                        "hinge-r1 (hinge loss, R1 penalty, DiffAugment, minibatch-std critic, EMA "
                        "generator, on the code maps), report (the original BCE GAN, which collapses) "
                        f"(default: {DEFAULT_GAN_RECIPE})")
    p.add_argument("--gan-head", choices=CHOICES["gan.head"], help="GAN generator head: snap a continuous map to the "
                   "codebook, or per-position code logits, argmax forward and softmax gradient; logits need a "
                   "recipe on the code maps (default: the recipe's; snap, wgan-gp and hinge-r1: logits)")
    p.add_argument("--gan-width", type=at_least(1), nargs=2, metavar=("G", "D"),
                   help="GAN generator channels at its 4x4 map and critic channels at its first layer (default: from "
                        "the preset; quick 256 64, paper 64 32; quick's 64 32 at --gan-epochs 240 is a third of the "
                        "time and missed the judge's bar on built-in data: EXPERIMENTS.md)")
    p.add_argument("--pixelcnn-epochs", "--prior-epochs", type=at_least(1), dest="pixelcnn_epochs",
                   help="PixelCNN epochs (default: from the preset; quick 7)")
    p.add_argument("--pixelcnn-lr", type=positive_float, help="PixelCNN learning rate (default: from the preset; 1e-3)")
    p.add_argument("--maskgit-epochs", type=at_least(1),
                   help="MaskGIT epochs (default: from the preset; paper 8, quick 12)")
    p.add_argument("--maskgit-head", choices=CHOICES["maskgit.head"],
                   help="how MaskGIT draws the codes of one token: each on its own given the rest, or one after "
                        "another, each seeing those before (default: from the preset; paper independent, quick "
                        "sequential)")
    p.add_argument("--mirror", action=argparse.BooleanOptionalAction,
                   help="the priors also learn the code maps of the training slices' left-right mirror images, "
                        "twice the maps per epoch (default: from the preset; on for the quick preset's MaskGIT, "
                        "off otherwise)")
    p.add_argument("--samples", type=at_least(2), help="slices to generate for the generation metrics "
                                                        "(default: from the preset; paper 512, quick 256)")
    p.add_argument("--amp", choices=CHOICES["runtime.amp"], help="bf16 autocast (default: auto = CUDA, or a CPU "
                                                                    "with native bf16)")
    p.add_argument("--compile", nargs="?", const="inductor", metavar="BACKEND",
                   help="torch.compile encoder and decoder with this backend (default: off; bare flag: inductor)")
    p.add_argument("--cache-dir", help="decoded-split cache (default: $OASIS_VQVAE_CACHE or ~/.cache/oasis-vqvae)")
    p.add_argument("--skip-bad", action="store_true", help="skip undecodable PNGs with a warning instead of stopping")
    return p.parse_args(argv)


def build_config(args, device: torch.device) -> Config:
    """The preset with the given flags applied; when resuming, the run's own config.json instead of a preset."""
    saved = args.run_dir / "config.json" if args.resume and args.run_dir else None
    data_dir = str(Path(args.data_dir).resolve()) if args.data_dir else None
    if saved and saved.is_file():
        cfg = read_config(saved)
        for flag, given, kept in (("--preset", args.preset, cfg.preset), ("--seed", args.seed, cfg.seed),
                                  ("--data-dir", data_dir, cfg.data_dir)):
            if given is not None and given != kept:
                raise RunError(f"{flag} {given}: {args.run_dir} was trained with {kept}; a resumed run keeps it")
    else:
        cfg = preset(args.preset or ("paper" if device.type == "cuda" and args.data_dir else "quick"))
        cfg.seed = args.seed if args.seed is not None else 0
        cfg.data_dir = data_dir
    cfg.model = override(cfg.model, num_codes=args.num_codes, code_dim=args.code_dim)
    cfg.train = override(cfg.train, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         lr_schedule=args.lr_schedule)
    cfg.runtime = override(cfg.runtime, amp=args.amp, compile=args.compile)
    if args.gan_recipe:
        cfg.gan = gan_recipe(args.gan_recipe, cfg.gan)
    g_width, d_width = args.gan_width or (None, None)
    cfg.gan = override(cfg.gan, epochs=args.gan_epochs, head=args.gan_head, lr=args.gan_lr, mirror=args.mirror,
                       g_width=g_width, d_width=d_width)
    try:
        cfg.gan.check()
    except ValueError as e:
        raise RunError(str(e)) from None
    cfg.pixelcnn = override(cfg.pixelcnn, epochs=args.pixelcnn_epochs, lr=args.pixelcnn_lr, mirror=args.mirror)
    cfg.maskgit = override(cfg.maskgit, epochs=args.maskgit_epochs, head=args.maskgit_head, mirror=args.mirror)
    if args.prior in PRIORS:
        cfg.prior = args.prior
    if args.samples:
        cfg.n_samples = args.samples
    return cfg


def override(part, **values):
    return dataclasses.replace(part, **{k: v for k, v in values.items() if v is not None})


def run_name(cfg: Config):
    """The name of new run folder number n: 007-quick-builtin."""
    data = Path(cfg.data_dir).name if cfg.data_dir else "builtin"
    return lambda number: f"{number:03d}-{cfg.preset}-{data}"


def prepare(args) -> tuple[Config, torch.device]:
    """Config and device, checked before any folder is made or file written."""
    device = init_distributed() or parse_device(args.device)
    if args.resume:
        resumable_run(args.run_dir)
    return build_config(args, device), device


def start(args, cfg: Config, run_dir: Path, device: torch.device) -> tuple[Path, str | None]:
    """In the locked run folder: refuse to overwrite a run or to resume another architecture, find the data,
    write config.json. Returns the data folder and config.json's previous text (for `restore_config`)."""
    rank, world = dist_info()
    if not args.resume and checkpoint_path(run_dir, "vqvae").exists():
        raise RunError(f"{run_dir}: already holds a run; pass --resume to continue it or choose another --run-dir")
    if args.resume:
        check_checkpoints(run_dir, cfg)  # before config.json is rewritten: a refused resume changes nothing
    if cfg.data_dir:
        data_dir = Path(cfg.data_dir)
    else:
        say(f"no --data-dir given: using the built-in synthetic brain slices in {BUILTIN_DIR}")
        data_dir = ensure_builtin() if rank == 0 else BUILTIN_DIR
        barrier()
    previous = write_config(cfg, run_dir) if rank == 0 else None
    say(f"run folder: {run_dir}   preset: {cfg.preset}   device: {device}" + (f" x {world} ranks" if world > 1 else ""))
    return data_dir, previous


def run(args) -> dict:
    """The checked start, then the pipeline in the locked run folder."""
    cfg, device = prepare(args)
    with run_folder(args.run_dir, run_name(cfg)) as run_dir:
        data_dir, previous = start(args, cfg, run_dir, device)
        try:
            return pipeline(args, cfg, run_dir, data_dir, device)
        except TrainingDiverged as e:
            if not args.resume or previous is None or dist_info()[0]:
                raise
            # The flag that made it diverge must not stay for the next plain --resume.
            restore_config(run_dir, previous)
            raise TrainingDiverged(f"{e}; config.json keeps its values from before this --resume") from None


def pipeline(args, cfg: Config, run_dir: Path, data_dir: Path, device: torch.device) -> dict:
    """Data, training, evaluation, figures, metrics.json; models and histories stay in memory throughout."""
    timing, memory, t_all = {}, {}, time.perf_counter()
    timed = stage_meter(timing, memory, device)
    with timed("data_s"):
        splits = load_splits(data_dir, cfg.model.image_size, args.cache_dir, args.skip_bad)
    say("data: " + ", ".join(f"{k} {len(v)}" for k, v in splits.items()) + f" slices at {cfg.model.image_size}px")
    with timed("vqvae_s"):
        _, histories = train_vqvae(cfg, splits, run_dir, device, resume=args.resume)
    histories = {"vqvae": histories}
    vqvae, _ = load_vqvae(run_dir, device)  # the best epoch by validation SSIM, read back once
    priors = {}
    for name in PRIORS if args.prior in ALL else (cfg.prior,):
        with timed(f"{name}_s"):
            priors[name], histories[name] = train_prior(name, cfg, vqvae, splits, run_dir, device, resume=args.resume)
    if dist_info()[0]:
        return {}
    with timed("evaluation_s"):
        results, samples = evaluate_run(vqvae, cfg, splits, priors, device)
        nearest = nearest_training(samples, splits)
    log_generation(run_dir, results, priors)
    example = reconstruction_example(vqvae, cfg, splits, device)
    figures.save_run_figures(run_dir / "figures", cfg, histories, example, samples, nearest)
    timing["total_s"] = time.perf_counter() - t_all
    results.update(timing=timing, peak_memory_mb=memory, device=str(device), preset=cfg.preset,
                   data_dir=cfg.data_dir, prior=cfg.prior, run_dir=str(run_dir), world_size=dist_info()[1])
    write_json(results, run_dir / "metrics.json")
    say(summary_table(results))
    return results


def log_generation(run_dir: Path, results: dict, priors: dict) -> None:
    """Each prior's final generation metrics (the judge's AUCs, FD, diversity...) into TensorBoard."""
    writer = make_writer(run_dir, 0)
    for name in priors:
        for key, value in results[f"generation_{name}"].items():
            if isinstance(value, (int, float)):
                writer.add_scalar(f"generation_{name}/{key}", value, 0)
    writer.close()


def stage_meter(timing: dict, memory: dict, device: torch.device):
    """`with meter("vqvae_s"):` writes the block's wall time into timing and its peak memory (MB: the process's
    peak RSS on a CPU, CUDA's max allocated on a GPU) into memory, under the same key."""
    @contextlib.contextmanager
    def timed(key: str):
        t = time.perf_counter()
        with PeakMemory(device) as mem:
            yield
        timing[key] = time.perf_counter() - t
        memory[key] = mem.mb
    return timed


def say(*args) -> None:
    if dist_info()[0] == 0:
        print(*args)


def check_checkpoints(run_dir: Path, cfg: Config) -> None:
    """Refuse, in one line, to resume checkpoints of another architecture than the one requested."""
    for name in ("vqvae", *PRIORS):
        path = checkpoint_path(run_dir, name)
        if path.is_file():
            check_same_architecture(load_checkpoint(path), cfg, path, "model" if name == "vqvae" else name)


def summary_table(r: dict) -> str:
    t, rows = r["test"], []
    rows.append(("test SSIM (whole split, data_range 1)", f"{t['ssim']:.4f}"))
    rows.append(("test PSNR", f"{t['psnr']:.2f} dB"))
    rows.append(("codebook usage / perplexity", f"{t['codebook_usage']:.1%} / {t['perplexity']:.1f}"))
    for kind in PRIORS:
        g = r.get(f"generation_{kind}")
        if g:
            rows.append((f"{kind}: Frechet distance (real-vs-real)",
                         f"{g['frechet_distance']:.2f} ({g['frechet_distance_real']:.2f})"))
            rows.append((f"{kind}: KID x1e3 (real-vs-real)", f"{1e3 * g['kid']:.2f} ({1e3 * g['kid_real']:.2f})"))
            rows.append((f"{kind}: MS-SSIM diversity (real)", f"{g['ms_ssim']:.3f} ({g['ms_ssim_real']:.3f})"))
            rows.append((f"{kind}: nearest-train SSIM (real)", f"{g['nn_ssim']:.3f} ({g['nn_ssim_real']:.3f})"))
            rows.append((f"{kind}: judge AUC vs real test (training slices)",
                         f"{g['c2st']:.3f} ({g['c2st_real']:.3f})"))
            rows.append((f"{kind}: judge AUC vs reconstructions (training slices')",
                         f"{g['c2st_recon']:.3f} ({g['c2st_recon_real']:.3f})"))
    for key, value in r["timing"].items():
        peak = r["peak_memory_mb"].get(key)
        rows.append((f"time: {key[:-2]}", f"{value:.1f} s" + (f"   peak memory {peak:.0f} MB" if peak else "")))
    rows.append(("run folder", r["run_dir"]))
    width = max(len(k) for k, _ in rows)
    return "\n".join(["", "summary", "-" * (width + 20)] + [f"{k:<{width}}  {v}" for k, v in rows])


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except (DataError, RunError, TrainingDiverged, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(e, file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted before the run folder was opened; nothing written", file=sys.stderr)
        return 130
    finally:
        close_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
