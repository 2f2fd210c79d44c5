"""driver.py and predict.py refusing a mistake in one stderr line and a non-zero exit, leaving the run folder
as it was (or removing the folder a failed start made): two drivers on one folder, a mistyped --resume, bad
numbers and devices, unusable --out paths, a prior from another run, a hand-edited config.json, a divergence
caused by a flag, and Ctrl-C. Tiny preset and tiny data throughout."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import default_sigint

import driver
import predict
from modules import Discriminator, build_prior
from synthetic import write_synthetic_dataset

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--preset", "tiny", "--device", "cpu", "--prior", "gan"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(run folder, other run folder, data): two tiny runs with different seeds, so different VQ-VAEs."""
    root = tmp_path_factory.mktemp("errors")
    data = root / "data"
    write_synthetic_dataset(data, cases=(2, 1, 1), size=32, progress=False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OASIS_VQVAE_CACHE", str(root / "cache"))
        for name, seed in (("run", "0"), ("other", "1")):
            assert driver.main(["--data-dir", str(data), "--run-dir", str(root / name), "--seed", seed, *TINY]) == 0
    return root / "run", root / "other", data


@pytest.fixture
def run_copy(trained, tmp_path):
    """A copy of the trained run that a test may change."""
    return Path(shutil.copytree(trained[0], tmp_path / "copy"))


def shown(stderr: str) -> list[str]:
    """The lines stderr leaves on a terminal: a progress bar redraws its line after a carriage return."""
    return [line.rsplit("\r", 1)[-1] for line in stderr.split("\n") if line.rsplit("\r", 1)[-1].strip()]


def one_line(capsys, code: int, expected: int = 2) -> str:
    captured = capsys.readouterr()
    err = shown(captured.err)
    assert code == expected and len(err) == 1, captured.err
    return err[0]


def contents(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def cli_env(tmp_path) -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", OASIS_VQVAE_CACHE=str(tmp_path / "cache"))


def start_driver(tmp_path, log: str, *argv) -> subprocess.Popen:
    """driver.py in its own process, stdout and stderr to files (pipes left unread could fill and block it)."""
    out, err = (open(tmp_path / f"{log}.{kind}", "w") for kind in ("out", "err"))
    with out, err:
        return subprocess.Popen([sys.executable, str(ROOT / "driver.py"), *argv], cwd=tmp_path, env=cli_env(tmp_path),
                                stdout=out, stderr=err, stdin=subprocess.DEVNULL, preexec_fn=default_sigint)


def wait_for(condition, proc: subprocess.Popen, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert proc.poll() is None, "the driver ended before the condition held"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


# ---------------------------------------------------------------- 1. two drivers on one run folder

@pytest.mark.skipif(sys.platform == "win32", reason="the run lock needs fcntl")
def test_second_driver_on_the_same_run_dir_is_refused_while_the_first_runs_on(trained, tmp_path):
    _, _, data = trained
    run_dir = tmp_path / "run"
    argv = ["--data-dir", str(data), "--run-dir", str(run_dir), *TINY, "--epochs", "200", "--gan-epochs", "1"]
    first = start_driver(tmp_path, "first", *argv)
    try:
        lock = run_dir / ".lock"
        wait_for(lambda: lock.is_file() and lock.read_text().strip() == str(first.pid), first)
        second = subprocess.run([sys.executable, str(ROOT / "driver.py"), *argv], cwd=tmp_path, env=cli_env(tmp_path),
                                capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)
        assert first.poll() is None, "the first run finished before the second started: nothing was tested"
        assert second.returncode == 2 and second.stderr.splitlines() == [
            f"error: {run_dir}: another driver.py is using this run folder (pid {first.pid}); "
            "wait for it or choose another --run-dir"]
        assert first.wait(timeout=600) == 0, (tmp_path / "first.err").read_text()[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert "ssim" in metrics["test"] and "generation" in metrics
    assert json.loads((run_dir / "config.json").read_text())["train"]["epochs"] == 200


def test_runs_without_run_dir_are_numbered_and_a_failed_start_frees_its_number(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "007-tiny-data").mkdir(parents=True)
    argv = ["--data-dir", str(tmp_path / "data"), *TINY]
    line = one_line(capsys, driver.main(argv))
    assert "data" in line
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["007-tiny-data"]  # 008 was removed again
    assert driver.run_name(driver.build_config(driver.parse_args(argv), None))(8) == "008-tiny-data"


# ---------------------------------------------------------------- 2. --resume of a folder that is no run

def test_resume_of_a_mistyped_or_empty_run_dir_is_refused(tmp_path, capsys):
    typo = tmp_path / "runs" / "typo"
    line = one_line(capsys, driver.main(["--resume", "--run-dir", str(typo), "--device", "cpu"]))
    assert line == f"error: {typo}: no such run folder to --resume (leave out --resume to start a new run)"
    assert not typo.exists() and not typo.parent.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    line = one_line(capsys, driver.main(["--resume", "--run-dir", str(empty), "--device", "cpu"]))
    assert str(empty) in line and "no config.json or checkpoint" in line
    assert list(empty.iterdir()) == []


# ---------------------------------------------------------------- 3. impossible learning rates and devices

@pytest.mark.parametrize("flag", ["--lr", "--gan-lr", "--pixelcnn-lr"])
@pytest.mark.parametrize("value", ["nan", "-1", "0", "inf"])
def test_learning_rates_must_be_positive_and_finite(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_:
        driver.parse_args([flag, value])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(
        f"argument {flag}: must be a positive finite number, not {value}")


def test_learning_rate_flags_reach_the_config():
    args = driver.parse_args(["--lr", "1e-4", "--gan-lr", "2e-5", "--pixelcnn-lr", "3e-4", "--preset", "tiny"])
    cfg = driver.build_config(args, None)
    assert (cfg.train.lr, cfg.gan.lr, cfg.pixelcnn.lr) == (1e-4, 2e-5, 3e-4)


def test_mirror_flag_reaches_every_prior_and_is_the_presets_without_it():
    quick = driver.build_config(driver.parse_args(["--preset", "quick"]), None)
    assert (quick.gan.mirror, quick.pixelcnn.mirror, quick.maskgit.mirror) == (False, False, True)
    for flag, value in (("--mirror", True), ("--no-mirror", False)):
        cfg = driver.build_config(driver.parse_args(["--preset", "quick", flag]), None)
        assert (cfg.gan.mirror, cfg.pixelcnn.mirror, cfg.maskgit.mirror) == (value,) * 3


def test_maskgit_head_flag_reaches_the_config():
    quick = driver.build_config(driver.parse_args(["--preset", "quick"]), None)
    cfg = driver.build_config(driver.parse_args(["--preset", "quick", "--maskgit-head", "independent"]), None)
    assert (quick.maskgit.head, cfg.maskgit.head) == ("sequential", "independent")


def test_gan_width_flag_reaches_the_config_and_builds():
    quick = driver.build_config(driver.parse_args(["--preset", "quick"]), None)
    cfg = driver.build_config(driver.parse_args(["--preset", "tiny", "--gan-width", "48", "16"]), None)
    assert (quick.gan.g_width, quick.gan.d_width, cfg.gan.g_width, cfg.gan.d_width) == (256, 64, 48, 16)
    generator = build_prior("gan", cfg)
    assert generator.net.net[0].out_channels == 48
    assert Discriminator(cfg.gan, cfg.model.latent_size, cfg.model.code_dim).net[0].out_channels == 16


@pytest.mark.parametrize("device", ["tpu", "mps", "meta"])
def test_unsupported_devices_fail_in_one_line(device, tmp_path, capsys):
    expected = f"error: --device {device}: choose auto, cpu, cuda or cuda:N"
    run_dir = tmp_path / "r"
    assert one_line(capsys, driver.main(["--device", device, "--run-dir", str(run_dir)])) == expected
    assert not run_dir.exists()
    assert one_line(capsys, predict.main(["evaluate", "--run", str(run_dir), "--device", device])) == expected


# ---------------------------------------------------------------- 4. --out paths checked before any work

@pytest.mark.parametrize("command", ["reconstruct", "generate"])
def test_an_existing_file_as_output_folder_is_refused(command, trained, tmp_path, capsys):
    run_dir, _, data = trained
    out = tmp_path / "taken.png"
    out.write_bytes(b"keep me")
    extra = ["--images", str(data / "keras_png_slices_test")] if command == "reconstruct" else []
    line = one_line(capsys, predict.main([command, "--run", str(run_dir), *extra, "--out", str(out),
                                          "--device", "cpu"]))
    assert line == f"error: {out}: is a file; expected a folder to write into"
    assert out.read_bytes() == b"keep me"


def test_evaluate_out_must_be_a_writable_file_name(trained, tmp_path, capsys):
    run_dir, _, _ = trained
    base = ["evaluate", "--run", str(run_dir), "--device", "cpu", "--out"]
    line = one_line(capsys, predict.main([*base, str(tmp_path)]))
    assert line == f"error: {tmp_path}: is a folder; expected the name of a file to write"
    missing = tmp_path / "no" / "m.json"
    line = one_line(capsys, predict.main([*base, str(missing)]))
    assert line.startswith(f"error: {missing}: its folder {missing.parent} does not exist")


def test_evaluate_prints_the_metrics_when_the_json_write_fails(trained, tmp_path, monkeypatch, capsys):
    run_dir, _, _ = trained
    out = tmp_path / "m.json"

    def disk_full(obj, path):
        raise OSError(28, "No space left on device", str(path))
    monkeypatch.setattr(predict, "write_json", disk_full)
    code = predict.main(["evaluate", "--run", str(run_dir), "--device", "cpu", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 2 and captured.err.splitlines() == [f"error: {out}: cannot write (No space left on device)"]
    printed = json.loads(captured.out.strip().splitlines()[-1])
    assert {"ssim", "psnr", "codebook_usage"} <= set(printed) and not out.exists()


# ---------------------------------------------------------------- 5. a prior copied from another run

def test_generate_refuses_a_prior_trained_on_another_vqvae(trained, run_copy, tmp_path, capsys):
    _, other, _ = trained
    shutil.copy(other / "gan_last.pt", run_copy / "gan_last.pt")
    out = tmp_path / "samples"
    line = one_line(capsys, predict.main(["generate", "--run", str(run_copy), "--out", str(out), "--device", "cpu"]))
    assert line.startswith(f"error: {run_copy / 'gan_last.pt'}: trained on another VQ-VAE")
    assert "--resume" in line and not out.exists()


# ---------------------------------------------------------------- 6. a failed start leaves no folder behind

def test_a_failed_start_removes_the_folder_it_made(tmp_path, capsys):
    run_dir = tmp_path / "new" / "run"
    missing = tmp_path / "missing"
    line = one_line(capsys, driver.main(["--data-dir", str(missing), "--run-dir", str(run_dir), *TINY]))
    assert str(missing) in line
    assert not run_dir.exists()


def test_a_gan_head_its_recipe_cannot_have_is_refused_before_any_work(tmp_path, capsys):
    run_dir = tmp_path / "run"
    line = one_line(capsys, driver.main(["--run-dir", str(run_dir), "--prior", "gan", "--gan-head", "logits", *TINY]))
    assert "needs the snap head" in line and "--gan-recipe wgan-gp" in line
    assert not run_dir.exists()


def test_a_failed_resume_keeps_the_run_folder(run_copy, capsys):
    before = contents(run_copy)
    line = one_line(capsys, driver.main(["--resume", "--run-dir", str(run_copy), "--device", "cpu",
                                         "--num-codes", "32"]))
    assert "different architecture" in line
    assert contents(run_copy) == before


# ---------------------------------------------------------------- 8. a hand-edited config.json

def test_a_mistyped_config_key_is_one_line_naming_the_file(run_copy, tmp_path, capsys):
    path = run_copy / "config.json"
    cfg = json.loads(path.read_text())
    cfg["train"]["lrr"] = cfg["train"].pop("lr")
    path.write_text(json.dumps(cfg))
    before = contents(run_copy)
    line = one_line(capsys, driver.main(["--resume", "--run-dir", str(run_copy), "--device", "cpu"]))
    assert line.startswith(f"error: {path}: not a config of this version") and "'train.lr'?" in line
    line = one_line(capsys, predict.main(["generate", "--run", str(run_copy), "--out", str(tmp_path / "g"),
                                          "--device", "cpu"]))
    assert line.startswith(f"error: {path}: not a config of this version") and "train.lrr" in line
    assert contents(run_copy) == before


def test_a_mistyped_choice_in_config_is_refused_before_anything_trains(run_copy, capsys):
    path = run_copy / "config.json"
    cfg = json.loads(path.read_text())
    cfg["maskgit"]["head"] = "seqential"
    path.write_text(json.dumps(cfg))
    before = contents(run_copy)
    line = one_line(capsys, driver.main(["--resume", "--run-dir", str(run_copy), "--device", "cpu"]))
    assert "'maskgit.head' must be one of independent, sequential, not 'seqential'" in line
    assert contents(run_copy) == before


# ---------------------------------------------------------------- 11. a divergence caused by a flag

def test_a_flag_that_makes_training_diverge_is_not_kept(run_copy, capsys):
    config = (run_copy / "config.json").read_text()
    line = one_line(capsys, driver.main(["--resume", "--run-dir", str(run_copy), "--device", "cpu", "--epochs", "3",
                                         "--lr", "1e30"]))
    assert "vqvae loss became" in line and f"last good checkpoint: {run_copy / 'vqvae_last.pt'}" in line
    assert "--resume and a smaller --lr" in line and "config.json keeps its values" in line
    assert (run_copy / "config.json").read_text() == config  # a plain --resume trains with the old values


# ---------------------------------------------------------------- 12. Ctrl-C

def interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def test_ctrl_c_while_decoding_a_new_run_claims_nothing(trained, tmp_path, monkeypatch, capsys):
    _, _, data = trained
    monkeypatch.setattr(driver, "load_splits", interrupt)
    run_dir = tmp_path / "run"
    line = one_line(capsys, driver.main(["--data-dir", str(data), "--run-dir", str(run_dir), *TINY]), 130)
    assert line == f"interrupted before training began; {run_dir} removed (nothing was saved)"
    assert not run_dir.exists()


def test_ctrl_c_while_decoding_a_resumed_run_names_its_folder(run_copy, monkeypatch, capsys):
    monkeypatch.setattr(driver, "load_splits", interrupt)
    line = one_line(capsys, driver.main(["--resume", "--run-dir", str(run_copy), "--device", "cpu"]), 130)
    assert line == (f"interrupted: the last finished epoch is saved in {run_copy} (gan_last.pt, vqvae_last.pt); "
                    f"continue with --resume --run-dir {run_copy}")


def test_sigint_during_training_names_the_real_run_folder(trained, tmp_path):
    _, _, data = trained
    proc = start_driver(tmp_path, "driver", "--data-dir", str(data), *TINY, "--epochs", "500")
    try:
        wait_for(lambda: list(tmp_path.glob("runs/*/vqvae_last.pt")), proc)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name == "001-tiny-data"
    last = shown((tmp_path / "driver.err").read_text())[-1]
    assert last == ("interrupted: the last finished epoch is saved in runs/001-tiny-data (vqvae_last.pt); "
                    "continue with --resume --run-dir runs/001-tiny-data")


def test_ctrl_c_in_predict_is_one_line(trained, tmp_path, monkeypatch, capsys):
    run_dir, _, _ = trained
    monkeypatch.setattr(predict, "load_vqvae", interrupt)
    assert one_line(capsys, predict.main(["generate", "--run", str(run_dir), "--out", str(tmp_path / "g"),
                                          "--device", "cpu"]), 130) == "interrupted"
