"""A run folder and its checkpoints, shared by training and prediction.

    runs/<name>/config.json   metrics.json   events.out.tfevents.*   figures/
                vqvae_last.pt vqvae_best.pt  gan_last.pt  pixelcnn_last.pt

Every checkpoint holds the whole config as a plain dict, so `load_model` rebuilds a model from the file
alone; checkpoints are written to a temp name and renamed, and read with `weights_only=True`.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch

from config import Config
from dataset import atomic_write


def at_least(low: int):
    """argparse type: an int no smaller than `low`, refused with a one-line usage error otherwise."""
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, not {value}")
        return value
    return parse


class RunError(Exception):
    """A problem with a run folder or checkpoint, reported as one line."""


# ---------------------------------------------------------------- devices

def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RunError(f"--device {name}: CUDA is not available on this machine")
    return device


def keep_freed_host_memory() -> bool:
    """Have glibc keep freed memory for reuse instead of returning it to the kernel. True if it took effect.

    PyTorch allocates CPU tensors with plain malloc, and glibc serves blocks above its mmap threshold (at most
    32 MB) with fresh mmaps: every activation of the paper preset is mapped anew each step and the kernel
    zero-fills it page by page, about 2.5 GB of page faults per step. With mmap off and the heap trimmed only
    above 2 GiB of free space (much like CUDA's caching allocator), the same step measured 18 -> 29 images/s
    on the 2-core dev CPU. The price: the process holds on to its peak memory. A no-op off Linux and where
    malloc is not glibc's.
    """
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # from <malloc.h>
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def release_freed_host_memory() -> None:
    """Hand memory kept by `keep_freed_host_memory` back to the kernel (glibc's malloc_trim)."""
    malloc_trim = _libc_function("malloc_trim")
    if malloc_trim is not None:
        malloc_trim(0)


def _libc_function(name: str):
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None


def cpu_has_fast_bf16() -> bool:
    # Measured on the 2-core dev CPU (AVX512-BF16/AMX): bf16 autocast trains the quick preset 1.9x faster.
    # Without those instructions bf16 is emulated and slower than fp32.
    try:
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    except AttributeError:
        return False


def use_bf16(device: torch.device, amp: str) -> bool:
    if amp == "off":
        return False
    if amp == "bf16":
        return True
    return device.type == "cuda" or (device.type == "cpu" and cpu_has_fast_bf16())


def autocast(device: torch.device, enabled: bool):
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)  # seeds CUDA too


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():  # this device only: a run may resume on a machine with fewer GPUs
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---------------------------------------------------------------- files

def atomic_save(obj, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def write_json(obj, path: Path) -> None:
    atomic_write(Path(path), lambda tmp: tmp.write_text(json.dumps(obj, indent=2, default=float) + "\n"))


def load_checkpoint(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise RunError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a torn or foreign file: say which, not a pickle traceback
        raise RunError(f"{path}: not a readable checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or "config" not in ckpt or "model" not in ckpt:
        raise RunError(f"{path}: not a checkpoint of this project (no config/model inside)")
    return ckpt


def checkpoint_config(ckpt: dict, path="checkpoint") -> Config:
    try:
        return Config.from_dict(ckpt["config"])
    except (TypeError, ValueError) as e:
        raise RunError(f"{path}: its config does not fit this version of the code ({e})") from None


def check_same_architecture(ckpt: dict, cfg: Config, path: Path, part: str = "model") -> None:
    """Fail in one line when a checkpoint was trained with a different architecture than requested."""
    saved = checkpoint_config(ckpt, path).to_dict()[part]  # fields added since then take their defaults
    wanted = cfg.to_dict()[part]
    training_only = {"epochs", "batch_size", "lr", "beta1", "beta2", "temperature", "top_k", "kind"}
    diff = [f"{k}={saved.get(k)!r} (requested {v!r})" for k, v in wanted.items()
            if k not in training_only and saved.get(k) != v]
    if diff:
        raise RunError(f"{path}: checkpoint was trained with a different architecture: {', '.join(diff)}")


def load_state(module: torch.nn.Module, state: dict, path: Path) -> None:
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()[0] if str(e) else "state does not match"
        raise RunError(f"{path}: checkpoint does not match the model ({first})") from None


def find_run(run_dir) -> Path:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"{run_dir}: no such run folder")
    if not (run_dir / "vqvae_best.pt").is_file() and not (run_dir / "vqvae_last.pt").is_file():
        raise RunError(f"{run_dir}: incomplete run (no vqvae_best.pt or vqvae_last.pt; did training finish?)")
    return run_dir


def load_vqvae(run_dir, device="cpu", which: str = "best"):
    """The run's VQ-VAE rebuilt from its checkpoint alone, in eval mode."""
    from modules import VQVAE

    run_dir = find_run(run_dir)
    path = run_dir / f"vqvae_{which}.pt"
    if not path.is_file():
        path = run_dir / "vqvae_last.pt"
    ckpt = load_checkpoint(path)
    cfg = checkpoint_config(ckpt, path)
    model = VQVAE(cfg.model)
    load_state(model, ckpt["model"], path)
    return model.to(device).eval(), cfg


PRIOR_FILES = {"gan": "gan_last.pt", "pixelcnn": "pixelcnn_last.pt"}


def load_prior(run_dir, kind: str, device="cpu"):
    """The run's prior of `kind` ("gan" or "pixelcnn"), rebuilt from its checkpoint alone, in eval mode."""
    from modules import CodeGenerator, PixelCNN

    run_dir = find_run(run_dir)
    path = run_dir / PRIOR_FILES[kind]
    if not path.is_file():
        raise RunError(f"{run_dir}: no {kind} prior in this run ({path.name} missing; did training finish?)")
    ckpt = load_checkpoint(path)
    cfg = checkpoint_config(ckpt, path)
    prior = CodeGenerator(cfg.gan, cfg.model) if kind == "gan" else PixelCNN(cfg.prior, cfg.model)
    load_state(prior, ckpt["model"], path)
    return prior.to(device).eval(), cfg
