"""The built-in synthetic set: deterministic, OASIS-shaped, and written atomically."""
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import synthetic  # noqa: E402

SIZE = 64
NAME = re.compile(r"^case_(\d{3})_slice_(\d+)\.nii\.png$")


@pytest.fixture(scope="module")
def case():
    return synthetic.synthetic_case(7, size=SIZE)


def test_shape_dtype_and_range(case):
    assert case.shape == (synthetic.N_SLICES, SIZE, SIZE)
    assert case.dtype == np.uint8
    assert case.max() > 180, "white matter should be bright"


def test_deterministic_for_a_seed(case):
    np.testing.assert_array_equal(case, synthetic.synthetic_case(7, size=SIZE))
    assert not np.array_equal(case, synthetic.synthetic_case(8, size=SIZE))


def test_background_is_zero_and_brain_is_centred(case):
    for corner in (case[:, :4, :4], case[:, :4, -4:], case[:, -4:, :4], case[:, -4:, -4:]):
        assert (corner == 0).all()
    area = (case > 0).mean(axis=(1, 2))
    assert ((area > 0.2) & (area < 0.6)).all()
    assert (case[:, SIZE // 2 - 2:SIZE // 2 + 2, SIZE // 2 - 2:SIZE // 2 + 2] > 0).all()


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_brain_area_grows_then_shrinks(seed):
    area = (synthetic.synthetic_case(seed, size=SIZE) > 0).sum(axis=(1, 2))
    peak = int(np.argmax(area))
    assert 0 < peak < len(area) - 1
    assert area[peak] > area[0] and area[peak] > 1.04 * area[-1]
    assert np.abs(np.diff(area)).max() < 0.03 * area[peak], "size should change smoothly slice to slice"


def test_tissue_intensities_resemble_t1():
    vol = synthetic.synthetic_case(3, size=128)
    brain = vol[vol > 0]
    assert np.percentile(brain, 90) > 200          # white matter
    assert 100 < np.percentile(brain, 25) < 170    # grey matter
    assert np.percentile(brain, 1) < 70            # CSF in sulci and ventricles


def _listing(root: Path) -> dict[str, list[str]]:
    return {p.name: sorted(f.name for f in p.iterdir()) for p in sorted(root.iterdir())}


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("sets") / "synth"
    counts = synthetic.write_synthetic_dataset(out, cases=(2, 1, 1), size=SIZE, progress=False)
    return out, counts


def test_write_layout_names_and_counts(small_set):
    out, counts = small_set
    assert counts == {"train": 64, "validate": 32, "test": 32}
    listing = _listing(out)
    assert sorted(listing) == ["keras_png_slices_test", "keras_png_slices_train", "keras_png_slices_validate"]
    cases = {}
    for folder, names in listing.items():
        assert all(NAME.match(n) for n in names), names[:3]
        cases[folder] = {NAME.match(n).group(1) for n in names}
        assert len(names) == synthetic.N_SLICES * len(cases[folder])
        slices = {int(NAME.match(n).group(2)) for n in names}
        assert slices == set(range(synthetic.N_SLICES))
    assert cases == {"keras_png_slices_train": {"001", "002"}, "keras_png_slices_validate": {"003"},
                     "keras_png_slices_test": {"004"}}
    img = Image.open(out / "keras_png_slices_test" / "case_004_slice_5.nii.png")
    assert img.mode == "L" and img.size == (SIZE, SIZE)


def test_written_slices_match_synthetic_case(small_set):
    out, _ = small_set
    vol = synthetic.synthetic_case(synthetic.case_seed(0, 3), size=SIZE)
    img = np.asarray(Image.open(out / "keras_png_slices_validate" / "case_003_slice_12.nii.png"))
    np.testing.assert_array_equal(img, vol[12])


def test_nothing_half_written_is_left(small_set):
    out, _ = small_set
    assert [p.name for p in out.parent.iterdir()] == ["synth"]


def test_refuses_to_overwrite_an_existing_set(small_set):
    out, _ = small_set
    before = _listing(out)
    with pytest.raises(FileExistsError, match="already holds"):
        synthetic.write_synthetic_dataset(out, cases=(1, 1, 1), size=SIZE, progress=False)
    assert _listing(out) == before
    assert [p.name for p in out.parent.iterdir()] == ["synth"]


def test_writes_into_an_existing_folder_without_splits(tmp_path):
    (tmp_path / "README.txt").write_text("keep me")
    synthetic.write_synthetic_dataset(tmp_path, cases=(1, 1, 1), size=32, progress=False)
    assert (tmp_path / "README.txt").read_text() == "keep me"
    assert len(list((tmp_path / "keras_png_slices_train").iterdir())) == synthetic.N_SLICES
    assert not [p for p in tmp_path.parent.iterdir() if ".partial-" in p.name]


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    calls = []

    def failing_case(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return np.zeros((synthetic.N_SLICES, 32, 32), np.uint8)

    monkeypatch.setattr(synthetic, "synthetic_case", failing_case)
    out = tmp_path / "synth"
    with pytest.raises(KeyboardInterrupt):
        synthetic.write_synthetic_dataset(out, cases=(2, 1, 1), size=32, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_side_by_side_figure(small_set, tmp_path):
    out, _ = small_set
    png = tmp_path / "fig.png"
    synthetic.side_by_side_figure(out, out / "keras_png_slices_train", png, n=3)
    assert Image.open(png).size[0] > 200


def test_ensure_builtin_accepts_the_set_another_run_wrote_first(tmp_path, monkeypatch):
    """Two runs started together both generate the set; the one that loses the race to rename its copy into
    place uses the winner's (the same deterministic set) instead of failing. A failure with no set is raised."""
    import dataset

    def other_run_won(out_dir, size):
        for split in dataset.SPLITS:
            (Path(out_dir) / dataset.split_folder_name(split)).mkdir(parents=True)
        raise OSError(39, "Directory not empty")

    monkeypatch.setattr(synthetic, "write_synthetic_dataset", other_run_won)
    assert dataset.ensure_builtin(tmp_path / "a") == tmp_path / "a"

    def disk_full(out_dir, size):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(synthetic, "write_synthetic_dataset", disk_full)
    with pytest.raises(OSError, match="No space"):
        dataset.ensure_builtin(tmp_path / "b")
