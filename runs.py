"""Run folders, checkpoints, devices, numerics, RNG and the distributed helpers, shared by every program.

    runs/<name>/config.json   metrics.json   events.out.tfevents.*   figures/
                vqvae_last.pt vqvae_best.pt  <prior>_last.pt (gan, pixelcnn, ...)

Every checkpoint has one layout, {"config", "models", "optimizers", "state", "rng"}, and holds the whole
config as a plain dict, so a model can be rebuilt from the file alone; checkpoints are written to a temp
name and renamed, and read with `weights_only=True`.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

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


# ---------------------------------------------------------------- distributed

def dist_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed() -> torch.device | None:
    """Under torchrun: join the process group and return this rank's device; None outside torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device("cpu")


def close_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist_info()[1] > 1:
        dist.barrier()


def broadcast_object(obj):
    """Rank 0's value of a picklable object, on every rank."""
    if dist_info()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_ranks_finite(values: torch.Tensor) -> bool:
    """True when values are finite on every rank: one host sync, and every rank gets the same answer."""
    finite = torch.isfinite(values).all().float()
    if dist_info()[1] > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


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


def checkpoint(cfg: Config, models: dict, optimizers: dict, state: dict) -> dict:
    """The one checkpoint layout, for every model of the project."""
    return {"config": cfg.to_dict(), "models": {k: m.state_dict() for k, m in models.items()},
            "optimizers": {k: o.state_dict() for k, o in optimizers.items()}, "state": state, "rng": rng_state()}


def load_checkpoint(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise RunError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a torn or foreign file: say which, not a pickle traceback
        raise RunError(f"{path}: not a readable checkpoint ({type(e).__name__})") from None
    if isinstance(ckpt, dict) and "model" in ckpt and "models" not in ckpt:
        raise RunError(f"{path}: written by an older version of this project (checkpoint layout before the one "
                       "training loop); retrain, or use that version to read it")
    if not isinstance(ckpt, dict) or "config" not in ckpt or "models" not in ckpt:
        raise RunError(f"{path}: not a checkpoint of this project (no config/models inside)")
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


def checkpoint_path(run_dir, name: str, which: str = "last") -> Path:
    """Where a run keeps the `which` ("last" or "best") checkpoint of model `name` ("vqvae" or a prior)."""
    return Path(run_dir) / f"{name}_{which}.pt"


def run_config(run_dir) -> Config:
    """The run's current settings (prior, samples, seed): its config.json, which a resume may have changed
    since the VQ-VAE checkpoint was written."""
    path = find_run(run_dir) / "config.json"
    try:
        return Config.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        raise RunError(f"{path}: missing (every run folder written by driver.py has one)") from None
    except (TypeError, ValueError) as e:
        raise RunError(f"{path}: not a config of this version of the code ({e})") from None


def load_histories(run_dir, names) -> dict:
    """{name: training history} of each of `names` that has a checkpoint in the run."""
    paths = {name: checkpoint_path(run_dir, name) for name in names}
    return {name: load_checkpoint(p)["state"]["history"] for name, p in paths.items() if p.is_file()}
