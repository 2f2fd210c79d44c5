"""Speed and memory of the training pipeline, side by side with a plain baseline, in one run.

    python bench.py                                   # presets paper and quick on the default device: a table
    python bench.py --json                            # ... and one JSON line {"results": [...]} last on stdout
    python bench.py --presets paper --device cpu,cuda --data-dir DIR --steps 20

Per device and preset, one phase after another, each timed by `rate` (warm-up steps, then timed steps between
device syncs), in images/s unless said:
  data        making training batches. Ours: the whole split resident on the device as uint8 (dataset.load_folder's
              cache), batches gathered by the epoch permutation and converted to float there, as training makes
              them (train.training_batch). Baseline (bench_baseline.py), the report's way: a torch Dataset that
              decodes one PNG per item with skimage.io.imread, DataLoader with num_workers=0.
  flops       forward + backward FLOPs per training image, counted by torch.utils.flop_counter on a small batch.
  step        one VQ-VAE training step on one batch, as training takes it (train.VQVAEStage: bf16 autocast where
              runs.use_bf16 says so, channels_last, fused Adam, EMA codebook, losses read back every log_every
              steps). Baseline: the same Encoder and Decoder (torch's own ConvTranspose2d) in fp32, contiguous,
              with the report's dense one-hot quantizer, plain Adam, loss.item() per step.
  memory      peak CUDA memory allocated during the step phase (CUDA), or the process's peak RSS during it (CPU:
              VmHWM, reset per phase through /proc/self/clear_refs where Linux allows, else getrusage's lifetime
              peak).
  end to end  fresh batches + the step, which is what an epoch runs at. Ours: batches of the resident split;
              baseline: DataLoader batches.
  gan         one GAN step (train.GANStage: D step + G step) on the frozen VQ-VAE's code maps, in maps/s; timed
              over --baseline-steps steps, since each is several VQ-VAE steps' work on the paper preset.
  pixelcnn    one PixelCNN training step (train.PixelCNNStage) in maps/s, over --baseline-steps steps (on a CPU:
              half as many, of CPU_PIXELCNN_BATCH maps each); and the seconds to sample 64 maps on the preset's
              latent grid. A row of the raster is the same work as any other, so where the whole grid would take
              minutes (the paper preset's 64x64 on a CPU) the draw stops after the row that ends past a time
              budget and its time is scaled by rows (pixelcnn_sample_rows says how many were drawn).
  maskgit     one MaskGIT training step (train.MaskGITStage) in maps/s over --baseline-steps steps, and the seconds
              to sample 64 maps with the preset's sampling settings (every refinement pass over the whole grid).
  judge       seconds per judge test (metrics.c2st at the preset's JudgeConfig, JUDGE_SLICES slices a side), two
              tests side by side as the evaluation runs them (metrics.c2st_pairs); JUDGE_STEPS classifier steps
              timed and scaled to the judge's steps, since every step is the same work.
  baseline    the baseline's data, step, memory and end-to-end figures, in a fresh process (bench_baseline.py).
The ratios divide ours by the baseline's; peak fraction = achieved step FLOP/s / the device's peak: a datasheet
dense-bf16 figure for known GPUs, otherwise a measured large matmul in the training dtype, or --peak-tflops.

Without --data-dir the slices are a small synthetic PNG set written to a temporary folder (the project's
synthetic generator). Timings on a shared machine are unreliable (the table warns when the load average
exceeds the core count; two-thread CPU ops then stall on descheduled threads): quote figures from a quiet one.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import gc
import json
import math
import multiprocessing
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import bench_baseline
import config
import metrics
from dataset import DataError, Split, find_root, list_pngs, load_folder, split_folder_name, to_float
from evaluate import judge_settings, sample_codes
from modules import VQVAE
from runs import PeakMemory, RunError, autocast, pick_device, release_freed_host_memory, use_bf16
from train import GANStage, MaskGITStage, PixelCNNStage, VQVAEStage, batch_slices, rank_order, setup, training_batch

REQUIRED_KEYS = ("device", "preset", "data_img_s", "baseline_data_img_s", "data_ratio", "step_img_s",
                 "end_to_end_img_s", "baseline_end_to_end_img_s", "end_to_end_ratio", "peak_mem_mb",
                 "gflop_per_img", "peak_fraction", "pixelcnn_train_maps_s", "pixelcnn_sample_64_s",
                 "maskgit_train_maps_s", "maskgit_sample_64_s", "judge_test_s")

# Dense (no sparsity) bf16 tensor-core peaks from the datasheets, TFLOP/s; the first matching name wins.
CUDA_PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("GH200", 989.0), ("H100", 989.0),
                    ("H200", 989.0), ("A100", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0))

DEFAULT_STEPS = {"cpu": {"paper": 8, "quick": 20}, "cuda": {}}   # timed steps of our VQ-VAE step
DEFAULT_STEPS_OTHER = {"cpu": 6, "cuda": 30}
SAMPLE_MAPS = 64                                  # maps per timed PixelCNN draw
SAMPLE_BUDGET_S = {"cpu": 4.0, "cuda": 60.0}      # seconds of drawing before the rest is scaled by rows
CPU_PIXELCNN_BATCH = 4                            # maps per timed PixelCNN training step on a CPU
JUDGE_SLICES = 192                                # slices a side per judge test: the size of the test splits here
JUDGE_STEPS = 100                                 # timed classifier steps per judge test


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- slices to measure on

def write_plain_pngs(root, n: int, size: int = 256, seed: int = 0) -> Path:
    """n gray PNG slices in the OASIS layout (train only): a noisy bright ellipse on black. Fast fallback."""
    from PIL import Image

    folder = Path(root) / split_folder_name("train")
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size - 0.5
    for i in range(n):
        a, b = rng.uniform(0.3, 0.45, 2)
        inside = (xx / a) ** 2 + (yy / b) ** 2 < 1
        img = (120 + 60 * np.sin(xx * rng.uniform(10, 40)) * np.cos(yy * rng.uniform(10, 40))
               + rng.normal(0, 12, (size, size)))
        img = np.where(inside, np.clip(img, 1, 255), 0).astype(np.uint8)
        Image.fromarray(img).save(folder / f"case_{i // 32 + 1:03d}_slice_{i % 32}.nii.png")
    return Path(root)


def make_png_set(root, n_train: int, size: int = 256) -> Path:
    """At least n_train training slices in the OASIS layout: the project's synthetic slices."""
    from synthetic import write_synthetic_dataset

    write_synthetic_dataset(root, cases=(math.ceil(n_train / 32), 1, 1), size=size)
    return Path(root)


def train_batches(images_u8: torch.Tensor, batch_size: int, seed: int, device, first_epoch: int = 0):
    """Training batches exactly as the training loop makes them, epoch after epoch."""
    epoch = first_epoch
    while True:
        order = rank_order(len(images_u8), seed, epoch, device)
        for sl in batch_slices(len(order), batch_size):
            yield training_batch(images_u8, order[sl])
        epoch += 1


# ---------------------------------------------------------------- measuring

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rate(step, device: torch.device, steps: int, items: int, warmup: int = 0, min_s: float = 0.0) -> float:
    """Items/s of `step()`, which handles `items` items: `warmup` untimed calls, then at least `steps` timed
    calls (and as many more as fill `min_s` seconds), between device syncs, so queued GPU work counts in full."""
    for _ in range(warmup):
        step()
    sync(device)
    done, t0 = 0, time.perf_counter()
    while done < steps or time.perf_counter() - t0 < min_s:
        step()
        done += 1
    sync(device)
    return done * items / (time.perf_counter() - t0)


def logged(step, log_every: int):
    """`step` as the training loop calls it: its losses stay on the device and are read back (one host sync)
    every log_every steps. Call `.flush()` after timing: a NaN or infinite loss is an error."""
    pending = []

    def flush() -> None:
        if pending and not torch.isfinite(torch.stack(pending).float().cpu()).all():
            raise RuntimeError("loss became NaN or infinite during the benchmark")
        pending.clear()

    def run() -> None:
        pending.append(step())
        if len(pending) >= log_every:
            flush()

    run.flush = flush
    return run


def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def training_flops_per_image(model, x: torch.Tensor, device, bf16: bool) -> float:
    """Forward + backward FLOPs of one training step, per image (optimiser update not counted)."""
    def fwd_bwd():
        with autocast(device, bf16):
            recon, vq_loss, _ = model(x)
        (F.mse_loss(recon.float(), x) + vq_loss).backward()
    return count_flops(fwd_bwd) / len(x)


def cuda_datasheet_tflops(device: torch.device) -> float | None:
    name = torch.cuda.get_device_name(device)
    return next((tf for key, tf in CUDA_PEAK_TFLOPS if key in name), None)


def measured_matmul_tflops(device: torch.device, dtype: torch.dtype) -> float:
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    repeats = 10 if device.type == "cuda" else 1
    best = 0.0
    for _ in range(3 if device.type == "cuda" else 2):
        best = max(best, rate(lambda: a @ b, device, steps=repeats, items=2 * n ** 3, warmup=1))
    return best / 1e12


def device_peak(device: torch.device, bf16: bool, override: float | None) -> tuple[float, str]:
    if override:
        return override, "--peak-tflops"
    if device.type == "cuda":
        tf = cuda_datasheet_tflops(device)
        if tf:
            return tf, f"datasheet dense bf16 ({torch.cuda.get_device_name(device)})"
    dtype = torch.bfloat16 if bf16 else torch.float32
    name = "bf16" if bf16 else "fp32"
    n = 8192 if device.type == "cuda" else 2048
    return measured_matmul_tflops(device, dtype), f"measured {name} matmul {n}^3"


def load_average() -> float:
    """The 1-minute load average (0 where the OS has none): above the core count, other jobs share the CPU."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"{name}, {torch.get_num_threads()} threads"


# ---------------------------------------------------------------- the phases of one preset on one device

@dataclass
class Bench:
    """What every phase needs: the preset, where and how it runs, and how many steps to time."""
    cfg: config.Config
    device: torch.device
    bf16: bool
    warmup: int
    steps: int          # timed steps of the VQ-VAE
    few_steps: int      # timed steps of the baseline and the priors (each is several VQ-VAE steps' work)


def data_phase(b: Bench, train_u8: torch.Tensor) -> dict:
    """Training batches of the resident split, at least two epochs' worth and half a second."""
    bs = b.cfg.train.batch_size
    source = train_batches(train_u8, bs, b.cfg.seed, b.device)
    epoch_batches = len(batch_slices(len(train_u8), bs))
    return {"data_img_s": rate(lambda: next(source), b.device, steps=2 * epoch_batches, items=bs, warmup=1,
                               min_s=0.5)}


def flops_phase(b: Bench) -> dict:
    """FLOPs per training image of a fresh model of ours and of the baseline's, on a small batch (FLOPs per
    image do not depend on the batch)."""
    size = b.cfg.model.image_size
    x = torch.rand(min(b.cfg.train.batch_size, 2), 1, size, size, device=b.device)
    ours = VQVAE(b.cfg.model).to(b.device, memory_format=torch.channels_last)
    base = bench_baseline.BaselineVQVAE(b.cfg.model).to(b.device)
    return {"gflop_per_img": training_flops_per_image(
                ours, x.contiguous(memory_format=torch.channels_last), b.device, b.bf16) / 1e9,
            "baseline_gflop_per_img": training_flops_per_image(base, x, b.device, False) / 1e9}


def vqvae_step_phase(b: Bench, stage: VQVAEStage) -> dict:
    """Our VQ-VAE step on one batch, and the peak memory meanwhile (the memory phase)."""
    x = next(train_batches(stage.train_u8, stage.batch_size, b.cfg.seed, b.device))
    step = logged(lambda: stage.step(x), b.cfg.runtime.log_every)
    with PeakMemory(b.device) as mem:
        img_s = rate(step, b.device, steps=b.steps, items=stage.batch_size, warmup=b.warmup)
    step.flush()
    return {"step_img_s": img_s, "peak_mem_mb": mem.mb, "mem_kind": mem.kind}


def end_to_end_phase(b: Bench, stage: VQVAEStage) -> dict:
    """Fresh batches of the resident split + our step, as an epoch runs them (the model is warm already)."""
    source = train_batches(stage.train_u8, stage.batch_size, b.cfg.seed, b.device, first_epoch=1)
    step = logged(lambda: stage.step(next(source)), b.cfg.runtime.log_every)
    img_s = rate(step, b.device, steps=b.steps, items=stage.batch_size)
    step.flush()
    return {"end_to_end_img_s": img_s}


def prior_stage(kind, b: Bench, vqvae: VQVAE, split: Split):
    """A prior's training stage over the code maps of `split`, ready to step."""
    one = Split(split.images[:1], split.names[:1], split.folder)  # validation maps: unused here, so one
    stage = kind(b.cfg, vqvae, {"train": split, "validate": one}, b.device, b.bf16)
    stage.distribute()
    stage.train()
    return stage


def prior_step_rate(b: Bench, stage, batch_size: int, steps: int) -> float:
    """Maps/s of the stage's training step on random batches of its code maps."""
    warmup = max(1, b.warmup // 2)
    picks = iter(torch.randint(stage.n_items, (warmup + steps, batch_size), device=b.device))
    step = logged(lambda: stage.step(stage.batch(next(picks))), b.cfg.runtime.log_every)
    maps_s = rate(step, b.device, steps=steps, items=batch_size, warmup=warmup)
    step.flush()
    return maps_s


def gan_phase(b: Bench, vqvae: VQVAE, split: Split) -> dict:
    stage = prior_stage(GANStage, b, vqvae, split)
    return {"gan_img_s": prior_step_rate(b, stage, stage.batch_size, b.few_steps), "gan_steps": b.few_steps}


class _Enough(Exception):
    """Ends a timed PixelCNN draw at a row boundary once its time budget is spent."""


def draw_rows(prior, b: Bench, budget_s: float) -> int:
    """Draw SAMPLE_MAPS maps as evaluation does, stopped after the first row that ends past `budget_s` seconds;
    returns the rows drawn (all of them when the budget allows). The head runs once per grid position."""
    size, calls, rows, t0 = prior.size, 0, prior.size, time.perf_counter()

    def count(module, inputs, output):
        nonlocal calls, rows
        calls += 1
        if calls % size == 0 and calls < size * size and time.perf_counter() - t0 >= budget_s:
            rows = calls // size
            raise _Enough

    hook = prior.head.register_forward_hook(count)
    try:
        sample_codes(prior, SAMPLE_MAPS, b.cfg.seed, b.device, b.cfg.pixelcnn)
    except _Enough:
        pass
    finally:
        hook.remove()
    return rows


def pixelcnn_phase(b: Bench, vqvae: VQVAE, split: Split, budget_s: float) -> dict:
    """The PixelCNN's training step (maps/s) and the time to sample SAMPLE_MAPS maps on the whole latent grid.
    On a CPU its steps are few and small, since a paper-preset step of 32 maps takes the better part of a
    minute there: the figure is then for steps of CPU_PIXELCNN_BATCH maps (pixelcnn_batch), not the preset's."""
    stage = prior_stage(PixelCNNStage, b, vqvae, split)
    cpu = b.device.type == "cpu"
    batch = min(stage.batch_size, CPU_PIXELCNN_BATCH) if cpu else stage.batch_size
    steps = max(1, b.few_steps // 2) if cpu else b.few_steps
    out = {"pixelcnn_train_maps_s": prior_step_rate(b, stage, batch, steps), "pixelcnn_steps": steps,
           "pixelcnn_batch": batch}
    if b.device.type == "cuda":
        draw_rows(stage.prior, b, budget_s=0.0)  # one row: cudnn.benchmark picks its kernels outside the timing
    rows = []
    seconds = 1 / rate(lambda: rows.append(draw_rows(stage.prior, b, budget_s)), b.device, steps=1, items=1)
    out["pixelcnn_sample_64_s"] = seconds * stage.prior.size / rows[0]
    out["pixelcnn_sample_rows"], out["latent_size"] = rows[0], stage.prior.size
    return out


def maskgit_phase(b: Bench, vqvae: VQVAE, split: Split) -> dict:
    """MaskGIT's training step (maps/s) and the seconds to sample SAMPLE_MAPS maps with the preset's settings
    (all `steps` refinement passes over the whole grid: no early stop is needed, as for the PixelCNN)."""
    stage = prior_stage(MaskGITStage, b, vqvae, split)
    out = {"maskgit_train_maps_s": prior_step_rate(b, stage, stage.batch_size, b.few_steps)}
    draw = lambda: sample_codes(stage.prior, SAMPLE_MAPS, b.cfg.seed, b.device, b.cfg.maskgit)
    if b.device.type == "cuda":
        draw()  # cudnn.benchmark and the allocator settle outside the timing
    out["maskgit_sample_64_s"] = 1 / rate(draw, b.device, steps=1, items=1)
    return out


def judge_phase(b: Bench, images_u8: torch.Tensor) -> dict:
    """Seconds per judge test at the preset's settings, two tests side by side (see the module docstring)."""
    n = min(JUDGE_SLICES, len(images_u8) // 2)
    a, other = to_float(images_u8[:n]), to_float(images_u8[n:2 * n])
    settings = {**judge_settings(b.cfg.judge, b.bf16), "steps": min(JUDGE_STEPS, b.cfg.judge.steps)}
    sync(b.device)
    start = time.perf_counter()
    metrics.c2st_pairs([(a, other), (other, a)], **settings)
    sync(b.device)
    per_test = (time.perf_counter() - start) / 2
    return {"judge_test_s": per_test * b.cfg.judge.steps / settings["steps"], "judge_slices": n}


def baseline_phase(b: Bench, train_folder, items: int) -> dict:
    """The baseline's figures, from a fresh process: none of our settings (backend flags, the allocator's
    keep_freed_host_memory) may leak into it."""
    spawn = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool:
        return pool.submit(bench_baseline.measure, b.cfg, b.device, train_folder, b.few_steps, items).result()


def ratios(out: dict, peak: tuple[float, str]) -> dict:
    """Ours over the baseline's, and the step's FLOP rates against the device's peak."""
    peak_tf, peak_src = peak
    achieved = out["step_img_s"] * out["gflop_per_img"] / 1e3
    base_achieved = out["baseline_step_img_s"] * out["baseline_gflop_per_img"] / 1e3
    return {"data_ratio": out["data_img_s"] / out["baseline_data_img_s"],
            "step_ratio": out["step_img_s"] / out["baseline_step_img_s"],
            "end_to_end_ratio": out["end_to_end_img_s"] / out["baseline_end_to_end_img_s"],
            "peak_tflops": peak_tf, "peak_source": peak_src,
            "achieved_tflops": achieved, "baseline_achieved_tflops": base_achieved,
            "peak_fraction": achieved / peak_tf, "baseline_peak_fraction": base_achieved / peak_tf}


def free_memory(device: torch.device) -> None:
    """Return what our phases held, so that the baseline's process does not share the machine with our peak."""
    gc.collect()
    release_freed_host_memory()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench_preset(cfg: config.Config, device, train_folder, cache_dir, steps: int, baseline_steps: int,
                 baseline_items: int = 200, warmup: int | None = None, peak: tuple[float, str] | None = None,
                 peak_tflops: float | None = None, sample_budget_s: float | None = None) -> dict:
    """All figures of one preset on one device, as one flat dict (see the module docstring)."""
    load_start = load_average()
    device, bf16 = setup(cfg, device)
    warmup = warmup if warmup is not None else (5 if device.type == "cuda" else 2)
    b = Bench(cfg, device, bf16, warmup, steps, baseline_steps)
    out = {"device": device.type, "device_name": device_name(device), "preset": cfg.preset,
           "image_size": cfg.model.image_size, "batch_size": cfg.train.batch_size, "bf16": bf16,
           "channels_last": True, "compile": cfg.runtime.compile, "steps": steps, "baseline_steps": baseline_steps}

    array, names = load_folder(train_folder, cfg.model.image_size, cache_dir)
    if len(array) < cfg.train.batch_size:
        raise ValueError(f"{train_folder}: {len(array)} slices, fewer than one batch of {cfg.train.batch_size}")
    split = Split(torch.from_numpy(array).to(device), names, Path(train_folder))
    del array
    out["train_images"] = len(split)

    out.update(data_phase(b, split.images))
    out.update(flops_phase(b))
    vq_stage = VQVAEStage(cfg, {"train": split, "validate": split}, device, bf16)
    vq_stage.distribute()
    vq_stage.train()
    out.update(vqvae_step_phase(b, vq_stage))
    out.update(end_to_end_phase(b, vq_stage))
    # the priors train on the code maps of a few batches' worth of slices
    n_maps = max(cfg.gan.batch_size, cfg.pixelcnn.batch_size, cfg.maskgit.batch_size)
    few = Split(split.images[:n_maps], names[:n_maps], split.folder)
    out.update(gan_phase(b, vq_stage.model, few))
    out.update(pixelcnn_phase(b, vq_stage.model, few, sample_budget_s or SAMPLE_BUDGET_S.get(device.type, 60.0)))
    out.update(maskgit_phase(b, vq_stage.model, few))
    out.update(judge_phase(b, split.images))
    del vq_stage, split, few
    free_memory(device)

    out.update(baseline_phase(b, train_folder, baseline_items))
    out.update(ratios(out, peak or device_peak(device, bf16, peak_tflops)))
    out["load_avg_1min"] = max(load_start, load_average())
    return out


# ---------------------------------------------------------------- output

def format_table(results: list[dict]) -> str:
    head = ("device", "preset", "data img/s", "base", "x", "step img/s", "base", "x", "e2e img/s", "base", "x",
            "GAN maps/s", "PixelCNN maps/s", "64 samples s", "MaskGIT maps/s", "64 samples s", "judge s/test",
            "peak MB", "base MB",
            "GFLOP/img", "TFLOP/s", "of peak")
    rows = [head]
    for r in results:
        rows.append((r["device"], f"{r['preset']} {r['image_size']}px bs{r['batch_size']}",
                     f"{r['data_img_s']:.0f}", f"{r['baseline_data_img_s']:.0f}", f"{r['data_ratio']:.0f}x",
                     f"{r['step_img_s']:.1f}", f"{r['baseline_step_img_s']:.1f}", f"{r['step_ratio']:.1f}x",
                     f"{r['end_to_end_img_s']:.1f}", f"{r['baseline_end_to_end_img_s']:.1f}",
                     f"{r['end_to_end_ratio']:.1f}x", f"{r['gan_img_s']:.0f}",
                     f"{r['pixelcnn_train_maps_s']:.0f}", f"{r['pixelcnn_sample_64_s']:.3g}",
                     f"{r['maskgit_train_maps_s']:.0f}", f"{r['maskgit_sample_64_s']:.3g}", f"{r['judge_test_s']:.3g}",
                     f"{r['peak_mem_mb']:.0f}",
                     f"{r['baseline_peak_mem_mb']:.0f}", f"{r['gflop_per_img']:.3g}",
                     f"{r['achieved_tflops']:.3g}", f"{r['peak_fraction']:.1%}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    notes = []
    for r in results:
        compiled = ", compiled" if r["compile"] != "off" else ""
        notes.append(f"{r['device']} {r['preset']}: {r['device_name']}; bf16 {'on' if r['bf16'] else 'off'}, "
                     f"channels_last{compiled}; {r['steps']} timed steps (baseline {r['baseline_steps']}); "
                     f"memory = {r['mem_kind']}; peak {r['peak_tflops']:.3f} TFLOP/s = {r['peak_source']}; "
                     f"baseline {r['baseline_gflop_per_img']:.3g} GFLOP/img at "
                     f"{r['baseline_peak_fraction']:.1%} of peak")
        pixelcnn = f"  PixelCNN: {r['pixelcnn_steps']} timed steps of {r['pixelcnn_batch']} maps"
        if r["pixelcnn_sample_rows"] < r["latent_size"]:
            pixelcnn += (f"; sampling drew {r['pixelcnn_sample_rows']} of {r['latent_size']} rows, its time "
                         "scaled to the whole grid")
        notes.append(pixelcnn)
        cores = os.cpu_count() or 1
        if r["device"] == "cpu" and r["load_avg_1min"] > 1.25 * cores:
            notes.append(f"  WARNING: load average reached {r['load_avg_1min']:.1f} on {cores} cores during this "
                         "preset: other jobs shared the CPU, so these timings are unreliable")
    notes.append("baseline = the report's way: skimage.io.imread per item in a DataLoader(num_workers=0), fp32, "
                 "contiguous, dense one-hot quantizer, plain Adam, loss.item() per step; GAN and PixelCNN: their "
                 "training stages' step")
    return "\n".join(lines + [""] + notes)


# ---------------------------------------------------------------- CLI

def parse_devices(spec: str) -> list[torch.device]:
    devices = []
    for name in spec.split(","):
        d = pick_device(name.strip())
        if d not in devices:
            devices.append(d)
    return devices


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="paper,quick", help="comma-separated presets (default: paper,quick)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, or a comma list such as cpu,cuda (default: auto)")
    p.add_argument("--data-dir",
                   help="OASIS folder holding keras_png_slices_train (default: a temporary synthetic set)")
    p.add_argument("--cache-dir", help="where the decoded split is cached (default: a temporary folder)")
    p.add_argument("--steps", type=int, help="timed steps of our VQ-VAE step and of each end-to-end run "
                   "(default: 8 for paper and 20 for quick on CPU, 30 on CUDA)")
    p.add_argument("--baseline-steps", type=int,
                   help="timed steps of the baseline and of our GAN and PixelCNN steps (default: half of --steps, "
                   "at least 2)")
    p.add_argument("--baseline-items", type=int, default=200, help="images the baseline loader decodes (default: 200)")
    p.add_argument("--amp", choices=("auto", "bf16", "off"), help="override the presets' amp setting")
    p.add_argument("--compile", nargs="?", const="inductor", default="off", metavar="BACKEND",
                   help="torch.compile our encoder and decoder, as --compile in training (default: off)")
    p.add_argument("--peak-tflops", type=float, help="the device's peak TFLOP/s (default: datasheet or measured)")
    p.add_argument("--json", action="store_true", help='print one JSON line {"results": [...]} last on stdout')
    args = p.parse_args(argv)
    for name in ("steps", "baseline_steps", "baseline_items"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")

    try:
        return run(args)
    except (ValueError, DataError, RunError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run(args) -> int:
    names = [n.strip() for n in args.presets.split(",") if n.strip()]
    cfgs = [config.preset(n) for n in names]
    for cfg in cfgs:
        if args.amp:
            cfg.runtime.amp = args.amp
        cfg.runtime.compile = args.compile
    devices = parse_devices(args.device)
    real_stdout = sys.stdout
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp, \
            contextlib.redirect_stdout(sys.stderr if args.json else sys.stdout):
        if args.data_dir:
            train_folder = find_root(args.data_dir) / split_folder_name("train")
        else:
            # enough slices that no timed loop repeats an image (the loops wrap around if it ever does)
            need = max(max(args.baseline_items, max(_steps(args, d, c)) * c.train.batch_size) + c.train.batch_size
                       for d in devices for c in cfgs)
            t = time.perf_counter()
            root = make_png_set(Path(tmp) / "data", min(need, 512))
            train_folder = root / split_folder_name("train")
            log(f"wrote {len(list_pngs(train_folder))} training slices to {train_folder} "
                f"({time.perf_counter() - t:.1f} s)")
        cache_dir = Path(args.cache_dir) if args.cache_dir else Path(tmp) / "cache"
        for device in devices:
            peaks = {}
            for cfg in cfgs:
                steps, base_steps = _steps(args, device, cfg)
                bf16 = use_bf16(device, cfg.runtime.amp)
                if bf16 not in peaks:
                    peaks[bf16] = device_peak(device, bf16, args.peak_tflops)
                log(f"bench {device.type} {cfg.preset}: {steps} steps, baseline {base_steps} ...")
                t = time.perf_counter()
                r = bench_preset(cfg, device, train_folder, cache_dir, steps, base_steps, args.baseline_items,
                                 peak=peaks[bf16])
                log(f"  done in {time.perf_counter() - t:.0f} s")
                results.append(r)
        print(format_table(results))
    if args.json:
        print(json.dumps({"results": results}), file=real_stdout, flush=True)
    return 0


def _steps(args, device: torch.device, cfg: config.Config) -> tuple[int, int]:
    steps = args.steps or DEFAULT_STEPS.get(device.type, {}).get(cfg.preset, DEFAULT_STEPS_OTHER.get(device.type, 10))
    return steps, args.baseline_steps or max(2, steps // 2)


if __name__ == "__main__":
    sys.exit(main())
