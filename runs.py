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
import datetime
import json
import math
import os
import re
import resource
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


def close_distributed(wait_s: float = 60.0) -> None:
    """Leave the process group, after the other ranks have reached this point too: gloo aborts a process
    ("terminate called without an active exception") when a peer tears its connections down while this rank's
    last collective is still being wound up. A rank that does not arrive within `wait_s` (it failed alone) is
    not waited for longer."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    with contextlib.suppress(RuntimeError):
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=wait_s))
        else:
            dist.barrier()
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
    zero-fills it page by page, gigabytes of page faults per step. With mmap off and the heap trimmed only
    above 2 GiB of free space (much like CUDA's caching allocator), memory freed after one step serves the next
    without a fault. The price: the process holds on to its peak memory. A no-op off Linux and where malloc is
    not glibc's.
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


class PeakMemory:
    """Peak memory over a block: CUDA max_memory_allocated, or the process's peak RSS on the CPU."""

    def __init__(self, device: torch.device):
        self.device, self.mb, self.kind = device, float("nan"), ""

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            release_freed_host_memory()  # what earlier phases kept is not this block's peak
            try:
                Path("/proc/self/clear_refs").write_text("5")   # resets VmHWM (Linux >= 4.0)
                self.reset = True
            except OSError:
                self.reset = False
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mb, self.kind = torch.cuda.max_memory_allocated(self.device) / 2 ** 20, "cuda max allocated"
            return
        hwm = None
        if self.reset:
            with contextlib.suppress(OSError):
                for line in Path("/proc/self/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        hwm = int(line.split()[1]) / 1024
        if hwm is not None:
            self.mb, self.kind = hwm, "peak RSS"
        else:
            scale = 1 if sys.platform == "darwin" else 1024   # ru_maxrss: bytes on macOS, KiB elsewhere
            self.mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2 ** 20
            self.kind = "peak RSS (process lifetime)"


def _libc_function(name: str):
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None


def cpu_has_fast_bf16() -> bool:
    # With AVX512-BF16 or AMX the CPU computes bf16 products natively, more per instruction than fp32, and bf16
    # activations move half the bytes; without them bf16 is emulated through fp32 and slower than plain fp32.
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
    atomic_write(path, lambda tmp: save_through_handle(obj, tmp))


def save_through_handle(obj, path: Path) -> None:
    """torch.save, where a full disk is an OSError with its errno (ENOSPC) that callers can report as such.

    Given a name, torch.save writes from C++ and a failed write is a RuntimeError ("iostream error"); given a
    Python file the write raises OSError, but closing the zip archive then raises a RuntimeError over it."""
    try:
        with path.open("wb") as f:
            torch.save(obj, f)
    except RuntimeError as e:
        if isinstance(e.__context__, OSError):
            raise e.__context__ from None
        raise


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
    return read_config(find_run(run_dir) / "config.json")


def read_config(path: Path) -> Config:
    """A run's config.json; a missing file, broken JSON, an unknown key or a value of the wrong type (a hand
    edit) is one RunError line naming the file."""
    try:
        return Config.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        raise RunError(f"{path}: missing (every run folder written by driver.py has one)") from None
    except (TypeError, ValueError) as e:
        raise RunError(f"{path}: not a config of this version of the code ({e})") from None


def write_config(cfg: Config, run_dir) -> str | None:
    """Write the run's config.json; returns what it held before (None: nothing), for `restore_config`."""
    path = Path(run_dir) / "config.json"
    previous = path.read_text() if path.is_file() else None
    write_json(cfg.to_dict(), path)
    return previous


def restore_config(run_dir, previous: str | None) -> None:
    """Put back the config.json that `write_config` replaced, so that flags which made training diverge
    (--resume --lr 1e6) are not kept for the next plain --resume."""
    if previous is not None:
        atomic_write(Path(run_dir) / "config.json", lambda tmp: tmp.write_text(previous))


def load_histories(run_dir, names) -> dict:
    """{name: training history} of each of `names` that has a checkpoint in the run."""
    paths = {name: checkpoint_path(run_dir, name) for name in names}
    return {name: load_checkpoint(p)["state"]["history"] for name, p in paths.items() if p.is_file()}


# ---------------------------------------------------------------- checks before a run starts
# Each turns a mistake on the command line or a clash between runs into one line before any work is done.

def positive_float(text: str) -> float:
    """argparse type: a finite number above 0 (a learning rate); nan, inf, 0 and negatives are refused in one
    line, since each would train for minutes before the loss tells."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive finite number, not {text}")
    return value


def parse_device(name: str) -> torch.device:
    """--device: auto, cpu, cuda or cuda:N, checked against this machine. torch.device also takes mps, meta,
    xla and more, which this project does not run on: those fail here in one line, not deep in training."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", name):
        raise RunError(f"--device {name}: choose auto, cpu, cuda or cuda:N")
    device = pick_device(name)
    count = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.index is not None and device.index >= count:
        raise RunError(f"--device {name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return device


def claim_run_dir(root, name_fn) -> Path:
    """A new numbered run folder under `root`, created by this call; `name_fn(number)` gives its name
    ("007-quick-builtin"). The number follows the highest one taken. os.mkdir is atomic, so two runs started
    together never share a folder: the one that loses the race takes the next number. Rank 0 only."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise RunError(f"{root}: not a folder (expected the folder that holds the runs)")
    try:
        root.mkdir(parents=True, exist_ok=True)
        number = max(run_numbers(root), default=0) + 1
        for number in range(number, number + 1000):
            run_dir = root / name_fn(number)
            with contextlib.suppress(FileExistsError):
                run_dir.mkdir()
                return run_dir
    except OSError as e:
        raise RunError(f"{e.filename or root}: cannot create a run folder ({e.strerror or e})") from None
    raise RunError(f"{root}: no free run number after {number} (clear out old runs)")


def run_numbers(root: Path) -> list[int]:
    return [int(m.group(1)) for p in root.iterdir() if (m := re.match(r"(\d+)-", p.name))]


class RunLock:
    """`with RunLock(run_dir):` holds run_dir/.lock exclusively while one driver.py works in the folder, so a
    second one on the same folder is refused in one line instead of interleaving checkpoints. The kernel
    drops the lock when its process dies: a killed run never leaves the folder locked. The file stays:
    deleting it would let one process lock the old file and another a new one. Rank 0 only; a no-op where
    fcntl is missing (Windows)."""

    def __init__(self, run_dir):
        self.run_dir = Path(run_dir)
        self.file = None

    def __enter__(self) -> "RunLock":
        try:
            import fcntl
        except ImportError:
            return self
        path = self.run_dir / ".lock"
        try:
            file = path.open("a+")
        except OSError as e:
            raise RunError(f"{self.run_dir}: cannot create {path.name} ({e.strerror or e})") from None
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            file.seek(0)
            holder = file.read().strip() or "unknown"
            file.close()
            if isinstance(e, BlockingIOError):
                raise RunError(f"{self.run_dir}: another driver.py is using this run folder (pid {holder}); "
                               "wait for it or choose another --run-dir") from None
            # A filesystem without locks (some network mounts) must not stop the run, only lose the guard.
            print(f"warning: {self.run_dir}: cannot lock the run folder ({e.strerror or e})", file=sys.stderr)
            return self
        file.truncate(0)  # "a+" writes at the end, which is now the start
        file.write(f"{os.getpid()}\n")
        file.flush()
        self.file = file
        return self

    def __exit__(self, *exc) -> bool:
        if self.file is not None:
            self.file.close()  # closing the last descriptor releases the flock
            self.file = None
        return False


def remove_if_only_config(run_dir) -> bool:
    """After a failed start, remove a run folder that holds nothing but config.json (and .lock), so the failure
    leaves no debris and frees its run number. True if removed. A folder with anything else (a checkpoint,
    TensorBoard events) is kept. Only for a folder this start created, never a resumed run."""
    run_dir = Path(run_dir)
    try:
        entries = list(run_dir.iterdir())
        if any(p.name not in ("config.json", ".lock") or not p.is_file() for p in entries):
            return False
        for p in entries:
            p.unlink()
        run_dir.rmdir()
    except OSError:  # gone already, or not ours to remove: the start's own error is the one to report
        return False
    return True


def output_path(path, kind: str = "file") -> Path:
    """An --out `path` checked before any work, `kind` "file" or "folder": a folder given for a file, a file
    given for a folder, a parent folder that is missing or not writable is one RunError line, rather than an
    OSError traceback once the outputs are ready."""
    if kind not in ("file", "folder"):
        raise ValueError(f"kind must be 'file' or 'folder', not {kind!r}")
    path = Path(path)
    if kind == "file" and path.is_dir():
        raise RunError(f"{path}: is a folder; expected the name of a file to write")
    if kind == "folder" and path.exists() and not path.is_dir():
        raise RunError(f"{path}: is a file; expected a folder to write into")
    parent = path.parent
    if not parent.is_dir():
        problem = "is not a folder" if parent.exists() else "does not exist"
        raise RunError(f"{path}: its folder {parent} {problem}; create it first or choose another path")
    target = path if path.exists() else parent
    if not os.access(target, os.W_OK):
        raise RunError(f"{path}: no permission to write {'there' if target == path else f'in {parent}'}")
    return path


@contextlib.contextmanager
def writing(path):
    """`with writing(out):` turns an OSError while writing the output `path` (disk full, permission, a folder
    removed meanwhile) into one RunError line naming the file."""
    try:
        yield
    except OSError as e:
        raise RunError(f"{e.filename or path}: cannot write ({e.strerror or e})") from None


# ---------------------------------------------------------------- a run folder from start to end

class Interrupted(Exception):
    """Ctrl-C during a run, with a message that says what it left in the run folder."""


def resumable_run(run_dir) -> Path:
    """--resume's folder, refused in one line unless driver.py started a run there (config.json or a
    checkpoint inside): a typo in --run-dir must not start a new run silently."""
    if run_dir is None:
        raise RunError("--resume needs --run-dir (the run to continue)")
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"{run_dir}: no such run folder to --resume (leave out --resume to start a new run)")
    if not (run_dir / "config.json").is_file() and not any(run_dir.glob("*_last.pt")):
        raise RunError(f"{run_dir}: not a run folder (no config.json or checkpoint inside); nothing to --resume")
    return run_dir


def open_run_dir(run_dir, root, name_fn) -> tuple[Path, bool]:
    """(folder, created by this call): `run_dir` when given, made if missing, else a new numbered folder under
    `root` (`claim_run_dir`). mkdir without exist_ok tells, atomically, whether this start made the folder."""
    if run_dir is None:
        return claim_run_dir(root, name_fn), True
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True)
        return run_dir, True
    except FileExistsError:
        if not run_dir.is_dir():
            raise RunError(f"{run_dir}: is a file; expected a run folder") from None
        return run_dir, False
    except OSError as e:
        raise RunError(f"{e.filename or run_dir}: cannot create the run folder ({e.strerror or e})") from None


@contextlib.contextmanager
def run_folder(run_dir, name_fn, root="runs"):
    """`with run_folder(args.run_dir, name_fn) as run_dir:` the folder of one driver.py run on every rank,
    opened by rank 0 (`open_run_dir`) and locked by it (`RunLock`) until the run ends, before config.json is
    written. A start that fails or is interrupted in a folder this call created removes it again while it
    holds only config.json, freeing the name and its number. Ctrl-C becomes `Interrupted`, whose message
    names the folder and what is saved in it."""
    created, failure = False, None
    with contextlib.ExitStack() as lock:
        if dist_info()[0] == 0:
            try:
                run_dir, created = open_run_dir(run_dir, root, name_fn)
                lock.enter_context(RunLock(run_dir))
            except RunError as e:
                failure = str(e)
        run_dir, failure = broadcast_object((run_dir, failure))  # every rank fails together, none waits
        if failure:
            raise RunError(failure)
        try:
            yield run_dir
        except BaseException as e:
            if created and dist_info()[0] == 0:
                remove_if_only_config(run_dir)
            if isinstance(e, KeyboardInterrupt):
                raise Interrupted(interrupted_message(run_dir)) from None
            raise


def interrupted_message(run_dir: Path) -> str:
    """What Ctrl-C left: a run to --resume only when a model finished an epoch (a *_last.pt exists)."""
    if not run_dir.is_dir():
        return f"interrupted before training began; {run_dir} removed (nothing was saved)"
    saved = sorted(p.name for p in run_dir.glob("*_last.pt"))
    if not saved:
        return f"interrupted before the first epoch finished; no checkpoint in {run_dir} yet"
    return (f"interrupted: the last finished epoch is saved in {run_dir} ({', '.join(saved)}); "
            f"continue with --resume --run-dir {run_dir}")
