"""bench.py on the tiny preset: the figures are sane, the baseline is the same model, the CLI's JSON parses."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bench
import bench_baseline
import config
from dataset import split_folder_name
from modules import VQVAE, ConvTranspose2d, PixelCNN, VectorQuantizer
from train import vqvae_step

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    # Correctness only, not speed: one intra-op thread keeps tiny ops fast when other jobs share the cores.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def png_root(tmp_path_factory):
    # 40x40 slices, so both loaders also resize to the tiny preset's 32x32
    return bench.write_plain_pngs(tmp_path_factory.mktemp("pngs"), 40, size=40)


def check_result(r: dict, preset: str) -> None:
    for key in bench.REQUIRED_KEYS:
        assert key in r, key
    assert r["device"] == "cpu" and r["preset"] == preset
    for key in bench.REQUIRED_KEYS[2:]:
        assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] > 0, (key, r[key])
    assert r["data_ratio"] == pytest.approx(r["data_img_s"] / r["baseline_data_img_s"])
    assert r["end_to_end_ratio"] == pytest.approx(r["end_to_end_img_s"] / r["baseline_end_to_end_img_s"])
    # the dense one-hot matmul is the only extra work of the baseline model
    assert r["baseline_gflop_per_img"] > r["gflop_per_img"]


def test_bench_preset_tiny_bf16(png_root, tmp_path):
    cfg = config.preset("tiny")
    cfg.runtime.amp = "bf16"  # the bf16 autocast + channels_last path, on the CPU too
    r = bench.bench_preset(cfg, "cpu", png_root / split_folder_name("train"), tmp_path / "cache", steps=2,
                           baseline_steps=2, baseline_items=16, warmup=1, peak=(1.0, "test"))
    check_result(r, "tiny")
    assert r["bf16"] is True and r["train_images"] == 40
    assert r["pixelcnn_sample_rows"] == r["latent_size"] == 8  # the tiny grid is drawn whole, not scaled
    assert r["peak_fraction"] == pytest.approx(r["step_img_s"] * r["gflop_per_img"] / 1e3 / 1.0)
    json.dumps({"results": [r]})  # plain JSON types only
    assert "tiny" in bench.format_table([r])


def test_pixelcnn_draw_stops_after_the_row_that_spends_the_budget():
    cfg = config.preset("tiny")
    prior = PixelCNN(cfg.pixelcnn, cfg.model)
    b = bench.Bench(cfg, torch.device("cpu"), bf16=False, warmup=1, steps=1, few_steps=1)
    assert bench.draw_rows(prior, b, budget_s=0.0) == 1
    assert bench.draw_rows(prior, b, budget_s=60.0) == cfg.model.latent_size
    assert prior.training and not prior.head._forward_hooks  # the stopped draw left the model as it was


def test_vqvae_step_runs_bf16_channels_last_on_cpu():
    cfg = config.preset("tiny")
    device = torch.device("cpu")
    model = VQVAE(cfg.model).to(device, memory_format=torch.channels_last)
    seen = {}
    model.decoder.net[0].register_forward_hook(
        lambda m, inp, out: seen.update(dtype=out.dtype, cl=inp[0].is_contiguous(memory_format=torch.channels_last)))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = next(bench.train_batches(torch.randint(0, 256, (16, 1, 32, 32), dtype=torch.uint8), 8, 0, device))
    assert x.is_contiguous(memory_format=torch.channels_last)
    before = model.decoder.net[0].weight.detach().clone()
    losses = vqvae_step(model, opt, x, device, bf16=True)
    assert seen["dtype"] == torch.bfloat16 and seen["cl"]
    assert losses.shape == (3,) and torch.isfinite(losses).all()
    assert not torch.equal(before, model.decoder.net[0].weight)


def test_one_hot_quantizer_is_the_same_quantizer():
    torch.manual_seed(0)
    K, D = 32, 8
    base = bench_baseline.OneHotQuantizer(K, D, beta=0.25)
    ours = VectorQuantizer(K, D, beta=0.25, mode="loss").eval()  # eval: no codebook init or updates
    codes = torch.randn(K, D)
    with torch.no_grad():
        base.codebook.copy_(codes)
        ours.codebook.copy_(codes)
    z = torch.randn(4, D, 6, 6)
    qb, qo = base(z), ours(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, D)
    assert torch.equal(qb.indices.flatten(), ours.nearest(flat))
    assert torch.equal(qb.indices, qo.indices)
    assert torch.allclose(qb.z_q, qo.z_q, atol=1e-6)
    assert torch.allclose(qb.loss, qo.loss, atol=1e-6)  # the report's codebook + beta * commitment loss


def test_baseline_uses_torchs_own_transposed_convolutions():
    layers = list(bench_baseline.BaselineVQVAE(config.preset("tiny").model).modules())
    assert any(type(m) is torch.nn.ConvTranspose2d for m in layers)
    assert not any(isinstance(m, ConvTranspose2d) for m in layers)


def test_cli_json_parses():
    proc = subprocess.run(
        [sys.executable, "bench.py", "--presets", "tiny", "--device", "cpu", "--steps", "2",
         "--baseline-items", "16", "--amp", "bf16", "--peak-tflops", "1", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-1]
    results = json.loads(last)["results"]
    assert len(results) == 1
    check_result(results[0], "tiny")
    assert results[0]["peak_source"] == "--peak-tflops" and results[0]["bf16"] is True
