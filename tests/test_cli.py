"""driver.py end to end on a tiny generated set, then every predict.py subcommand and their bad inputs."""
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_png

import compare
import driver
import evaluate
import predict
from dataset import load_splits
from synthetic import write_synthetic_dataset

REQUIRED = ["test.ssim", "test.psnr", "test.codebook_usage", "test.perplexity", "generation.frechet_distance",
            "generation.frechet_distance_real", "generation.kid", "generation.ms_ssim", "generation.nn_ssim",
            "timing.vqvae_s", "timing.gan_s", "timing.total_s", "device", "preset", "data_dir"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        root = tmp_path_factory.mktemp("e2e")
        mp.setenv("OASIS_VQVAE_CACHE", str(root / "cache"))
        yield make_run(root)


def make_run(root):
    data = root / "data"
    write_synthetic_dataset(data, cases=(3, 1, 1), size=32, progress=False)
    run_dir = root / "run"
    code = driver.main(["--data-dir", str(data), "--preset", "tiny", "--run-dir", str(run_dir), "--device", "cpu",
                        "--prior", "both"])
    assert code == 0
    return run_dir, data


def lookup(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d[part]
    return d


def test_driver_writes_the_run_folder(run):
    run_dir, data = run
    m = json.loads((run_dir / "metrics.json").read_text())
    for key in REQUIRED:
        lookup(m, key)
    assert m["preset"] == "tiny" and m["data_dir"] == str(data.resolve()) and m["device"] == "cpu"
    assert {"generation_gan", "generation_pixelcnn", "generation_maskgit"} <= set(m) and m["prior"] == "maskgit"
    for key in ("c2st", "c2st_real", "c2st_recon", "c2st_recon_real"):
        assert 0 <= m["generation"][key] <= 1, key
    assert json.loads((run_dir / "config.json").read_text())["preset"] == "tiny"
    for name in ("vqvae_loss", "val_ssim", "reconstructions", "code_map", "gan_losses", "samples_gan",
                 "samples_gan_zoom", "nearest_gan", "samples_pixelcnn", "pixelcnn_nll", "samples_maskgit",
                 "maskgit_losses", "which_are_real", "pipeline"):
        assert (run_dir / "figures" / f"{name}.png").is_file(), name
    assert list(run_dir.glob("events.out.tfevents*"))


def test_driver_refuses_to_overwrite_and_resumes(run, capsys):
    run_dir, data = run
    assert driver.main(["--data-dir", str(data), "--preset", "tiny", "--run-dir", str(run_dir), "--device", "cpu"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert driver.main(["--data-dir", str(data), "--preset", "tiny", "--run-dir", str(run_dir), "--device", "cpu",
                        "--resume", "--prior", "both"]) == 0


def test_resume_with_another_architecture_fails_in_one_line(run, capsys):
    run_dir, data = run
    code = driver.main(["--data-dir", str(data), "--preset", "tiny", "--run-dir", str(run_dir), "--device", "cpu",
                        "--resume", "--num-codes", "32"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "different architecture" in err[0]


def test_evaluate_split_and_folder(run, tmp_path):
    run_dir, data = run
    out = tmp_path / "m.json"
    assert predict.main(["evaluate", "--run", str(run_dir), "--images", str(data / "keras_png_slices_test"),
                         "--out", str(out), "--device", "cpu"]) == 0
    m = json.loads(out.read_text())
    assert {"ssim", "psnr", "codebook_usage"} <= set(m) and m["n_images"] == 32
    assert predict.main(["evaluate", "--run", str(run_dir), "--split", "validate", "--device", "cpu"]) == 0


def test_reconstruct(run, tmp_path):
    run_dir, data = run
    assert predict.main(["reconstruct", "--run", str(run_dir), "--images", str(data / "keras_png_slices_test"),
                         "--out", str(tmp_path), "--device", "cpu"]) == 0
    assert len(list(tmp_path.glob("*_recon.png"))) == 32 and (tmp_path / "side_by_side.png").is_file()


def test_generate_is_deterministic_for_a_seed(run, tmp_path):
    run_dir, _ = run
    for name in ("a", "b"):
        assert predict.main(["generate", "--run", str(run_dir), "--n", "3", "--out", str(tmp_path / name),
                             "--seed", "5", "--device", "cpu"]) == 0
    assert (tmp_path / "a" / "grid.png").is_file()
    for i in range(3):
        name = f"sample_{i:04d}.png"
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert predict.main(["generate", "--run", str(run_dir), "--n", "2", "--out", str(tmp_path / "g"),
                         "--prior", "gan", "--device", "cpu"]) == 0


def test_figures_redraws(run, capsys):
    run_dir, _ = run
    before = (run_dir / "figures" / "vqvae_loss.png").stat().st_mtime_ns
    assert predict.main(["figures", "--run", str(run_dir), "--device", "cpu"]) == 0
    assert (run_dir / "figures" / "vqvae_loss.png").stat().st_mtime_ns > before


def one_error_line(capsys, argv) -> str:
    assert predict.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    return err[0]


def test_predict_errors(run, tmp_path, capsys):
    run_dir, _ = run
    assert "no such run folder" in one_error_line(capsys, ["evaluate", "--run", str(tmp_path / "nope")])
    (tmp_path / "half").mkdir()
    assert "incomplete run" in one_error_line(capsys, ["evaluate", "--run", str(tmp_path / "half")])
    (tmp_path / "empty").mkdir()
    assert "no PNG files" in one_error_line(capsys, ["reconstruct", "--run", str(run_dir), "--images",
                                                     str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    torn = tmp_path / "torn"
    torn.mkdir()
    (torn / "vqvae_best.pt").write_bytes(b"not a checkpoint")
    assert "not a readable checkpoint" in one_error_line(capsys, ["evaluate", "--run", str(torn)])


def test_driver_bad_data_dir(tmp_path, capsys):
    assert driver.main(["--data-dir", str(tmp_path / "missing"), "--preset", "tiny", "--device", "cpu",
                        "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing" in err[0]


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        driver.parse_args(["--help"])
    text = capsys.readouterr().out
    for flag in ("--data-dir", "--preset", "--device", "--run-dir", "--resume", "--seed", "--epochs",
                 "--batch-size", "--lr", "--num-codes", "--code-dim", "--prior"):
        assert flag in text
    assert "default" in text


def test_evaluate_folder_of_other_sized_pngs(run, tmp_path):
    run_dir, _ = run
    for i in range(3):
        write_png(tmp_path / "imgs" / f"x{i}.png", np.full((50, 50), 60 * i, np.uint8))
    assert predict.main(["evaluate", "--run", str(run_dir), "--images", str(tmp_path / "imgs"), "--device", "cpu"]) == 0


def test_resume_takes_the_runs_own_config(run, capsys):
    run_dir, data = run
    # No --data-dir or --preset: a resumed run continues with what it was trained on.
    assert driver.main(["--resume", "--run-dir", str(run_dir), "--device", "cpu", "--prior", "both"]) == 0
    assert "different architecture" not in capsys.readouterr().err
    for flags, word in ((["--seed", "5"], "--seed"), (["--preset", "quick"], "--preset"),
                        (["--data-dir", str(run_dir)], "--data-dir")):
        assert driver.main(["--resume", "--run-dir", str(run_dir), "--device", "cpu", *flags]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and word in err[0] and "keeps it" in err[0]


@pytest.mark.parametrize("argv", [["--samples", "1"], ["--epochs", "0"], ["--batch-size", "-3"]])
def test_driver_rejects_impossible_numbers(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        driver.parse_args(argv)
    assert exit_.value.code == 2 and "must be at least" in capsys.readouterr().err


def test_resumed_prior_choice_is_the_runs_generation(tmp_path):
    # Trained with the GAN, then resumed with the PixelCNN: config.json now names the PixelCNN, and
    # metrics.json's `generation` and predict.py's default must follow it rather than the VQ-VAE checkpoint's
    # older config; `--prior all` afterwards trains every prior and keeps the run's generator.
    data = tmp_path / "data"
    write_synthetic_dataset(data, cases=(2, 1, 1), size=32, progress=False)
    base = ["--data-dir", str(data), "--preset", "tiny", "--run-dir", str(tmp_path / "run"), "--device", "cpu"]
    assert driver.main(base + ["--prior", "gan"]) == 0
    assert driver.main(base + ["--resume", "--prior", "pixelcnn"]) == 0
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["generation"] == m["generation_pixelcnn"] and m["prior"] == "pixelcnn"
    assert driver.main(base + ["--resume", "--prior", "all"]) == 0
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["generation"] == m["generation_pixelcnn"] != m["generation_gan"]


def test_tune_chooses_on_validation_and_keeps_the_choice(run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(run[0], run_dir)
    argv = ["tune", "--run", str(run_dir), "--prior", "pixelcnn", "--top-k", "0", "2", "--device", "cpu"]
    assert predict.main([*argv, "--dry-run"]) == 0
    assert json.loads((run_dir / "config.json").read_text())["pixelcnn"]["top_k"] == 0  # --dry-run changed nothing
    assert predict.main(argv) == 0
    out = capsys.readouterr().out
    chosen = int(out.split("kept {'top_k': ")[1].split(",")[0])
    assert json.loads((run_dir / "config.json").read_text())["pixelcnn"]["top_k"] == chosen
    assert evaluate.load_prior(run_dir, "pixelcnn", evaluate.load_vqvae(run_dir)[0])[1].pixelcnn.top_k == chosen
    gan_argv = ["tune", "--run", str(run_dir), "--prior", "gan", "--temperature", "1.0", "0.5", "--device", "cpu"]
    assert predict.main(gan_argv) == 0  # the GAN's one setting, its noise's standard deviation
    chosen = float(capsys.readouterr().out.split("kept {'temperature': ")[1].split("}")[0])
    assert json.loads((run_dir / "config.json").read_text())["gan"]["temperature"] == chosen
    assert "no sampling setting top_k" in one_error_line(capsys, ["tune", "--run", str(run_dir), "--prior", "gan",
                                                                  "--top-k", "4"])
    assert "no sampling setting steps" in one_error_line(capsys, [*argv, "--steps", "4"])  # MaskGIT's only


def test_tune_ranks_first_the_best_judge_whose_diversity_is_within_the_band_either_way():
    row = lambda name, judge, ms_ssim: {"name": name, "c2st_recon_val": judge, "ms_ssim": ms_ssim, "ms_ssim_real": 0.7}
    rows = [row("repetitive", 0.6, 0.8), row("noisy", 0.7, 0.6), row("close", 0.9, 0.72), row("closer", 0.95, 0.7)]
    assert [r["name"] for r in evaluate.rank_settings(rows)] == ["close", "closer", "repetitive", "noisy"]


def test_tune_judges_settings_two_at_a_time_as_it_would_one_by_one(run):
    run_dir, data = run
    vqvae, _ = evaluate.load_vqvae(run_dir)
    prior, cfg = evaluate.load_prior(run_dir, "pixelcnn", vqvae)
    # One classifier step: scores near chance that differ by setting (trained on, tiny samples score 1.0 each)
    cfg = dataclasses.replace(cfg, judge=dataclasses.replace(cfg.judge, steps=1))
    splits = load_splits(data, cfg.model.image_size)
    tune = lambda values: evaluate.tune_sampling(prior, "pixelcnn", vqvae, cfg, splits, {"temperature": values},
                                                 torch.device("cpu"))
    together = sorted(tune([0.5, 1.0, 2.0]), key=lambda r: r["temperature"])  # a pair, then one alone
    assert together == [tune([t])[0] for t in (0.5, 1.0, 2.0)]
    assert len({r["c2st_recon_val"] for r in together}) > 1  # else a mix-up of the settings' scores would pass


def test_tune_compares_maskgit_sampling_orders_and_keeps_the_chosen_one(run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(run[0], run_dir)
    argv = ["tune", "--run", str(run_dir), "--prior", "maskgit", "--top-k", "0", "--order", "confidence", "random",
            "--device", "cpu"]
    assert predict.main(argv) == 0
    out = capsys.readouterr().out
    table = out.split("kept")[0]
    assert "random" in table and "confidence" in table  # one row per order
    chosen = out.split("'order': '")[1].split("'")[0]
    assert json.loads((run_dir / "config.json").read_text())["maskgit"]["order"] == chosen
    assert evaluate.load_prior(run_dir, "maskgit", evaluate.load_vqvae(run_dir)[0])[1].maskgit.order == chosen


def test_compare_trains_each_variant_on_the_frozen_vqvae(run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(run[0], run_dir)
    rows = compare.main([str(run_dir), "gan:report", "gan:hinge-r1", "--gan-epochs", "1", "--device", "cpu"])
    assert list(rows) == ["gan:report", "gan:hinge-r1"]
    assert (run_dir / "compare" / "gan-report" / "samples.png").is_file()
    assert "| real reference |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        compare.parse_args([str(run_dir), "maskgit:hinge-r1"])  # recipes are the GAN's only


def test_the_judges_reference_draws_training_slices_across_the_split():
    split = torch.arange(64, dtype=torch.uint8).view(64, 1, 1, 1).expand(64, 1, 4, 4)
    draw = evaluate.training_draw(split, 16)
    picked = draw[:, 0, 0, 0].tolist()
    assert len(set(picked)) == 16 and picked != list(range(16)) and max(picked) >= 32  # not the first people
    assert torch.equal(draw, evaluate.training_draw(split, 16))  # seeded
    assert len(evaluate.training_draw(split, 100)) == 64


def test_gpu_checks_script_rehearses_at_the_tiny_preset_on_cpu(run, tmp_path):
    """gpu_checks.sh is what a session lent a GPU runs in one call: its commands must stay valid."""
    _, data = run
    report, run_dir = tmp_path / "report", tmp_path / "gpu-run"
    env = {**os.environ, "PRESET": "tiny", "DEVICE": "cpu", "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(ROOT / "gpu_checks.sh"), str(data), str(report), str(run_dir)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert sorted(p.name for p in report.iterdir()) == [
        "bench.json", "bench.log", "driver.log", "metrics.json", "samples_gan.png", "samples_maskgit.png",
        "samples_pixelcnn.png", "which_are_real.png"]
    assert json.loads((report / "bench.json").read_text())["results"][0]["preset"] == "tiny"
    m = json.loads((report / "metrics.json").read_text())
    assert {"generation_gan", "generation_pixelcnn", "generation_maskgit"} <= set(m)
