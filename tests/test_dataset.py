import json
import os
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from conftest import default_sigint, make_tree, write_png

import dataset
from dataset import DataError, batches, find_root, load_folder, load_split, load_splits, natural_key


def test_finds_splits_from_data_folder_or_its_parent(tree):
    assert find_root(tree) == tree
    assert find_root(tree.parent) == tree
    splits = load_splits(tree, size=16)
    assert {k: len(v) for k, v in splits.items()} == {"train": 6, "validate": 3, "test": 3}
    assert all(name.endswith(".png") for s in splits.values() for name in s.names)  # seg + notes.txt ignored
    assert all("seg" not in str(s.folder) for s in splits.values())


def test_dot_files_are_not_slices(tree):
    (tree / "keras_png_slices_train" / "._case_001_slice_0.nii.png").write_bytes(b"\0\5\26\7 AppleDouble")
    split = load_split(tree, "train", size=16)
    assert len(split) == 6 and not any(name.startswith(".") for name in split.names)


def test_natural_order(tmp_path):
    folder = tmp_path / "keras_png_slices_train"
    for case in (10, 2):
        for s in (10, 2, 1):
            write_png(folder / f"case_{case}_slice_{s}.nii.png", np.zeros((8, 8), np.uint8))
    _, names = load_folder(folder, size=8)
    assert names == [f"case_{c}_slice_{s}.nii.png" for c in (2, 10) for s in (1, 2, 10)]
    assert sorted(["b10", "b9", "a"], key=natural_key) == ["a", "b9", "b10"]


def test_cache_is_built_reused_and_invalidated(tree, monkeypatch):
    folder = tree / "keras_png_slices_train"
    first, names = load_folder(folder, size=16)
    calls = []
    monkeypatch.setattr(dataset, "decode_all", lambda *a, **k: calls.append(1) or (first, names, []))
    again, _ = load_folder(folder, size=16)
    assert calls == [] and np.array_equal(first, again)
    monkeypatch.undo()
    changed = folder / "case_001_slice_0.nii.png"
    write_png(changed, np.full((16, 16), 7, np.uint8))
    os.utime(changed, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    rebuilt, _ = load_folder(folder, size=16)
    assert (rebuilt[0] == 7).all()
    cache_files = list((tree.parent / "cache").iterdir())
    assert len(cache_files) == 2 and not any(f.name.endswith(".tmp") for f in cache_files)


def test_gray_conversion_of_rgb_rgba_and_16_bit(tmp_path, capsys):
    folder = tmp_path / "imgs"
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 0] = 255  # pure red -> ITU-R 601 luma 0.299
    write_png(folder / "a_rgb.png", rgb)
    rgba = np.dstack([rgb, np.full((8, 8), 128, np.uint8)])
    write_png(folder / "b_rgba.png", rgba)
    write_png(folder / "c_16.png", np.full((8, 8), 32768, np.uint16))
    array, names = load_folder(folder, size=8)
    assert names == ["a_rgb.png", "b_rgba.png", "c_16.png"]
    assert array.dtype == np.uint8 and array.shape == (3, 1, 8, 8)
    assert abs(int(array[0, 0, 0, 0]) - round(0.299 * 255)) <= 1
    assert abs(int(array[1, 0, 0, 0]) - round(0.299 * 255)) <= 1
    assert abs(int(array[2, 0, 0, 0]) - 128) <= 1  # half of the 16-bit range, not clipped to 255
    assert "imgs: converted 3 of 3 slices to 8-bit gray (from I;16, RGB, RGBA)" in capsys.readouterr().out


def test_palette_is_announced_and_gray_is_not(tmp_path, capsys):
    folder = tmp_path / "imgs"
    write_png(folder / "gray.png", np.full((8, 8), 9, np.uint8))
    load_folder(folder, size=8)
    assert "converted" not in capsys.readouterr().out
    Image.fromarray(np.full((8, 8), 9, np.uint8)).convert("P").save(folder / "palette.png")
    array, _ = load_folder(folder, size=8)
    assert (array == 9).all() and "converted 1 of 2 slices to 8-bit gray (from P)" in capsys.readouterr().out


def test_resize_and_report(tmp_path, capsys):
    folder = tmp_path / "imgs"
    write_png(folder / "big.png", np.full((32, 32), 200, np.uint8))
    write_png(folder / "ok.png", np.full((16, 16), 100, np.uint8))
    array, _ = load_folder(folder, size=16)
    assert array.shape == (2, 1, 16, 16) and (array[0] == 200).all()
    assert "resized 1 of 2" in capsys.readouterr().out


# ---------------------------------------------------------------- bad input: one clear line, non-zero exit

def run_cli(args, capsys):
    code = dataset.main(args)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def test_missing_root(tmp_path, capsys):
    code, err = run_cli(["--data-dir", str(tmp_path / "nope")], capsys)
    assert code == 2 and len(err) == 1 and "nope" in err[0] and "no such folder" in err[0]


def test_root_without_splits(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, err = run_cli(["--data-dir", str(tmp_path / "empty")], capsys)
    assert code == 2 and len(err) == 1 and "keras_png_slices_train" in err[0]


def test_split_without_pngs(tmp_path, capsys):
    (tmp_path / "keras_png_slices_train").mkdir()
    (tmp_path / "keras_png_slices_train" / "readme.txt").write_text("x")
    code, err = run_cli(["--data-dir", str(tmp_path)], capsys)
    assert code == 2 and len(err) == 1 and "no PNG files" in err[0] and "keras_png_slices_train" in err[0]


@pytest.mark.parametrize("content", [b"this is not a png", None])
def test_undecodable_or_truncated_png_is_named(tree, capsys, content):
    bad = tree / "keras_png_slices_train" / "case_001_slice_1.nii.png"
    data = bad.read_bytes()
    bad.write_bytes(content if content is not None else data[: len(data) // 2])
    code, err = run_cli(["--data-dir", str(tree), "--montage", str(tree.parent / "m.png")], capsys)
    assert code == 2 and len(err) == 1 and str(bad) in err[0] and "PNG" in err[0]
    assert not (tree.parent / "m.png").exists()
    assert not list((tree.parent / "cache").glob("*train*"))  # nothing half-written


def test_skip_bad_skips_with_a_warning(tree, capsys):
    bad = tree / "keras_png_slices_train" / "case_001_slice_1.nii.png"
    bad.write_bytes(b"garbage")
    split = load_split(tree, "train", size=16, skip_bad=True)
    assert len(split) == 5 and bad.name not in split.names
    assert "skipping" in capsys.readouterr().err


def test_unreadable_file(tree, capsys):
    link = tree / "keras_png_slices_train" / "case_009_slice_0.nii.png"
    link.symlink_to(tree / "does_not_exist.png")  # chmod cannot make a file unreadable for root
    code, err = run_cli(["--data-dir", str(tree)], capsys)
    assert code == 2 and len(err) == 1 and str(link) in err[0] and "cannot read" in err[0]


# ---------------------------------------------------------------- batches

def test_batches_shapes_ranges_and_order():
    images = torch.arange(10, dtype=torch.uint8).mul(25).view(10, 1, 1, 1).expand(10, 1, 4, 4).contiguous()
    got = list(batches(images, 4))
    assert [len(b) for b in got] == [4, 4, 2]
    assert all(b.dtype == torch.float32 and 0 <= b.min() and b.max() <= 1 for b in got)
    assert torch.allclose(torch.cat(got)[:, 0, 0, 0], torch.arange(10).float() * 25 / 255)


def test_epoch_permutation_depends_on_seed_and_epoch_only():
    order = dataset.epoch_permutation(10, seed=3, epoch=1)
    assert sorted(order.tolist()) == list(range(10))
    assert torch.equal(order, dataset.epoch_permutation(10, seed=3, epoch=1))
    assert not torch.equal(order, dataset.epoch_permutation(10, seed=3, epoch=2))


def test_to_float_and_gather_match_the_plain_expressions():
    every_value = torch.arange(256, dtype=torch.uint8).view(4, 1, 8, 8)
    assert torch.equal(dataset.to_float(every_value), every_value * (1.0 / 255.0))
    idx = torch.tensor([3, 0, 3, 1])
    assert torch.equal(dataset.gather(every_value, idx), every_value[idx])


def test_describe_cli_prints_counts_and_writes_montage(tmp_path, capsys):
    tree = make_tree(tmp_path / "d", size=16)
    code = dataset.main(["--data-dir", str(tree), "--size", "16", "--montage", str(tmp_path / "m.png")])
    out = capsys.readouterr().out
    assert code == 0 and (tmp_path / "m.png").exists()
    assert "train" in out and "validate" in out and "test" in out and "16x16" in out


# ---------------------------------------------------------------- the CLI as a user runs it: exit code and one line

ROOT = Path(__file__).resolve().parents[1]


def run_script(*args, **kwargs) -> subprocess.CompletedProcess:
    """`python dataset.py ARGS` in a fresh process (the cache comes from the test's environment)."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, preexec_fn=default_sigint, **kwargs)


def describe_cli(tree, *flags) -> subprocess.CompletedProcess:
    return run_script("dataset.py", "--data-dir", str(tree), "--size", "16", "--montage",
                      str(tree.parent / "m.png"), *flags)


@pytest.mark.parametrize("meta", ["null", "[]", '{"key": "x"}', '{"names": 3}'])
def test_cache_meta_of_the_wrong_shape_is_rebuilt(tree, meta):
    assert describe_cli(tree).returncode == 0
    metas = sorted((tree.parent / "cache").glob("*.json"))
    assert len(metas) == 3
    for path in metas:
        path.write_text(meta)
    result = describe_cli(tree)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "train" in result.stdout
    assert all(isinstance(json.loads(p.read_text()).get("names"), list) for p in metas)


def test_cache_array_of_the_wrong_shape_is_rebuilt(tree):
    folder = tree / "keras_png_slices_train"
    first, _ = load_folder(folder, size=16)
    array_path, _ = dataset.cache_paths(folder, 16, tree.parent / "cache")
    np.save(array_path, np.zeros((6, 16, 16), np.uint8))  # right length, wrong shape: a foreign file
    again, _ = load_folder(folder, size=16)
    assert np.array_equal(first, again)


def write_huge_png(path: Path, side: int) -> Path:
    """A blank 1-bit PNG of side x side pixels, written row by row: 14000x14000 takes ~24 KB on disk and
    would take 200 MB to build through Pillow."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z, row, body = zlib.compressobj(9), b"\0" * (1 + (side + 7) // 8), []
    body = [z.compress(row) for _ in range(side)] + [z.flush()]
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", b"".join(body)) + chunk(b"IEND", b""))
    return path


def test_decompression_bomb_is_one_line_or_skipped(tree):
    bomb = write_huge_png(tree / "keras_png_slices_train" / "case_001_slice_1.nii.png", 14000)
    assert bomb.stat().st_size < 100_000
    result = describe_cli(tree)
    err = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(err) == 1, result.stderr
    assert str(bomb) in err[0] and "too large" in err[0]
    result = describe_cli(tree, "--skip-bad")
    assert result.returncode == 0 and "train          5 slices" in result.stdout, result.stderr
    assert f"warning: skipping {bomb}" in result.stderr and "Traceback" not in result.stderr


def test_image_between_the_pixel_limit_and_twice_it_is_refused_too(tmp_path, monkeypatch):
    monkeypatch.setattr(dataset.Image, "MAX_IMAGE_PIXELS", 200)  # 16x16 is over it, under twice it: a warning
    write_png(tmp_path / "imgs" / "a.png", np.zeros((16, 16), np.uint8))
    with pytest.raises(DataError, match="a.png: image too large"):
        load_folder(tmp_path / "imgs", size=16)


def test_skipped_file_is_named_on_a_cache_hit_and_retried_once_readable(tree, monkeypatch, capsys):
    # chmod cannot make a file unreadable for root: Pillow and os.access are told so instead.
    bad = tree / "keras_png_slices_train" / "case_001_slice_1.nii.png"
    real_open, real_access = dataset.Image.open, os.access

    def open_unless_bad(path, *args, **kwargs):
        if Path(path) == bad:
            raise PermissionError(13, "Permission denied", str(bad))
        return real_open(path, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(dataset.Image, "open", open_unless_bad)
        m.setattr(os, "access", lambda path, mode: Path(path) != bad and real_access(path, mode))
        assert len(load_split(tree, "train", size=16, skip_bad=True)) == 5
        first = capsys.readouterr().err
        assert f"warning: skipping {bad}: cannot read file (Permission denied)" in first
        m.setattr(dataset, "decode_all", lambda *a, **k: pytest.fail("cache not used"))
        assert len(load_split(tree, "train", size=16, skip_bad=True)) == 5
        assert capsys.readouterr().err == first  # the same warning, from the cache
    # "chmod +r": same size, same mtime, now readable
    split = load_split(tree, "train", size=16, skip_bad=True)
    assert len(split) == 6 and bad.name in split.names and "skipping" not in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_file_fixed_by_chmod_is_retried(tree, capsys):
    bad = tree / "keras_png_slices_train" / "case_001_slice_1.nii.png"
    bad.chmod(0)
    assert len(load_split(tree, "train", size=16, skip_bad=True)) == 5
    assert len(load_split(tree, "train", size=16, skip_bad=True)) == 5
    assert capsys.readouterr().err.count(f"skipping {bad}") == 2
    bad.chmod(0o644)
    assert len(load_split(tree, "train", size=16, skip_bad=True)) == 6


def test_split_name_taken_by_a_file_is_named(tree):
    test_folder = tree / "keras_png_slices_test"
    shutil.rmtree(test_folder)
    test_folder.write_text("not a folder")
    result = describe_cli(tree)
    err = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(err) == 1, result.stderr
    assert str(test_folder) in err[0] and "not a folder" in err[0]
    with pytest.raises(DataError, match="not a folder"):
        dataset.list_pngs(test_folder)


def test_atomic_write_removes_temps_a_killed_writer_left(tmp_path):
    target = tmp_path / "vqvae_last.pt"
    old, young, other = (tmp_path / ".vqvae_last.pt.111.tmp", tmp_path / ".vqvae_last.pt.222.tmp",
                         tmp_path / ".vqvae_last.pt.1.333.tmp")
    for tmp in (old, young, other):
        tmp.write_bytes(b"half a checkpoint")
    an_hour_ago = time.time() - 3600
    for tmp in (old, other):
        os.utime(tmp, (an_hour_ago, an_hour_ago))
    dataset.atomic_write(target, lambda p: p.write_text("whole"))
    assert target.read_text() == "whole"
    assert not old.exists()
    assert young.exists()  # may be a live writer's
    assert other.exists()  # the temp of another file, vqvae_last.pt.1


CTRL_C_DURING_DECODING = """
import os, signal, sys, time
import dataset
calls = []
def decode_png(path, size):
    calls.append(path)
    if len(calls) == 1:
        os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.2)
    raise AssertionError("interrupted before the end")
dataset.decode_png = decode_png
code = dataset.main(sys.argv[1:])
print(len(calls))
sys.exit(code)
"""


def test_ctrl_c_is_one_line_and_stops_decoding(tmp_path):
    tree = make_tree(tmp_path / "d", cases=(10, 1, 1), slices=4, size=8)
    result = run_script("-c", CTRL_C_DURING_DECODING, "--data-dir", str(tree), "--size", "8")
    assert result.returncode == 130 and result.stderr.strip().splitlines() == ["interrupted"], result.stderr
    assert int(result.stdout.split()[-1]) < 40  # the queued files were dropped, not decoded first
