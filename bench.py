"""Speed and memory of the training pipeline, side by side with a plain baseline, in one run.

    python bench.py                                   # presets paper and quick on the default device: a table
    python bench.py --json                            # ... and one JSON line {"results": [...]} last on stdout
    python bench.py --presets paper --device cpu,cuda --data-dir DIR --steps 20

Per device and preset, in images/s unless said:
  data        iterating the cached split. Ours: the whole split resident on the device as uint8
              (dataset.load_folder's cache), batches indexed by the epoch permutation and converted to float
              there (dataset.batches). Baseline, the report's way: a torch Dataset that decodes one PNG per item
              with skimage.io.imread (skimage.transform.resize only when the size differs), DataLoader with
              num_workers=0.
  step        one VQ-VAE training step. Ours: train.train_vqvae's step, line for line (bf16 autocast where
              runs.use_bf16 says so, channels_last, fused Adam, EMA codebook, no host sync).
              Baseline: the same Encoder and Decoder (torch's own ConvTranspose2d, as in the report) in fp32,
              contiguous, with the report's dense one-hot quantizer (one_hot(argmin) @ codebook, codebook +
              commitment loss), plain Adam, loss.item() per step, run in a fresh process so that it keeps
              PyTorch's defaults (on CUDA: no cudnn.benchmark, no TF32 matmuls; on CPU: glibc's malloc as it
              comes, see runs.keep_freed_host_memory).
  gan         one GAN step as in train.train_gan (D step + G step, snap head), in code maps/s; timed over
              --baseline-steps steps, since each is several VQ-VAE steps' work on the paper preset.
  end to end  data + step over a fixed number of batches, which is what an epoch runs at. Ours: batches of the
              resident split + our step (losses read back every log_every steps, as in training). Baseline:
              the DataLoader + the baseline step (its step figure is the step part of this same loop).
  memory      peak CUDA memory allocated during the step (CUDA), or the process's peak RSS during it (CPU:
              VmHWM, reset per phase through /proc/self/clear_refs where Linux allows, else getrusage's
              lifetime peak).
  FLOPs       forward + backward FLOPs per training image, counted by torch.utils.flop_counter on a small
              batch; peak fraction = achieved step FLOP/s / the device's peak: a datasheet dense-bf16 figure
              for known GPUs, otherwise a measured large matmul in the training dtype, or --peak-tflops.

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
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import config
from dataset import (DataError, batches, epoch_permutation, find_root, list_pngs, load_folder, split_folder_name,
                     to_float)
from modules import VQVAE, CodeGenerator, ConvTranspose2d, Decoder, Discriminator, Encoder, Quantized
from runs import RunError, autocast, pick_device, release_freed_host_memory, use_bf16

REQUIRED_KEYS = ("device", "preset", "data_img_s", "baseline_data_img_s", "data_ratio", "step_img_s",
                 "end_to_end_img_s", "baseline_end_to_end_img_s", "end_to_end_ratio", "peak_mem_mb",
                 "gflop_per_img", "peak_fraction")

# Dense (no sparsity) bf16 tensor-core peaks from the datasheets, TFLOP/s; the first matching name wins.
CUDA_PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("GH200", 989.0), ("H100", 989.0),
                    ("H200", 989.0), ("A100", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0))

DEFAULT_STEPS = {"cpu": {"paper": 8, "quick": 20}, "cuda": {}}   # timed steps of our VQ-VAE step
DEFAULT_STEPS_OTHER = {"cpu": 6, "cuda": 30}


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- data

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
    """At least n_train training slices in the OASIS layout: the project's synthetic slices when available."""
    try:
        from synthetic import write_synthetic_dataset
    except ImportError:
        log("synthetic.write_synthetic_dataset not available: writing plain ellipse slices instead")
        return write_plain_pngs(root, n_train, size)
    write_synthetic_dataset(root, cases=(math.ceil(n_train / 32), 1, 1), size=size)
    return Path(root)


class PngSlices(torch.utils.data.Dataset):
    """The report's input pipeline: every item is a PNG decoded (and resized) in Python, every epoch."""

    def __init__(self, folder, size: int):
        self.files, self.size = list_pngs(Path(folder)), size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        from skimage.io import imread
        from skimage.transform import resize
        from skimage.util import img_as_float32

        img = img_as_float32(imread(self.files[i], as_gray=True))
        if img.shape != (self.size, self.size):
            img = resize(img, (self.size, self.size), anti_aliasing=True).astype(np.float32)
        return torch.from_numpy(img)[None]


def baseline_loader(folder, size: int, batch_size: int, seed: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(PngSlices(folder, size), batch_size=batch_size, shuffle=True,
                                       num_workers=0, drop_last=True,
                                       generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- the baseline model

class OneHotQuantizer(nn.Module):
    """The report's quantizer: dense distances, one_hot(argmin) @ codebook, codebook + commitment loss."""

    def __init__(self, num_codes: int, code_dim: int, beta: float = 0.25):
        super().__init__()
        self.num_codes, self.beta = num_codes, beta
        self.codebook = nn.Parameter(torch.empty(num_codes, code_dim).uniform_(-1 / num_codes, 1 / num_codes))

    def forward(self, z_e: torch.Tensor) -> Quantized:
        n, d, h, w = z_e.shape
        flat = z_e.permute(0, 2, 3, 1).reshape(-1, d)
        dist = (flat.pow(2).sum(1, keepdim=True) - 2 * flat @ self.codebook.t()
                + self.codebook.pow(2).sum(1)[None])
        idx = dist.argmin(1)
        one_hot = F.one_hot(idx, self.num_codes).to(flat.dtype)
        z_q = one_hot @ self.codebook
        loss = F.mse_loss(z_q, flat.detach()) + self.beta * F.mse_loss(flat, z_q.detach())
        z_q = flat + (z_q - flat).detach()
        return Quantized(z_q.view(n, h, w, d).permute(0, 3, 1, 2), idx.view(n, h, w), loss)


class BaselineVQVAE(nn.Module):
    """The project's Encoder and Decoder around the report's one-hot quantizer, with torch's own layers."""

    def __init__(self, cfg: config.ModelConfig):
        super().__init__()
        self.encoder = Encoder(cfg)
        self.quantizer = OneHotQuantizer(cfg.num_codes, cfg.code_dim, cfg.beta)
        self.decoder = Decoder(cfg)
        for layer in self.decoder.modules():
            if isinstance(layer, ConvTranspose2d):
                # Ours only moves the bias out of the convolution on CPU (no state of its own): undo that.
                layer.__class__ = nn.ConvTranspose2d

    def forward(self, x: torch.Tensor):
        q = self.quantizer(self.encoder(x))
        return self.decoder(q.z_q), q.loss, q.indices


def baseline_step(model, opt, x: torch.Tensor) -> float:
    recon, vq_loss, _ = model(x)
    loss = F.mse_loss(recon, x) + vq_loss
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()


def flush(pending: list) -> None:
    """The training loops' one host sync per log_every steps."""
    values = torch.stack(pending).float().cpu()
    if not torch.isfinite(values).all():
        raise RuntimeError("loss became NaN or infinite during the benchmark")
    pending.clear()


def train_batches(images_u8: torch.Tensor, batch_size: int, seed: int, device, first_epoch: int = 0):
    """Training batches exactly as train_vqvae makes them, epoch after epoch."""
    from train import batch_slices, rank_order, training_batch

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


class PeakMemory:
    """Peak memory over a block: CUDA max_memory_allocated, or the process's peak RSS on the CPU."""

    def __init__(self, device: torch.device):
        self.device, self.mb, self.kind = device, float("nan"), ""

    def __enter__(self):
        if self.device.type == "cuda":
            sync(self.device)
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
            sync(self.device)
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
    best = math.inf
    for i in range(4 if device.type == "cuda" else 3):
        sync(device)
        t = time.perf_counter()
        for _ in range(10 if device.type == "cuda" else 1):
            a @ b
        sync(device)
        if i:  # the first round is a warm-up
            best = min(best, (time.perf_counter() - t) / (10 if device.type == "cuda" else 1))
    return 2 * n ** 3 / best / 1e12


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


# ---------------------------------------------------------------- one preset on one device

def bench_preset(cfg: config.Config, device, train_folder, cache_dir, steps: int, baseline_steps: int,
                 baseline_items: int = 200, warmup: int | None = None, peak: tuple[float, str] | None = None,
                 peak_tflops: float | None = None) -> dict:
    """All figures of one preset on one device, as one flat dict (see the module docstring)."""
    from evaluate import encode_split
    from train import adam, compile_convs, frozen, gan_step, setup, vqvae_step

    load_start = load_average()
    device, bf16 = setup(cfg, device)
    warmup = warmup if warmup is not None else (5 if device.type == "cuda" else 2)
    bs, size = cfg.train.batch_size, cfg.model.image_size
    out = {"device": device.type, "device_name": device_name(device), "preset": cfg.preset, "image_size": size,
           "batch_size": bs, "bf16": bf16, "channels_last": True,
           "compile": cfg.runtime.compile, "steps": steps, "baseline_steps": baseline_steps}

    # ---- ours: the cached split, resident on the device
    array, _ = load_folder(train_folder, size, cache_dir)
    train_u8 = torch.from_numpy(array).to(device)
    del array
    if len(train_u8) < bs:
        raise ValueError(f"{train_folder}: {len(train_u8)} slices, fewer than one batch of {bs}")
    out["train_images"] = len(train_u8)

    # (a) data: float batches of the resident split, whole epochs, until at least half a second has passed
    n_img, epoch, t0 = 0, 0, time.perf_counter()
    while True:
        for x in batches(train_u8, bs, epoch_permutation(len(train_u8), cfg.seed, epoch, device)):
            n_img += len(x)
        epoch += 1
        sync(device)
        if time.perf_counter() - t0 >= 0.5 and epoch >= 2:
            break
    out["data_img_s"] = n_img / (time.perf_counter() - t0)

    # FLOPs per training image, on a fresh model and a small batch (FLOPs scale with the batch)
    probe = min(bs, 2)
    xf = torch.rand(probe, 1, size, size, device=device)
    out["gflop_per_img"] = training_flops_per_image(
        VQVAE(cfg.model).to(device, memory_format=torch.channels_last),
        xf.contiguous(memory_format=torch.channels_last), device, bf16) / 1e9
    out["baseline_gflop_per_img"] = training_flops_per_image(BaselineVQVAE(cfg.model).to(device), xf, device,
                                                             False) / 1e9

    # (b) our VQ-VAE step on one batch
    model = VQVAE(cfg.model).to(device, memory_format=torch.channels_last)
    opt = adam(model.parameters(), cfg.train.lr, device)
    compile_convs(model, cfg.runtime.compile)
    net = model
    source = train_batches(train_u8, bs, cfg.seed, device)
    x = next(source)
    pending = []
    with PeakMemory(device) as mem:
        for _ in range(warmup):
            pending.append(vqvae_step(net, opt, x, device, bf16))
        flush(pending)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            pending.append(vqvae_step(net, opt, x, device, bf16))
        sync(device)
        dt = time.perf_counter() - t0
    flush(pending)
    out["step_img_s"] = steps * bs / dt
    out["peak_mem_mb"], out["mem_kind"] = mem.mb, mem.kind

    # (d) end to end: fresh batches of the resident split + our step, losses read back every log_every steps
    sync(device)
    t0 = time.perf_counter()
    for i in range(steps):
        pending.append(vqvae_step(net, opt, next(source), device, bf16))
        if len(pending) == cfg.runtime.log_every or i == steps - 1:
            flush(pending)
    sync(device)
    out["end_to_end_img_s"] = steps * bs / (time.perf_counter() - t0)

    # (c) our GAN step on the (now frozen) VQ-VAE's code maps; fewer steps (each is several VQ-VAE steps' work)
    g_cfg, m_cfg = cfg.gan, cfg.model
    gan_warmup, gan_steps = max(1, warmup // 2), baseline_steps
    vqvae = frozen(model)
    gbs = g_cfg.batch_size
    real_idx = encode_split(vqvae, train_u8[:gbs], 256, device, bf16)
    gen = CodeGenerator(g_cfg, m_cfg).to(device)
    disc = Discriminator(g_cfg, m_cfg.latent_size, m_cfg.code_dim).to(device)
    opt_g = adam(gen.parameters(), g_cfg.lr, device, (g_cfg.beta1, g_cfg.beta2))
    opt_d = adam(disc.parameters(), g_cfg.lr, device, (g_cfg.beta1, g_cfg.beta2))
    gen.train(), disc.train()
    order = torch.randint(len(real_idx), ((gan_warmup + gan_steps), gbs), device=device)
    for i in range(gan_warmup):
        pending.append(gan_step(gen, disc, opt_g, opt_d, vqvae.quantizer.lookup(real_idx[order[i]].long()), vqvae.quantizer,
                                 g_cfg.noise_dim, device, bf16))
    flush(pending)
    sync(device)
    t0 = time.perf_counter()
    for i in range(gan_warmup, gan_warmup + gan_steps):
        pending.append(gan_step(gen, disc, opt_g, opt_d, vqvae.quantizer.lookup(real_idx[order[i]].long()), vqvae.quantizer,
                                 g_cfg.noise_dim, device, bf16))
    flush(pending)
    sync(device)
    out["gan_img_s"] = gan_steps * gbs / (time.perf_counter() - t0)
    out["gan_steps"] = gan_steps
    del model, net, opt, vqvae, gen, disc, opt_g, opt_d, source, x, train_u8, real_idx
    gc.collect()
    release_freed_host_memory()  # the baseline's process should not have to share the machine with our peak
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # ---- baseline, the report's way, in a fresh process: none of our settings (backend flags, the allocator's
    # keep_freed_host_memory) may leak into it
    spawn = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool:
        out.update(pool.submit(baseline, cfg, device, train_folder, baseline_steps, baseline_items).result())

    # ratios and FLOP rates
    out["data_ratio"] = out["data_img_s"] / out["baseline_data_img_s"]
    out["step_ratio"] = out["step_img_s"] / out["baseline_step_img_s"]
    out["end_to_end_ratio"] = out["end_to_end_img_s"] / out["baseline_end_to_end_img_s"]
    peak_tf, peak_src = peak or device_peak(device, bf16, peak_tflops)
    out["peak_tflops"], out["peak_source"] = peak_tf, peak_src
    out["achieved_tflops"] = out["step_img_s"] * out["gflop_per_img"] / 1e3
    out["baseline_achieved_tflops"] = out["baseline_step_img_s"] * out["baseline_gflop_per_img"] / 1e3
    out["peak_fraction"] = out["achieved_tflops"] / peak_tf
    out["baseline_peak_fraction"] = out["baseline_achieved_tflops"] / peak_tf
    out["load_avg_1min"] = max(load_start, load_average())
    return out


def baseline(cfg: config.Config, device, train_folder, baseline_steps: int, baseline_items: int) -> dict:
    """The baseline's data, step and end-to-end figures, as bench_preset's baseline_* keys."""
    out = {}
    bs, size = cfg.train.batch_size, cfg.model.image_size
    loader = baseline_loader(train_folder, size, bs, cfg.seed)
    loader.dataset[0]  # imports and first-call costs out of the timing
    # (a) data: per-item decode through the DataLoader, about baseline_items images
    n_img, t0 = 0, time.perf_counter()
    for xb in loader:
        n_img += len(xb.to(device))
        if n_img >= baseline_items:
            break
    sync(device)
    out["baseline_data_img_s"] = n_img / (time.perf_counter() - t0)

    # (b) + (d): DataLoader batches + the baseline step; one warm-up batch, then baseline_steps timed ones
    base = BaselineVQVAE(cfg.model).to(device)
    base_opt = torch.optim.Adam(base.parameters(), lr=cfg.train.lr)
    batches_needed = 1 + baseline_steps
    with PeakMemory(device) as base_mem:
        it, done, step_time = _cycle(loader), 0, 0.0
        baseline_step(base, base_opt, next(it).to(device))
        sync(device)
        t0 = time.perf_counter()
        while done < batches_needed - 1:
            xb = next(it).to(device)
            sync(device)
            ts = time.perf_counter()
            baseline_step(base, base_opt, xb)
            sync(device)
            step_time += time.perf_counter() - ts
            done += 1
        total = time.perf_counter() - t0
    out["baseline_step_img_s"] = baseline_steps * bs / step_time
    out["baseline_end_to_end_img_s"] = baseline_steps * bs / total
    out["baseline_peak_mem_mb"] = base_mem.mb
    return out


def _cycle(loader):
    while True:
        yield from loader


# ---------------------------------------------------------------- output

def format_table(results: list[dict]) -> str:
    head = ("device", "preset", "data img/s", "base", "x", "step img/s", "base", "x", "e2e img/s", "base", "x",
            "GAN maps/s", "peak MB", "base MB", "GFLOP/img", "TFLOP/s", "of peak")
    rows = [head]
    for r in results:
        rows.append((r["device"], f"{r['preset']} {r['image_size']}px bs{r['batch_size']}",
                     f"{r['data_img_s']:.0f}", f"{r['baseline_data_img_s']:.0f}", f"{r['data_ratio']:.0f}x",
                     f"{r['step_img_s']:.1f}", f"{r['baseline_step_img_s']:.1f}", f"{r['step_ratio']:.1f}x",
                     f"{r['end_to_end_img_s']:.1f}", f"{r['baseline_end_to_end_img_s']:.1f}",
                     f"{r['end_to_end_ratio']:.1f}x", f"{r['gan_img_s']:.0f}", f"{r['peak_mem_mb']:.0f}",
                     f"{r['baseline_peak_mem_mb']:.0f}", f"{r['gflop_per_img']:.3g}",
                     f"{r['achieved_tflops']:.3g}", f"{r['peak_fraction']:.1%}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    notes = []
    for r in results:
        notes.append(f"{r['device']} {r['preset']}: {r['device_name']}; bf16 {'on' if r['bf16'] else 'off'}, "
                     f"channels_last{', compiled' if r['compile'] != 'off' else ''}; {r['steps']} timed steps (baseline {r['baseline_steps']}); "
                     f"memory = {r['mem_kind']}; peak {r['peak_tflops']:.3f} TFLOP/s = {r['peak_source']}; "
                     f"baseline {r['baseline_gflop_per_img']:.3g} GFLOP/img at "
                     f"{r['baseline_peak_fraction']:.1%} of peak")
        cores = os.cpu_count() or 1
        if r["device"] == "cpu" and r["load_avg_1min"] > 1.25 * cores:
            notes.append(f"  WARNING: load average reached {r['load_avg_1min']:.1f} on {cores} cores during this "
                         "preset: other jobs shared the CPU, so these timings are unreliable")
    notes.append("baseline = the report's way: skimage.io.imread per item in a DataLoader(num_workers=0), fp32, "
                 "contiguous, dense one-hot quantizer, plain Adam, loss.item() per step; GAN: train_gan's step")
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
                   help="timed steps of the baseline and of our GAN step (default: half of --steps, at least 2)")
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
