"""Training loops: `train_vqvae`, `train_gan`, `train_prior`.

Each loop keeps its split resident on the device as uint8, shuffles with a (seed, epoch) permutation,
reads losses back to the host only every `log_every` steps, evaluates after every epoch, and writes
`<name>_last.pt` (and, for the VQ-VAE, `vqvae_best.pt` by validation SSIM) atomically so that `resume=True`
continues exactly where it stopped. Under torchrun each rank trains on its shard of the permutation and
rank 0 alone logs and saves.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from config import Config
from dataset import Split, epoch_permutation, gather, to_float
from evaluate import decode_indices, encode_split, evaluate_vqvae, evenly, fixed_noise, sample_gan
from modules import VQVAE, CodeGenerator, Discriminator, PixelCNN
from runs import (atomic_save, autocast, check_same_architecture, keep_freed_host_memory, load_checkpoint, load_state,
                  pick_device, rng_state, seed_everything, set_rng_state, use_bf16)


SHOWN = 64  # samples drawn after each epoch for TensorBoard and per-epoch code statistics


class TrainingDiverged(Exception):
    """The loss became NaN or infinite; the message names the last good checkpoint."""


# ---------------------------------------------------------------- shared plumbing

def dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class NullWriter:
    """Stands in for SummaryWriter on ranks that do not log."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def make_writer(run_dir: Path, rank: int):
    if rank:
        return NullWriter()
    from torch.utils.tensorboard import SummaryWriter
    return SummaryWriter(log_dir=str(run_dir))


def as_device(device) -> torch.device:
    return pick_device(device) if isinstance(device, str) else torch.device(device)


def rank_order(n: int, seed: int, epoch: int, device) -> torch.Tensor:
    """This rank's shard of the epoch's permutation; every shard has the same length so no rank waits."""
    rank, world = dist_info()
    order = epoch_permutation(n, seed, epoch, device)
    return order[: n - n % world][rank::world]


def batch_slices(n: int, batch_size: int):
    """Full batches only while training: a ragged last batch would skew BatchNorm and the EMA."""
    return [slice(s, s + batch_size) for s in range(0, n - batch_size + 1, batch_size)] or [slice(0, n)]


def flush_losses(pending: list, names: tuple, step: int, writer, prefix: str, last_good: Path) -> list[float]:
    """One host sync for `len(pending)` steps: write each step's losses, stop on NaN/inf.

    Under torch.distributed every rank stops together: a rank that stopped alone would leave the others
    waiting for it in their next all-reduce.
    """
    values = torch.stack(pending).float()
    finite = torch.isfinite(values).all().float()
    if dist_info()[1] > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    values = values.cpu()
    if not finite.item():
        where = last_good if last_good.exists() else "none yet"
        bad = values[~torch.isfinite(values)]
        what = f"became {bad[0].item()}" if len(bad) else "became non-finite on another rank"
        raise TrainingDiverged(f"{prefix} loss {what} near step {step}; last good checkpoint: {where}")
    first = step - len(values) + 1
    for i, row in enumerate(values.tolist()):
        for name, v in zip(names, row):
            writer.add_scalar(f"{prefix}/{name}", v, first + i)
    pending.clear()
    return values.mean(0).tolist()


def fingerprint(vqvae: VQVAE) -> list[float]:
    """A few numbers that change whenever the codebook does: a prior is only valid for its own VQ-VAE."""
    codes = vqvae.quantizer.codebook.detach().double().cpu()
    return [float(codes.sum()), float(codes.abs().sum()), float(codes[::7].pow(2).sum())]


def resume_from(path: Path, cfg: Config, part: str, modules: dict, optimizers: dict, vqvae=None) -> dict | None:
    """Load a `last` checkpoint into modules and optimisers; None when there is none to resume, or when a
    prior's checkpoint was trained on another VQ-VAE than `vqvae` (it then starts again)."""
    if not path.exists():
        return None
    ckpt = load_checkpoint(path)
    if vqvae is not None and ckpt["state"].get("vqvae") != fingerprint(vqvae):
        print(f"{path.name} was trained on another VQ-VAE (it changed since): training this prior again")
        return None
    check_same_architecture(ckpt, cfg, path, part)
    for key, module in modules.items():
        load_state(module, ckpt[key], path)
    for key, opt in optimizers.items():
        opt.load_state_dict(ckpt[key])
    set_rng_state(ckpt["rng"])
    return ckpt["state"]


def adam(params, lr: float, device: torch.device, betas=(0.9, 0.999)):
    return torch.optim.Adam(params, lr=lr, betas=betas, fused=device.type in ("cuda", "cpu"))


def set_lr(opt, base_lr: float, schedule: str, step: int, total_steps: int) -> None:
    """Learning rate as a pure function of the step, so a resumed run follows the same curve."""
    if schedule == "cosine":
        lr = 0.5 * base_lr * (1 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))
    elif schedule == "constant":
        lr = base_lr
    else:
        raise ValueError(f"lr_schedule must be 'constant' or 'cosine', not {schedule!r}")
    for group in opt.param_groups:
        group["lr"] = lr


def setup(cfg: Config, device) -> tuple[torch.device, bool]:
    device = as_device(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        keep_freed_host_memory()
    # Per-rank seeds: GAN noise and restart draws differ between ranks; weights and restarts are broadcast.
    seed_everything(cfg.seed + dist_info()[0])
    return device, use_bf16(device, cfg.train.amp)


# ---------------------------------------------------------------- VQ-VAE

def train_vqvae(cfg: Config, data: dict[str, Split], run_dir, device="auto", resume: bool = False):
    """Train the VQ-VAE on data["train"], evaluating on data["validate"] after every epoch.

    Returns (model, history) with history = {"train": [[step, loss, recon_mse, vq_loss], ...],
    "val": [{"epoch", "step", "mse", "ssim", "psnr", "codebook_usage", "perplexity", "images_per_s"}, ...]}.
    """
    device, bf16 = setup(cfg, device)
    rank, world = dist_info()
    run_dir = Path(run_dir)
    last, best = run_dir / "vqvae_last.pt", run_dir / "vqvae_best.pt"
    model = VQVAE(cfg.model).to(device, memory_format=torch.channels_last)
    opt = adam(model.parameters(), cfg.train.lr, device)
    state = {"epoch": 0, "step": 0, "best_ssim": -1.0, "history": {"train": [], "val": []}}
    if resume:
        state = resume_from(last, cfg, "model", {"model": model}, {"optimizer": opt}) or state
    net = model
    if world > 1:  # codebook buffers are kept in sync by the quantizer itself, not by DDP
        net = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    compile_convs(model, cfg.train.compile)

    train_u8, val_u8 = data["train"].images.to(device), data["validate"].images.to(device)
    shown = evenly(val_u8, cfg.train.eval_images)
    writer = make_writer(run_dir, rank)
    bs = cfg.train.batch_size
    for epoch in range(state["epoch"], cfg.train.epochs):
        model.train()
        order = rank_order(len(train_u8), cfg.seed, epoch, device)
        steps = batch_slices(len(order), bs)
        pending, t0 = [], time.perf_counter()
        bar = tqdm(steps, desc=f"vqvae epoch {epoch + 1}/{cfg.train.epochs}", unit="batch", disable=rank > 0,
                   leave=False, dynamic_ncols=True)
        for i, sl in enumerate(bar):
            set_lr(opt, cfg.train.lr, cfg.train.lr_schedule, state["step"], len(steps) * cfg.train.epochs)
            x = training_batch(train_u8, order[sl])
            pending.append(vqvae_step(net, opt, x, device, bf16))
            state["step"] += 1
            if len(pending) == cfg.train.log_every or i == len(steps) - 1:
                mean = flush_losses(pending, ("loss", "recon_mse", "vq_loss"), state["step"], writer, "vqvae", last)
                state["history"]["train"].append([state["step"], *mean])
                rate = (i + 1) * len(x) * world / (time.perf_counter() - t0)
                bar.set_postfix(loss=f"{mean[0]:.4f}", img_s=f"{rate:.0f}")
        images_per_s = len(steps) * bs * world / (time.perf_counter() - t0)
        state["epoch"] = epoch + 1
        if rank == 0:
            val = evaluate_vqvae(model, val_u8, max(bs, 64), device, bf16)
            val.update(epoch=epoch + 1, step=state["step"], images_per_s=images_per_s)
            state["history"]["val"].append(val)
            log_vqvae_epoch(writer, model, val, shown, device, bf16, state["step"])
            print(f"vqvae epoch {epoch + 1}/{cfg.train.epochs}: val ssim {val['ssim']:.4f} psnr {val['psnr']:.2f} "
                  f"usage {val['codebook_usage']:.0%} perplexity {val['perplexity']:.0f} ({images_per_s:.0f} img/s)")
            ckpt = {"config": cfg.to_dict(), "model": model.state_dict(), "optimizer": opt.state_dict(),
                    "state": state, "rng": rng_state()}
            if val["ssim"] > state["best_ssim"]:
                state["best_ssim"] = val["ssim"]
                atomic_save(ckpt, best)
            atomic_save(ckpt, last)
        if world > 1:
            dist.barrier()
    writer.close()
    return model, state["history"]


def compile_convs(model: VQVAE, backend: str) -> None:
    """Compile encoder and decoder in place (state-dict keys unchanged). The quantizer stays eager: its
    data-dependent EMA update and dead-code restarts would only cause graph breaks."""
    if backend != "off":
        model.encoder.compile(backend=backend)
        model.decoder.compile(backend=backend)


def training_batch(images_u8: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The float, channels_last batch that `vqvae_step` takes (bench.py builds its batches here too)."""
    return to_float(gather(images_u8, idx)).contiguous(memory_format=torch.channels_last)


def vqvae_step(net, opt, x: torch.Tensor, device, bf16: bool) -> torch.Tensor:
    """One optimiser step; returns (loss, recon_mse, vq_loss) left on the device (no host sync)."""
    with autocast(device, bf16):
        recon, vq_loss, _ = net(x)
    rec = F.mse_loss(recon.float(), x)
    loss = rec + vq_loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return torch.stack([loss.detach(), rec.detach(), vq_loss.detach()])


@torch.no_grad()
def log_vqvae_epoch(writer, model, val: dict, shown_u8, device, bf16: bool, step: int) -> None:
    from figures import grid, index_map_rgb

    for key in ("mse", "ssim", "psnr", "codebook_usage", "perplexity"):
        writer.add_scalar(f"val/{key}", val[key], step)
    writer.add_scalar("perf/images_per_s", val["images_per_s"], step)
    model.eval()
    x = to_float(shown_u8)
    with autocast(device, bf16):
        recon, _, idx = model(x)
    model.train()
    writer.add_image("val/originals_over_reconstructions",
                     grid(torch.cat([x, recon.float().clamp(0, 1)]), nrow=len(x)), step, dataformats="HW")
    writer.add_image("val/code_indices", index_map_rgb(idx[0], model.cfg.num_codes), step, dataformats="HWC")
    writer.add_histogram("val/code_use", idx.flatten().float().cpu(), step, bins=min(model.cfg.num_codes, 512))


# ---------------------------------------------------------------- GAN over code maps

def frozen(vqvae: VQVAE) -> VQVAE:
    vqvae.eval()
    vqvae.requires_grad_(False)
    return vqvae


def train_gan(cfg: Config, vqvae: VQVAE, data: dict[str, Split], run_dir, device="auto", resume: bool = False):
    """Train a DCGAN on the frozen VQ-VAE's code maps of data["train"].

    Real maps are codebook lookups of the encoded training split; fake maps are always snapped to the
    codebook (see `CodeGenerator`), so the discriminator cannot tell them apart by being off-codebook.
    Returns (generator, history) with history = {"train": [[step, loss_d, loss_g, d_real, d_fake], ...],
    "val": [{"epoch", "step", "code_js", ...}, ...]}.
    """
    device, bf16 = setup(cfg, device)
    rank, world = dist_info()
    run_dir = Path(run_dir)
    last = run_dir / "gan_last.pt"
    vqvae = frozen(vqvae.to(device))
    g_cfg, m_cfg = cfg.gan, cfg.model
    gen = CodeGenerator(g_cfg, m_cfg).to(device)
    disc = Discriminator(g_cfg, m_cfg.latent_size, m_cfg.code_dim).to(device)
    opt_g = adam(gen.parameters(), g_cfg.lr, device, (g_cfg.beta1, g_cfg.beta2))
    opt_d = adam(disc.parameters(), g_cfg.lr, device, (g_cfg.beta1, g_cfg.beta2))
    state = {"epoch": 0, "step": 0, "history": {"train": [], "val": []}}
    if resume:
        state = resume_from(last, cfg, "gan", {"model": gen, "discriminator": disc},
                            {"opt_g": opt_g, "opt_d": opt_d}, vqvae) or state
    state["vqvae"] = fingerprint(vqvae)
    g_net, d_net = gen, disc
    if world > 1:
        # D runs twice before one backward: broadcasting BatchNorm buffers in between breaks autograd on CUDA.
        g_net = torch.nn.parallel.DistributedDataParallel(gen, broadcast_buffers=False)
        d_net = torch.nn.parallel.DistributedDataParallel(disc, broadcast_buffers=False)

    real_idx = encode_split(vqvae, data["train"].images, 256, device, bf16)
    val_idx = encode_split(vqvae, data["validate"].images, 256, device, bf16)
    noise_fixed = fixed_noise(min(cfg.n_samples, SHOWN), g_cfg.noise_dim, cfg.seed, device)
    writer = make_writer(run_dir, rank)
    for epoch in range(state["epoch"], g_cfg.epochs):
        gen.train(), disc.train()
        order = rank_order(len(real_idx), cfg.seed + 1, epoch, device)
        steps = batch_slices(len(order), g_cfg.batch_size)
        pending = []
        bar = tqdm(steps, desc=f"gan epoch {epoch + 1}/{g_cfg.epochs}", unit="batch", disable=rank > 0,
                   leave=False, dynamic_ncols=True)
        for i, sl in enumerate(bar):
            real = vqvae.quantizer.lookup(real_idx[order[sl]].long())
            pending.append(gan_step(g_net, d_net, opt_g, opt_d, real, vqvae.quantizer, g_cfg.noise_dim, device, bf16,
                                    g_cfg.real_label))
            state["step"] += 1
            if len(pending) == cfg.train.log_every or i == len(steps) - 1:
                mean = flush_losses(pending, ("loss_d", "loss_g", "d_real", "d_fake"), state["step"], writer, "gan", last)
                state["history"]["train"].append([state["step"], *mean])
                bar.set_postfix(loss_d=f"{mean[0]:.3f}", loss_g=f"{mean[1]:.3f}")
        state["epoch"] = epoch + 1
        if rank == 0:
            idx = sample_gan(gen, vqvae, noise_fixed)
            val = evaluate_codes(idx, val_idx, m_cfg.num_codes)
            val.update(epoch=epoch + 1, step=state["step"])
            state["history"]["val"].append(val)
            log_samples(writer, "gan", vqvae, idx, val, state["step"], bf16)
            atomic_save({"config": cfg.to_dict(), "model": gen.state_dict(), "discriminator": disc.state_dict(),
                         "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(), "state": state,
                         "rng": rng_state()}, last)
        if world > 1:
            dist.barrier()
    writer.close()
    return gen, state["history"]


def gan_step(g_net, d_net, opt_g, opt_d, real: torch.Tensor, quantizer, noise_dim: int, device,
             bf16: bool, real_label: float = 1.0) -> torch.Tensor:
    """One D step on real and detached fake maps, then one G step; returns (loss_d, loss_g, D(real), D(fake))."""
    bce = F.binary_cross_entropy_with_logits
    noise = torch.randn(len(real), noise_dim, device=device)
    with autocast(device, bf16):
        fake, _ = g_net(noise, quantizer)
        d_real, d_fake = d_net(real).float(), d_net(fake.detach()).float()
    loss_d = bce(d_real, torch.full_like(d_real, real_label)) + bce(d_fake, torch.zeros_like(d_fake))
    opt_d.zero_grad(set_to_none=True)
    loss_d.backward()
    opt_d.step()
    with autocast(device, bf16):
        d_gen = d_net(fake).float()
    loss_g = bce(d_gen, torch.ones_like(d_gen))
    opt_g.zero_grad(set_to_none=True)
    loss_g.backward()
    opt_g.step()
    return torch.stack([loss_d.detach(), loss_g.detach(),
                        torch.sigmoid(d_real).mean().detach(), torch.sigmoid(d_fake).mean().detach()])


def evaluate_codes(idx: torch.Tensor, real_idx: torch.Tensor, num_codes: int) -> dict:
    """Cheap per-epoch check of generated index maps: code histogram distance to real maps, codes used."""
    import metrics

    counts = torch.bincount(idx.flatten().long(), minlength=num_codes)
    return {"code_js": metrics.code_histogram_distance(idx.cpu(), real_idx.cpu(), num_codes),
            "codes_used": metrics.code_usage(counts.cpu())}


def log_samples(writer, prefix: str, vqvae, idx: torch.Tensor, val: dict, step: int, bf16: bool) -> None:
    from figures import grid

    for key, value in val.items():
        if key not in ("epoch", "step"):
            writer.add_scalar(f"{prefix}/{key}", value, step)
    writer.add_image(f"{prefix}/samples", grid(decode_indices(vqvae, idx, bf16=bf16)), step, dataformats="HW")


# ---------------------------------------------------------------- PixelCNN prior over code maps


@torch.no_grad()
def bits_per_code(prior, idx: torch.Tensor, batch_size: int, device, bf16: bool) -> float:
    """Mean negative log-likelihood of whole index maps, in bits per code."""
    was_training = prior.training
    prior.eval()
    total = torch.zeros((), device=device, dtype=torch.float64)
    for start in range(0, len(idx), batch_size):
        target = idx[start:start + batch_size].long()
        with autocast(device, bf16):
            logits = prior(target)
        total += F.cross_entropy(logits.float(), target, reduction="sum").double()
    prior.train(was_training)
    return float(total) / (idx.numel() * math.log(2))


def train_prior(cfg: Config, vqvae: VQVAE, data: dict[str, Split], run_dir, device="auto", resume: bool = False):
    """Train a gated PixelCNN on the frozen VQ-VAE's code maps of data["train"] by maximum likelihood.

    Returns (prior, history) with history = {"train": [[step, loss], ...],
    "val": [{"epoch", "step", "val_bits_per_code", "code_js", "codes_used"}, ...]}.
    """
    device, bf16 = setup(cfg, device)
    rank, world = dist_info()
    run_dir = Path(run_dir)
    last = run_dir / "pixelcnn_last.pt"
    vqvae = frozen(vqvae.to(device))
    p_cfg, m_cfg = cfg.prior, cfg.model
    prior = PixelCNN(p_cfg, m_cfg).to(device)
    opt = adam(prior.parameters(), p_cfg.lr, device)
    state = {"epoch": 0, "step": 0, "history": {"train": [], "val": []}}
    if resume:
        state = resume_from(last, cfg, "prior", {"model": prior}, {"optimizer": opt}, vqvae) or state
    state["vqvae"] = fingerprint(vqvae)
    net = prior
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(prior)

    train_idx = encode_split(vqvae, data["train"].images, 256, device, bf16)
    val_idx = encode_split(vqvae, data["validate"].images, 256, device, bf16)
    writer = make_writer(run_dir, rank)
    for epoch in range(state["epoch"], p_cfg.epochs):
        prior.train()
        order = rank_order(len(train_idx), cfg.seed + 2, epoch, device)
        steps = batch_slices(len(order), p_cfg.batch_size)
        pending = []
        bar = tqdm(steps, desc=f"prior epoch {epoch + 1}/{p_cfg.epochs}", unit="batch", disable=rank > 0,
                   leave=False, dynamic_ncols=True)
        for i, sl in enumerate(bar):
            target = train_idx[order[sl]].long()
            with autocast(device, bf16):
                logits = net(target)
            loss = F.cross_entropy(logits.float(), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            state["step"] += 1
            pending.append(loss.detach()[None])
            if len(pending) == cfg.train.log_every or i == len(steps) - 1:
                mean = flush_losses(pending, ("loss",), state["step"], writer, "prior", last)
                state["history"]["train"].append([state["step"], *mean])
                bar.set_postfix(loss=f"{mean[0]:.3f}")
        state["epoch"] = epoch + 1
        if rank == 0:
            val = {"val_bits_per_code": bits_per_code(prior, val_idx, max(p_cfg.batch_size, 64), device, bf16)}
            # Same seed every epoch, so the grids show the model changing rather than the noise; fp32, as
            # bf16 autocast measured slower for the many small steps of sampling on the CPU.
            idx = prior.sample(min(cfg.n_samples, SHOWN), torch.Generator().manual_seed(cfg.seed), p_cfg.temperature,
                               p_cfg.top_k)
            val.update(evaluate_codes(idx, val_idx, m_cfg.num_codes), epoch=epoch + 1, step=state["step"])
            state["history"]["val"].append(val)
            log_samples(writer, "prior", vqvae, idx, val, state["step"], bf16)
            print(f"prior epoch {epoch + 1}/{p_cfg.epochs}: val {val['val_bits_per_code']:.3f} bits/code, "
                  f"sample code JS {val['code_js']:.3f}, codes used {val['codes_used']:.0%}")
            atomic_save({"config": cfg.to_dict(), "model": prior.state_dict(), "optimizer": opt.state_dict(),
                         "state": state, "rng": rng_state()}, last)
        if world > 1:
            dist.barrier()
    writer.close()
    return prior, state["history"]
