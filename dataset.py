"""OASIS slice splits: find them, decode every PNG once into a uint8 cache, serve batches from the device.

    python dataset.py --data-dir DIR            # counts, image size, intensity statistics, cache, montage

(`python synthetic.py OUT` writes the built-in synthetic set in the OASIS layout.)

`DIR` is the folder holding `keras_png_slices_{train,validate,test}` or its parent (the folder that holds
`keras_png_slices_data`). Segmentation folders (`keras_png_slices_seg_*`) and non-PNG files are ignored.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import json
import os
import re
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

SPLITS = ("train", "validate", "test")
CACHE_VERSION = 1
BUILTIN_DIR = Path(__file__).resolve().parent / "data" / "builtin"


class DataError(Exception):
    """A problem with the user's data, reported as one line without a traceback."""


@dataclass
class Split:
    images: torch.Tensor     # uint8, N x 1 x H x W, on the device it will be consumed on
    names: list[str]         # file names, in natural order
    folder: Path

    def __len__(self) -> int:
        return len(self.names)


# ---------------------------------------------------------------- finding files

def natural_key(name: str) -> list:
    """Sort key that puts case_2 before case_10 and slice_2 before slice_10."""
    return [int(tok) if tok.isdigit() else tok.lower() for tok in re.split(r"(\d+)", name)]


def split_folder_name(split: str) -> str:
    return f"keras_png_slices_{split}"


def find_root(data_dir) -> Path:
    """The folder holding the split folders: `data_dir` itself or its `keras_png_slices_data` child."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: no such folder (expected the OASIS keras_png_slices_data folder)")
    for root in (data_dir, data_dir / "keras_png_slices_data"):
        if any((root / split_folder_name(s)).is_dir() for s in SPLITS):
            check_no_split_is_a_file(root)
            return root
    wanted = ", ".join(split_folder_name(s) for s in SPLITS)
    raise DataError(f"{data_dir}: none of the split folders found (expected {wanted}, "
                    "here or in keras_png_slices_data/)")


def check_no_split_is_a_file(root: Path) -> None:
    """A split name taken by a file would otherwise drop that split without a word."""
    for s in SPLITS:
        path = root / split_folder_name(s)
        if path.exists() and not path.is_dir():
            raise DataError(f"{path}: not a folder (expected the {s} split: a folder of PNG slices)")


def list_pngs(folder: Path) -> list[Path]:
    if folder.exists() and not folder.is_dir():
        raise DataError(f"{folder}: not a folder (expected a folder of PNG slices)")
    if not folder.is_dir():
        raise DataError(f"{folder}: split folder missing")
    # Dot-files are never slices: macOS writes a ._NAME.png AppleDouble file beside every file it copies.
    files = sorted((p for p in folder.iterdir() if p.suffix.lower() == ".png" and not p.name.startswith(".")),
                   key=lambda p: natural_key(p.name))
    if not files:
        raise DataError(f"{folder}: no PNG files (expected case_XXX_slice_Y.nii.png slices)")
    return files


# ---------------------------------------------------------------- decoding

def decode_png(path: Path, size: int) -> tuple[np.ndarray, bool, str]:
    """One slice as uint8 size x size gray, whether it had to be resized, and its PNG mode ("L": 8-bit gray).

    RGB(A) goes through ITU-R 601 luma (alpha dropped), 16-bit through its full 0..65535 range.
    """
    try:
        with Image.open(path) as im:
            im.load()
            mode, gray = im.mode, to_gray_float(im)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:  # a few KB can hold 14000x14000
        raise DataError(f"{path}: image too large to decode ({e})") from None
    except (UnidentifiedImageError, SyntaxError, ValueError, EOFError) as e:
        raise DataError(f"{path}: not a decodable PNG ({e})") from None
    except OSError as e:
        if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError)) or e.errno:
            raise DataError(f"{path}: cannot read file ({e.strerror or e})") from None
        raise DataError(f"{path}: not a decodable PNG, truncated or corrupt ({e})") from None
    resized = gray.shape != (size, size)
    if resized:
        gray = np.asarray(Image.fromarray(gray).resize((size, size), Image.BILINEAR))  # float32 -> mode "F"
    return np.clip(np.rint(gray * 255.0), 0, 255).astype(np.uint8), resized, mode


def to_gray_float(im: Image.Image) -> np.ndarray:
    """float32 gray in [0, 1] for any PNG mode."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # PNG's 16-bit gray: scaled by its range, never its content
        return np.asarray(im, dtype=np.float32) / 65535.0
    if im.mode in ("RGBA", "LA", "PA"):
        im = im.convert("RGB" if im.mode == "RGBA" else "L")
    if im.mode != "L":
        im = im.convert("L")
    return np.asarray(im, dtype=np.float32) / 255.0


def decode_all(files: list[Path], size: int, skip_bad: bool, desc: str) -> tuple[np.ndarray, list[str], list[str]]:
    """Decode files in parallel threads (PIL releases the GIL): N x 1 x size x size uint8, the names kept, and
    one message per file skipped (skip_bad), which the cache keeps so that a cached run still names them."""
    from tqdm import tqdm

    def one(path):
        try:
            return decode_png(path, size)
        except DataError as e:
            if not skip_bad:
                raise
            return e

    # Pillow only warns between its pixel limit and twice it, then decodes gigabytes; the filter is process-wide
    # (not per thread), so it is set here around the pool rather than in decode_png.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))
        try:
            results = list(tqdm(pool.map(one, files), total=len(files), desc=desc, unit="img", leave=False,
                                disable=len(files) < 200))
        finally:  # on Ctrl-C or a bad file, drop the queued files rather than decode the whole split first
            pool.shutdown(cancel_futures=True)
    skipped = [str(r) for r in results if isinstance(r, DataError)]
    warn_skipped(skipped)
    kept = [(f, r) for f, r in zip(files, results) if not isinstance(r, DataError)]
    if not kept:
        raise DataError(f"{files[0].parent}: no decodable PNG files")
    n_resized = sum(r[1] for _, r in kept)
    if n_resized:
        print(f"{files[0].parent.name}: resized {n_resized} of {len(kept)} slices to {size}x{size}")
    converted = [r[2] for _, r in kept if r[2] != "L"]  # OASIS slices are 8-bit gray: anything else is news
    if converted:
        print(f"{files[0].parent.name}: converted {len(converted)} of {len(kept)} slices to 8-bit gray "
              f"(from {', '.join(sorted(set(converted)))})")
    array = np.stack([r[0] for _, r in kept])[:, None]
    return array, [f.name for f, _ in kept], skipped


def warn_skipped(messages: list[str]) -> None:
    for message in messages:
        print(f"warning: skipping {message}", file=sys.stderr)


# ---------------------------------------------------------------- the cache

def default_cache_dir() -> Path:
    return Path(os.environ.get("OASIS_VQVAE_CACHE", Path.home() / ".cache" / "oasis-vqvae"))


def cache_key(files: list[Path], size: int, skip_bad: bool) -> str:
    h = hashlib.sha256(f"{CACHE_VERSION}|{size}|{skip_bad}".encode())
    for f in files:
        try:
            st = f.stat()
            # chmod leaves the mtime alone: a file skipped as unreadable must be retried once it is readable.
            h.update(f"|{f.name}|{st.st_size}|{st.st_mtime_ns}|{os.access(f, os.R_OK)}".encode())
        except OSError:  # decoding names the file (or --skip-bad skips it)
            h.update(f"|{f.name}|unreadable".encode())
    return h.hexdigest()


def cache_paths(folder: Path, size: int, cache_dir: Path) -> tuple[Path, Path]:
    # One cache entry per (folder, size): a changed folder overwrites its own entry instead of piling up.
    stem = hashlib.sha256(f"{folder.resolve()}|{size}".encode()).hexdigest()[:16]
    return cache_dir / f"{folder.name}-{size}-{stem}.npy", cache_dir / f"{folder.name}-{size}-{stem}.json"


STALE_TEMP_SECONDS = 10 * 60


def atomic_write(path: Path, write) -> None:
    """Write through a temp file in the same folder and rename, so no reader ever sees half a file."""
    remove_stale_temps(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale_temps(path: Path, older_than: float = STALE_TEMP_SECONDS) -> None:
    """Remove the temp files of `path` that a killed writer left behind (.NAME.PID.tmp). A live writer's temp
    is younger than minutes however long the write: each chunk written to it moves its mtime."""
    prefix = f".{path.name}."
    for tmp in path.parent.glob(glob.escape(prefix) + "*.tmp"):
        if not tmp.name[len(prefix):-len(".tmp")].isdigit():
            continue  # another target's temp, e.g. that of NAME.1
        with contextlib.suppress(OSError):  # gone already, or not ours to remove: the write itself still works
            if time.time() - tmp.stat().st_mtime > older_than:
                tmp.unlink()


def save_npy(path: Path, array: np.ndarray) -> None:
    with path.open("wb") as f:  # a handle: given a name not ending in .npy, np.save would append one
        np.save(f, array, allow_pickle=False)


def load_folder(folder, size: int = 256, cache_dir=None, skip_bad: bool = False) -> tuple[np.ndarray, list[str]]:
    """All PNG slices of one folder as uint8 N x 1 x size x size, decoded once and cached on disk."""
    folder = Path(folder)
    files = list_pngs(folder)
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    array_path, meta_path = cache_paths(folder, size, cache_dir)
    key = cache_key(files, size, skip_bad)
    cached = read_cache(array_path, meta_path, key, size)
    if cached is not None:
        array, names, skipped = cached
        warn_skipped(skipped)  # a cached run leaves out the same files, so it says so the same way
        return array, names
    array, names, skipped = decode_all(files, size, skip_bad, desc=f"decoding {folder.name}")
    meta = {"key": key, "names": names, "skipped": skipped}
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(array_path, lambda p: save_npy(p, array))
        atomic_write(meta_path, lambda p: p.write_text(json.dumps(meta)))
    except OSError as e:  # a read-only cache only costs speed
        print(f"warning: could not write cache in {cache_dir} ({e.strerror or e})", file=sys.stderr)
    return array, names


def read_cache(array_path: Path, meta_path: Path, key: str, size: int):
    """The cached (array, names, skip messages), or None when the entry is missing, stale or damaged in any
    way: a cache is only ever rebuilt, never trusted or reported as the user's problem."""
    try:
        meta = json.loads(meta_path.read_text())
        if not valid_meta(meta) or meta["key"] != key:
            return None
        array = np.load(array_path)
    except (OSError, ValueError):
        return None
    if array.dtype != np.uint8 or array.shape != (len(meta["names"]), 1, size, size):
        return None
    return array, meta["names"], meta["skipped"]


def valid_meta(meta) -> bool:
    """A hand-edited or foreign meta file parses as JSON but may hold anything (null, a list, no names)."""
    return (isinstance(meta, dict) and isinstance(meta.get("key"), str)
            and all(is_list_of_str(meta.get(field)) for field in ("names", "skipped")))


def is_list_of_str(value) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def load_split(data_dir, split: str, size: int = 256, cache_dir=None, skip_bad: bool = False) -> Split:
    folder = find_root(data_dir) / split_folder_name(split)
    array, names = load_folder(folder, size, cache_dir, skip_bad)
    return Split(torch.from_numpy(array), names, folder)


def load_splits(data_dir, size: int = 256, cache_dir=None, skip_bad: bool = False, splits=SPLITS) -> dict[str, Split]:
    find_root(data_dir)  # fail on a bad root before touching any split
    return {s: load_split(data_dir, s, size, cache_dir, skip_bad) for s in splits}


# ---------------------------------------------------------------- batches

def epoch_permutation(n: int, seed: int, epoch: int, device="cpu") -> torch.Tensor:
    """The same shuffled order for a (seed, epoch) on every machine and every rank."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).to(device)


def to_float(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 slices -> float32 in [0, 1], on whatever device they live on."""
    # Two passes, yet faster on CPU than the one mixed-dtype `images_u8 * (1 / 255)`, whose CPU kernel casts
    # element by element instead of running vectorised; the values are bit-identical (tests/test_dataset.py).
    return images_u8.float().mul_(1.0 / 255.0)


def gather(images_u8: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """images_u8[idx] for a 1-D integer index on the same device: index_select copies whole slices at once,
    where advanced indexing on CPU computes an offset per element."""
    return images_u8.index_select(0, idx)


def batches(images_u8: torch.Tensor, batch_size: int):
    """Float batches of the resident uint8 tensor in order, the last one ragged: no per-image Python.
    (Training batches: train.training_batch.)"""
    for start in range(0, len(images_u8), batch_size):
        yield to_float(images_u8[start:start + batch_size])


# ---------------------------------------------------------------- built-in data

def ensure_builtin(out_dir=BUILTIN_DIR, size: int = 256) -> Path:
    """The built-in synthetic set, generated on first use (deterministic, a few seconds).

    Two runs started together may both generate it; the set is the same whichever finishes first, so the
    second one's failure to rename its copy into place is no error once every split is there."""
    out_dir = Path(out_dir)
    if not builtin_complete(out_dir):
        from synthetic import write_synthetic_dataset
        try:
            write_synthetic_dataset(out_dir, size=size)
        except OSError:  # FileExistsError, or a rename onto a split folder the other run has just filled
            if not builtin_complete(out_dir):
                raise
    return out_dir


def builtin_complete(out_dir: Path) -> bool:
    return all((out_dir / split_folder_name(s)).is_dir() for s in SPLITS)


# ---------------------------------------------------------------- CLI

def intensity_stats(images_u8: torch.Tensor, chunk: int = 512) -> dict:
    """Mean, std, background fraction and mean of non-zero pixels, in chunks: a whole OASIS split as float
    would take gigabytes."""
    total = total_sq = zeros = 0.0
    for start in range(0, len(images_u8), chunk):
        x = images_u8[start:start + chunk].double() / 255
        total, total_sq = total + float(x.sum()), total_sq + float(x.pow(2).sum())
        zeros += float((x == 0).sum())
    n = images_u8.numel()
    mean = total / n
    return {"mean": mean, "std": max(total_sq / n - mean**2, 0.0) ** 0.5, "background": zeros / n,
            "brain_mean": total / max(n - zeros, 1)}


def describe(data_dir, size: int, cache_dir, skip_bad: bool, montage: Path) -> None:
    root = find_root(data_dir)
    present = [s for s in SPLITS if (root / split_folder_name(s)).is_dir()]
    print(f"data root: {root}")
    print(f"cache:     {Path(cache_dir) if cache_dir else default_cache_dir()}")
    shown = None
    for s in present:
        split = load_split(root, s, size, cache_dir, skip_bad)
        stats = intensity_stats(split.images)
        print(f"{s:9s} {len(split):6d} slices  {size}x{size}  mean {stats['mean']:.3f}  std {stats['std']:.3f}  "
              f"background {stats['background']:.1%}  brain mean {stats['brain_mean']:.3f}")
        shown = split if s == "train" or shown is None else shown
    from figures import save_montage
    save_montage(to_float(shown.images[:: max(1, len(shown) // 32)][:32]), montage,
                 title=f"{root.name} / {shown.folder.name}")
    print(f"montage:   {montage}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True,
                   help="OASIS folder (holding keras_png_slices_{train,validate,test}) to describe")
    p.add_argument("--size", type=int, default=256, help="slice size in pixels (default: 256)")
    p.add_argument("--cache-dir",
                   help="where decoded splits are cached (default: $OASIS_VQVAE_CACHE or ~/.cache/oasis-vqvae)")
    p.add_argument("--skip-bad", action="store_true", help="skip undecodable or unreadable PNGs with a warning")
    p.add_argument("--montage", type=Path, default=Path("montage.png"),
                   help="montage PNG to write (default: montage.png)")
    args = p.parse_args(argv)
    try:
        describe(args.data_dir, args.size, args.cache_dir, args.skip_bad, args.montage)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: cache writes remove their temp files on the way out; nothing else to undo
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
