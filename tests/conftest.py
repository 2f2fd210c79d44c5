import signal
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own decode cache, never the user's."""
    monkeypatch.setenv("OASIS_VQVAE_CACHE", str(tmp_path / "cache"))


def write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def make_tree(root: Path, cases=(2, 1, 1), slices: int = 3, size: int = 16, seed: int = 0) -> Path:
    """A tiny OASIS-layout tree with canonical names, a seg folder and a stray non-PNG file."""
    rng = np.random.default_rng(seed)
    case = 1
    for split, n in zip(("train", "validate", "test"), cases):
        for _ in range(n):
            for s in range(slices):
                write_png(root / f"keras_png_slices_{split}" / f"case_{case:03d}_slice_{s}.nii.png",
                          rng.integers(0, 256, (size, size), dtype=np.uint8))
                write_png(root / f"keras_png_slices_seg_{split}" / f"seg_{case:03d}_slice_{s}.nii.png",
                          np.zeros((size, size), np.uint8))
            case += 1
    (root / "keras_png_slices_train" / "notes.txt").write_text("not an image")
    return root


@pytest.fixture
def tree(tmp_path):
    return make_tree(tmp_path / "keras_png_slices_data")


def default_sigint() -> None:
    """preexec_fn for a child whose Ctrl-C is under test: SIGINT back to its default. A suite started as a
    background job of a shell without job control runs with SIGINT ignored, and children inherit that, so
    Python would install no KeyboardInterrupt handler and the signal the test sends would do nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
