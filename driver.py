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
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from config import PRESETS, Config, preset
from dataset import BUILTIN_DIR, DataError, ensure_builtin, load_splits
from runs import RunError, at_least, check_same_architecture, load_checkpoint, pick_device, write_json
import train
from train import TrainingDiverged, dist_info, train_gan, train_vqvae

PRIOR_CHOICES = ("gan", "pixelcnn", "both")
DEFAULT_PRIOR = "gan"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", help="OASIS folder holding keras_png_slices_{train,validate,test} (or its parent); "
                                      "default: the built-in synthetic slices, generated on first use")
    p.add_argument("--preset", choices=sorted(PRESETS), help="model and schedule preset (default: paper on CUDA "
                                                              "with --data-dir, else quick)")
    p.add_argument("--prior", choices=PRIOR_CHOICES, default=None,
                   help=f"prior that generates new slices; 'both' trains and compares the two (default: {DEFAULT_PRIOR})")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--run-dir", type=Path, help="run folder (default: runs/NNN-<preset>-<data>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its last checkpoints")
    p.add_argument("--seed", type=int, help="seed for weights, shuffling and sampling (default: 0)")
    p.add_argument("--epochs", type=at_least(1), help="VQ-VAE epochs (default: from the preset; paper 15, quick 20)")
    p.add_argument("--batch-size", type=at_least(1), help="VQ-VAE batch size (default: from the preset; 32)")
    p.add_argument("--lr", type=float, help="VQ-VAE learning rate (default: from the preset; paper 1e-3, quick 2e-3)")
    p.add_argument("--num-codes", type=at_least(2), help="codebook size K (default: from the preset; paper 512)")
    p.add_argument("--code-dim", type=at_least(1), help="code dimension D (default: from the preset; paper 128)")
    p.add_argument("--gan-epochs", type=at_least(1), help="GAN epochs (default: from the preset; 30)")
    p.add_argument("--gan-head", choices=("snap", "logits"), help="GAN generator head: snap a continuous map to the "
                   "codebook, or per-position code logits with Gumbel-softmax (default: from the preset)")
    p.add_argument("--prior-epochs", type=at_least(1), help="PixelCNN epochs (default: from the preset; quick 7)")
    p.add_argument("--samples", type=at_least(2), help="slices to generate for the generation metrics "
                                                        "(default: from the preset; paper 512, quick 256)")
    p.add_argument("--amp", choices=("auto", "bf16", "off"), help="bf16 autocast (default: auto = CUDA, or a CPU "
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
        cfg = Config.from_dict(json.loads(saved.read_text()))
        for flag, given, kept in (("--preset", args.preset, cfg.preset), ("--seed", args.seed, cfg.seed),
                                  ("--data-dir", data_dir, cfg.data_dir)):
            if given is not None and given != kept:
                raise RunError(f"{flag} {given}: {args.run_dir} was trained with {kept}; a resumed run keeps it")
    else:
        cfg = preset(args.preset or ("paper" if device.type == "cuda" and args.data_dir else "quick"))
        cfg.seed = args.seed if args.seed is not None else 0
        cfg.data_dir = data_dir
        cfg.prior.kind = DEFAULT_PRIOR
    cfg.model = override(cfg.model, num_codes=args.num_codes, code_dim=args.code_dim)
    cfg.train = override(cfg.train, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, amp=args.amp,
                         compile=args.compile)
    cfg.gan = override(cfg.gan, epochs=args.gan_epochs, head=args.gan_head)
    kind = {"both": "pixelcnn", None: cfg.prior.kind}.get(args.prior, args.prior)
    cfg.prior = override(cfg.prior, epochs=args.prior_epochs, kind=kind)
    if args.samples:
        cfg.n_samples = args.samples
    return cfg


def override(part, **values):
    return dataclasses.replace(part, **{k: v for k, v in values.items() if v is not None})


def new_run_dir(cfg: Config, root: Path = Path("runs")) -> Path:
    data = Path(cfg.data_dir).name if cfg.data_dir else "builtin"
    taken = [int(p.name.split("-")[0]) for p in root.glob("[0-9][0-9][0-9]-*") if p.name.split("-")[0].isdigit()]
    return root / f"{max(taken, default=0) + 1:03d}-{cfg.preset}-{data}"


def init_distributed() -> torch.device | None:
    """Under torchrun: join the process group and return this rank's device."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device("cpu")


def run(args) -> dict:
    rank_device = init_distributed()
    rank, world = dist_info()
    device = rank_device or pick_device(args.device)
    cfg = build_config(args, device)
    if args.resume and not args.run_dir:
        raise RunError("--resume needs --run-dir (the run to continue)")
    run_dir = args.run_dir or new_run_dir(cfg)
    if world > 1:  # every rank must agree on the folder rank 0 picked
        box = [str(run_dir)]
        dist.broadcast_object_list(box, src=0)
        run_dir = Path(box[0])
    if not args.resume and (run_dir / "vqvae_last.pt").exists():
        raise RunError(f"{run_dir}: already holds a run; pass --resume to continue it or choose another --run-dir")
    say = print if rank == 0 else (lambda *a, **k: None)
    if not cfg.data_dir:
        say(f"no --data-dir given: using the built-in synthetic brain slices in {BUILTIN_DIR}")
        data_dir = ensure_builtin() if rank == 0 else BUILTIN_DIR
        if world > 1:
            dist.barrier()
    else:
        data_dir = cfg.data_dir
    if args.resume:
        check_checkpoints(run_dir, cfg)  # before config.json is rewritten: a refused resume changes nothing
    run_dir.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        write_json(cfg.to_dict(), run_dir / "config.json")
    say(f"run folder: {run_dir}   preset: {cfg.preset}   device: {device}" + (f" x {world} ranks" if world > 1 else ""))

    timing, t_all = {}, time.perf_counter()
    t = time.perf_counter()
    splits = load_splits(data_dir, cfg.model.image_size, args.cache_dir, args.skip_bad)
    timing["data_s"] = time.perf_counter() - t
    say("data: " + ", ".join(f"{k} {len(v)}" for k, v in splits.items()) + f" slices at {cfg.model.image_size}px")

    t = time.perf_counter()
    train_vqvae(cfg, splits, run_dir, device, resume=args.resume)
    timing["vqvae_s"] = time.perf_counter() - t

    import predict  # after training: predict reloads the best checkpoint, as a user would

    vqvae, _ = predict.load_vqvae(run_dir, device)
    priors = ["gan", "pixelcnn"] if args.prior == "both" else [cfg.prior.kind]
    for kind in priors:
        t = time.perf_counter()
        (train_gan if kind == "gan" else train.train_prior)(with_kind(cfg, kind), vqvae, splits, run_dir, device,
                                                     resume=args.resume)
        timing["gan_s" if kind == "gan" else "pixelcnn_s"] = time.perf_counter() - t
    if rank:
        return {}
    t = time.perf_counter()
    results = predict.evaluate_run(run_dir, splits, device, priors)
    timing["evaluation_s"] = time.perf_counter() - t
    timing["total_s"] = time.perf_counter() - t_all
    results.update(timing=timing, device=str(device), preset=cfg.preset, data_dir=cfg.data_dir,
                   run_dir=str(run_dir), world_size=world)
    write_json(results, run_dir / "metrics.json")
    say(summary_table(results))
    return results


def check_checkpoints(run_dir: Path, cfg: Config) -> None:
    """Refuse, in one line, to resume checkpoints of another architecture than the one requested."""
    for name, part in (("vqvae_last.pt", "model"), ("gan_last.pt", "gan"), ("pixelcnn_last.pt", "prior")):
        if (run_dir / name).is_file():
            check_same_architecture(load_checkpoint(run_dir / name), cfg, run_dir / name, part)


def with_kind(cfg: Config, kind: str) -> Config:
    return dataclasses.replace(cfg, prior=dataclasses.replace(cfg.prior, kind=kind))


def summary_table(r: dict) -> str:
    t, rows = r["test"], []
    rows.append(("test SSIM (whole split, data_range 1)", f"{t['ssim']:.4f}"))
    rows.append(("test PSNR", f"{t['psnr']:.2f} dB"))
    rows.append(("codebook usage / perplexity", f"{t['codebook_usage']:.1%} / {t['perplexity']:.1f}"))
    for kind in ("gan", "pixelcnn"):
        g = r.get(f"generation_{kind}")
        if g:
            rows.append((f"{kind}: Frechet distance (real-vs-real)",
                         f"{g['frechet_distance']:.2f} ({g['frechet_distance_real']:.2f})"))
            rows.append((f"{kind}: KID x1e3 (real-vs-real)", f"{1e3 * g['kid']:.2f} ({1e3 * g['kid_real']:.2f})"))
            rows.append((f"{kind}: MS-SSIM diversity (real)", f"{g['ms_ssim']:.3f} ({g['ms_ssim_real']:.3f})"))
            rows.append((f"{kind}: nearest-train SSIM (real)", f"{g['nn_ssim']:.3f} ({g['nn_ssim_real']:.3f})"))
    for key, value in r["timing"].items():
        rows.append((f"time: {key[:-2]}", f"{value:.1f} s"))
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
    except KeyboardInterrupt:
        print("interrupted: the last finished epoch is saved; continue with --resume --run-dir RUN", file=sys.stderr)
        return 130
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
