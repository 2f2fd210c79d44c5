"""Training: ONE loop (`fit`) that every model goes through, and per model only what is its own (a `Stage`).

    history = fit(stage, cfg, run_dir, resume)    # the loop: resume, DDP, LR schedule, progress, loss flush,
                                                  # NaN stop, per-epoch evaluation, TensorBoard, checkpoints
    model, history = train_vqvae(cfg, splits, run_dir, device)
    prior, history = train_prior("pixelcnn", cfg, vqvae, splits, run_dir, device)

A stage builds its networks and optimisers, turns a permutation slice into a batch, takes one step (losses
stay on the device: the loop reads them back only every `log_every` steps) and evaluates itself after each
epoch. Each split is resident on the device; every epoch is a (seed, epoch) permutation, so `resume=True`
continues exactly where a run stopped. Under torchrun each rank trains on its shard of the permutation and
rank 0 alone evaluates, logs and saves.
"""
from __future__ import annotations

import copy
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import figures
import gan
import metrics
from config import Config
from dataset import Split, epoch_permutation, gather, to_float
from evaluate import ENCODE_BATCH, decode_indices, encode_split, evaluate_vqvae, evenly, fingerprint, sample_codes
from modules import VQVAE, Discriminator, build_prior
from runs import (atomic_save, autocast, barrier, check_same_architecture, checkpoint, checkpoint_path, dist_info,
                  all_ranks_finite, keep_freed_host_memory, load_checkpoint, load_state, pick_device, seed_everything,
                  set_rng_state, use_bf16)

# Samples drawn after each epoch for TensorBoard and per-epoch code statistics. MaskGIT's decoding costs a
# forward pass per step, so these previews are a real share of its training time: 16 make a 4 x 4 grid, and
# 16 quick-preset maps hold over a hundred codes for each of K = 128.
SHOWN = 16


class TrainingDiverged(Exception):
    """The loss became NaN or infinite; the message names the last good checkpoint."""


# ---------------------------------------------------------------- what a model contributes

class Stage:
    """One model's part in the loop. A subclass sets `name`, `loss_names`, `models`, `optimizers`, `lrs`
    (base learning rate per optimiser), `epochs`, `batch_size`, `n_items`, and writes `batch`, `step` and
    `evaluate`. `models` are what its checkpoint saves; `nets` what the step calls (DDP-wrapped under torchrun).
    """
    name: str
    loss_names: tuple[str, ...]
    seed_offset = 0          # shuffles differ between stages trained with the same seed
    best_key: str | None = None  # a validation number whose maximum is also saved as <name>_best.pt
    lr_schedule = "constant"
    warmup_steps = 0             # linear warm-up of the learning rate before the schedule
    lr_flag = "--lr"         # driver.py's flag for its learning rate, named when the loss diverges
    global_step = 0          # set by the loop before each step: schedules inside a step (lazy penalties) use it

    def __init__(self, cfg: Config, device: torch.device, bf16: bool):
        self.cfg, self.device, self.bf16 = cfg, device, bf16
        self.models: dict[str, torch.nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.lrs: dict[str, float] = {}

    def distribute(self) -> None:
        """Wrap every trained network in DDP. Buffers are not broadcast: a critic runs several times before
        one backward, and the quantizer keeps its own buffers in sync."""
        self.nets = dict(self.models)
        if dist_info()[1] > 1:
            self.nets = {k: torch.nn.parallel.DistributedDataParallel(m, broadcast_buffers=False)
                         for k, m in self.models.items() if any(p.requires_grad for p in m.parameters())}
            for k, m in self.models.items():  # DDP made the trained ones equal; the others (an EMA copy) too
                if k not in self.nets:
                    for t in m.state_dict().values():
                        torch.distributed.broadcast(t, 0)

    def train(self) -> None:
        for m in self.models.values():
            m.train()

    def state(self) -> dict:
        """Extra entries of the checkpoint's state, checked by `resumable`."""
        return {}

    def resumable(self, ckpt: dict, path: Path) -> bool:
        return True

    def batch(self, idx: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def step(self, batch: torch.Tensor) -> torch.Tensor:
        """One optimisation step; returns the losses named in `loss_names` as a device tensor."""
        raise NotImplementedError

    def evaluate(self, writer, step: int) -> dict:
        """Rank 0, after each epoch: numbers for the history (and TensorBoard, which it writes itself)."""
        raise NotImplementedError


# ---------------------------------------------------------------- the loop

def fit(stage: Stage, cfg: Config, run_dir, resume: bool = False) -> dict:
    """Train `stage` for its epochs; returns its history
    {"losses": loss names, "train": [[step, *losses], ...], "val": [{...} per epoch]}.

    Writes `<name>_last.pt` after every epoch (and `<name>_best.pt` when `stage.best_key` improves), atomically,
    with the layout of `runs.checkpoint`; `resume=True` continues from `<name>_last.pt` exactly.
    """
    rank = dist_info()[0]
    last = checkpoint_path(run_dir, stage.name)
    state = {"epoch": 0, "step": 0, "best": -math.inf,
             "history": {"losses": list(stage.loss_names), "train": [], "val": []}}
    if resume:
        state = resume_stage(stage, cfg, last) or state
    state.update(stage.state())
    stage.distribute()
    writer = make_writer(run_dir, rank)
    try:
        for epoch in range(state["epoch"], stage.epochs):
            images_per_s = run_epoch(stage, state, epoch, writer, last)
            state["epoch"] = epoch + 1
            if rank == 0:
                end_epoch(stage, cfg, state, writer, images_per_s, run_dir)
            barrier()
    finally:
        writer.close()
    return state["history"]


def run_epoch(stage: Stage, state: dict, epoch: int, writer, last: Path) -> float:
    """One pass over this rank's shard of the epoch's permutation; returns training images/s (all ranks)."""
    rank, world = dist_info()
    stage.train()
    order = rank_order(stage.n_items, stage.cfg.seed + stage.seed_offset, epoch, stage.device)
    steps = batch_slices(len(order), stage.batch_size)
    pending, t0 = [], time.perf_counter()
    # `with`: a bar left open by NaN or Ctrl-C would stay on the line where the one-line error is printed.
    with tqdm(steps, desc=f"{stage.name} epoch {epoch + 1}/{stage.epochs}", unit="batch", disable=rank > 0,
              leave=False, dynamic_ncols=True) as bar:
        for i, sl in enumerate(bar):
            set_lrs(stage, state["step"], len(steps) * stage.epochs)
            stage.global_step = state["step"]
            pending.append(stage.step(stage.batch(order[sl])))
            state["step"] += 1
            if len(pending) == stage.cfg.runtime.log_every or i == len(steps) - 1:
                mean = flush_losses(pending, stage.loss_names, state["step"], writer, stage.name, last,
                                    stage.lr_flag)
                state["history"]["train"].append([state["step"], *mean])
                rate = (i + 1) * (sl.stop - sl.start) * world / (time.perf_counter() - t0)
                bar.set_postfix(**{stage.loss_names[0]: f"{mean[0]:.4f}"}, img_s=f"{rate:.0f}")
    return len(steps) * (steps[0].stop - steps[0].start) * world / (time.perf_counter() - t0)


def end_epoch(stage: Stage, cfg: Config, state: dict, writer, images_per_s: float, run_dir) -> None:
    """Rank 0: evaluate, log, and save `last` (and `best`) checkpoints."""
    val = stage.evaluate(writer, state["step"])
    val.update(epoch=state["epoch"], step=state["step"], images_per_s=images_per_s)
    writer.add_scalar(f"perf/{stage.name}_images_per_s", images_per_s, state["step"])
    state["history"]["val"].append(val)
    shown = ", ".join(f"{k} {v:.4g}" for k, v in val.items() if k not in ("epoch", "step", "images_per_s"))
    print(f"{stage.name} epoch {state['epoch']}/{stage.epochs}: {shown} ({images_per_s:.0f} img/s)")
    ckpt = checkpoint(cfg, stage.models, stage.optimizers, state)
    if stage.best_key and val[stage.best_key] > state["best"]:
        state["best"] = val[stage.best_key]
        atomic_save(ckpt, checkpoint_path(run_dir, stage.name, "best"))
    atomic_save(ckpt, checkpoint_path(run_dir, stage.name))


def resume_stage(stage: Stage, cfg: Config, path: Path) -> dict | None:
    """Load `path` into the stage's models and optimisers; None when there is nothing (valid) to resume."""
    if not path.exists():
        return None
    ckpt = load_checkpoint(path)
    if not stage.resumable(ckpt, path):
        return None
    check_same_architecture(ckpt, cfg, path, stage.config_part)
    for key, module in stage.models.items():
        load_state(module, ckpt["models"][key], path)
    for key, opt in stage.optimizers.items():
        opt.load_state_dict(ckpt["optimizers"][key])
    set_rng_state(ckpt["rng"])
    return ckpt["state"]


def set_lrs(stage: Stage, step: int, total_steps: int) -> None:
    """Learning rates as a pure function of the step, so a resumed run follows the same curve."""
    for name, opt in stage.optimizers.items():
        lr = scheduled_lr(stage.lrs[name], stage.lr_schedule, step, total_steps, stage.warmup_steps)
        for group in opt.param_groups:
            group["lr"] = lr


def scheduled_lr(base_lr: float, schedule: str, step: int, total_steps: int, warmup_steps: int = 0) -> float:
    if warmup_steps and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "cosine":
        return 0.5 * base_lr * (1 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))
    if schedule == "constant":
        return base_lr
    raise ValueError(f"lr_schedule must be 'constant' or 'cosine', not {schedule!r}")


def flush_losses(pending: list, names: tuple, step: int, writer, prefix: str, last_good: Path,
                 lr_flag: str = "--lr") -> list[float]:
    """One host sync for `len(pending)` steps: write each step's losses, stop on NaN/inf.

    Under torch.distributed every rank stops together: a rank that stopped alone would leave the others
    waiting for it in their next all-reduce.
    """
    values = torch.stack(pending).float()
    finite = all_ranks_finite(values)
    values = values.cpu()
    if not finite:
        where = last_good if last_good.exists() else "none yet"
        bad = values[~torch.isfinite(values)]
        what = f"became {bad[0].item()}" if len(bad) else "became non-finite on another rank"
        raise TrainingDiverged(f"{prefix} loss {what} near step {step}; last good checkpoint: {where}; "
                               f"continue with --resume and a smaller {lr_flag}")
    first = step - len(values) + 1
    for i, row in enumerate(values.tolist()):
        for name, v in zip(names, row):
            writer.add_scalar(f"{prefix}/{name}", v, first + i)
    pending.clear()
    return values.mean(0).tolist()


def rank_order(n: int, seed: int, epoch: int, device) -> torch.Tensor:
    """This rank's shard of the epoch's permutation; every shard has the same length so no rank waits."""
    rank, world = dist_info()
    order = epoch_permutation(n, seed, epoch, device)
    return order[: n - n % world][rank::world]


def batch_slices(n: int, batch_size: int) -> list[slice]:
    """Full batches only while training: a ragged last batch would skew BatchNorm and the EMA."""
    return [slice(s, s + batch_size) for s in range(0, n - batch_size + 1, batch_size)] or [slice(0, n)]


class NullWriter:
    """Stands in for SummaryWriter on ranks that do not log."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def make_writer(run_dir, rank: int):
    if rank:
        return NullWriter()
    from torch.utils.tensorboard import SummaryWriter
    return SummaryWriter(log_dir=str(run_dir))


def setup(cfg: Config, device) -> tuple[torch.device, bool]:
    """Device flags, allocator and seed for one stage; returns (device, bf16)."""
    device = pick_device(device) if isinstance(device, str) else torch.device(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        keep_freed_host_memory()
    # Per-rank seeds: GAN noise and restart draws differ between ranks; weights and restarts are broadcast.
    seed_everything(cfg.seed + dist_info()[0])
    return device, use_bf16(device, cfg.runtime.amp)


def adam(params, lr: float, device: torch.device, betas=(0.9, 0.999)):
    return torch.optim.Adam(params, lr=lr, betas=betas, fused=device.type in ("cuda", "cpu"))


# ---------------------------------------------------------------- VQ-VAE

class VQVAEStage(Stage):
    name, loss_names, config_part, best_key = "vqvae", ("loss", "recon_mse", "vq_loss"), "model", "ssim"

    def __init__(self, cfg: Config, data: dict[str, Split], device, bf16: bool):
        super().__init__(cfg, device, bf16)
        self.model = VQVAE(cfg.model).to(device, memory_format=torch.channels_last)
        self.models = {"vqvae": self.model}
        self.optimizers = {"adam": adam(self.model.parameters(), cfg.train.lr, device)}
        self.lrs = {"adam": cfg.train.lr}
        self.epochs, self.batch_size, self.lr_schedule = cfg.train.epochs, cfg.train.batch_size, cfg.train.lr_schedule
        self.model.quantizer.distributed = dist_info()[1] > 1
        compile_convs(self.model, cfg.runtime.compile)
        self.train_u8, self.val_u8 = data["train"].images.to(device), data["validate"].images.to(device)
        self.n_items = len(self.train_u8)
        self.shown = evenly(self.val_u8, cfg.train.eval_images)

    def batch(self, idx):
        return training_batch(self.train_u8, idx)

    def step(self, x):
        return vqvae_step(self.nets["vqvae"], self.optimizers["adam"], x, self.device, self.bf16)

    def evaluate(self, writer, step):
        val = evaluate_vqvae(self.model, self.val_u8, max(self.batch_size, 64), self.device, self.bf16)
        log_reconstructions(writer, self.model, val, self.shown, self.device, self.bf16, step)
        return val


def train_vqvae(cfg: Config, data: dict[str, Split], run_dir, device="auto", resume: bool = False):
    """Train the VQ-VAE on data["train"], evaluating on data["validate"] after every epoch.
    Returns (model, history); history["val"] holds mse, ssim, psnr, codebook_usage, perplexity per epoch."""
    device, bf16 = setup(cfg, device)
    stage = VQVAEStage(cfg, data, device, bf16)
    return stage.model, fit(stage, cfg, run_dir, resume)


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
def log_reconstructions(writer, model, val: dict, shown_u8, device, bf16: bool, step: int) -> None:
    for key in ("mse", "ssim", "psnr", "codebook_usage", "perplexity"):
        writer.add_scalar(f"val/{key}", val[key], step)
    model.eval()
    x = to_float(shown_u8)
    with autocast(device, bf16):
        recon, _, idx = model(x)
    model.train()
    writer.add_image("val/originals_over_reconstructions",
                     figures.grid(torch.cat([x, recon.float().clamp(0, 1)]), nrow=len(x)), step)
    writer.add_image("val/code_indices", figures.index_map_rgb(idx[0], model.cfg.num_codes), step, dataformats="HWC")
    writer.add_histogram("val/code_use", idx.flatten().float().cpu(), step, bins=min(model.cfg.num_codes, 512))


# ---------------------------------------------------------------- priors over the frozen VQ-VAE's code maps

class PriorStage(Stage):
    """What every prior shares: the frozen VQ-VAE, the encoded splits, per-epoch samples and code statistics.
    A prior adds its networks and optimisers (the sampling network saved as models["prior"]), `step` on a
    batch of index maps, and optionally `extra_metrics`."""

    def __init__(self, cfg: Config, vqvae: VQVAE, data: dict[str, Split], device, bf16: bool):
        super().__init__(cfg, device, bf16)
        self.part = getattr(cfg, self.name)
        self.config_part = self.name
        self.epochs, self.batch_size = self.part.epochs, self.part.batch_size
        self.vqvae = frozen(vqvae.to(device))
        self.prior = build_prior(self.name, cfg).to(device)
        self.train_idx = encode_split(self.vqvae, data["train"].images, ENCODE_BATCH, device, bf16)
        if self.part.mirror:  # a slice's mirror image is a plausible slice: twice the maps of a small training set
            mirrored = encode_split(self.vqvae, data["train"].images, ENCODE_BATCH, device, bf16, mirror=True)
            self.train_idx = torch.cat([self.train_idx, mirrored])
        self.val_idx = encode_split(self.vqvae, data["validate"].images, ENCODE_BATCH, device, bf16)
        self.n_items = len(self.train_idx)

    def state(self):
        return {"vqvae": fingerprint(self.vqvae), "mirror": self.part.mirror}

    def resumable(self, ckpt, path):
        if ckpt["state"].get("vqvae") != fingerprint(self.vqvae):
            print(f"{path.name} was trained on another VQ-VAE (it changed since): training this prior again")
            return False
        if ckpt["state"].get("mirror", False) != self.part.mirror:
            print(f"{path.name} was trained {'with' if ckpt['state'].get('mirror') else 'without'} mirrored maps: "
                  f"training this prior again")
            return False
        return True

    def batch(self, idx):
        return self.train_idx[idx].long()

    def extra_metrics(self) -> dict:
        return {}

    def evaluate(self, writer, step):
        val = self.extra_metrics()
        # Same seed every epoch, so the grids show the model changing rather than the noise.
        idx = sample_codes(self.prior, min(self.cfg.n_samples, SHOWN), self.cfg.seed, self.device, self.part)
        val.update(code_statistics(idx, self.val_idx, self.cfg.model.num_codes))
        for key, value in val.items():
            writer.add_scalar(f"{self.name}/{key}", value, step)
        samples = decode_indices(self.vqvae, idx, bf16=self.bf16)
        writer.add_image(f"{self.name}/samples", figures.grid(samples), step)
        return val


def frozen(vqvae: VQVAE) -> VQVAE:
    vqvae.eval()
    vqvae.requires_grad_(False)
    return vqvae


def code_statistics(idx: torch.Tensor, real_idx: torch.Tensor, num_codes: int) -> dict:
    """Cheap per-epoch check of generated index maps: code histogram distance to real maps, codes used."""
    counts = torch.bincount(idx.flatten().long(), minlength=num_codes)
    return {"code_js": metrics.code_histogram_distance(idx.cpu(), real_idx.cpu(), num_codes),
            "codes_used": metrics.code_usage(counts.cpu())}


class GANStage(PriorStage):
    """The DCGAN over code maps (config.GANConfig / GAN_RECIPES): per batch one critic step and, every
    `n_critic`-th batch, one generator step. The critic sees codebook vectors divided by the codebook's std
    (a scale it can learn at the same rate whatever the VQ-VAE's), augmented alike for real and fake maps.
    The moving average of the generator's weights (`ema`; 0: the latest weights) samples: models["prior"]."""
    name, seed_offset, lr_flag = "gan", 1, "--gan-lr"
    loss_names = ("loss_d", "loss_g", "penalty", "d_real", "d_fake")

    def __init__(self, cfg, vqvae, data, device, bf16):
        super().__init__(cfg, vqvae, data, device, bf16)
        g = self.part
        self.prior.codebook.copy_(self.vqvae.quantizer.codebook)
        self.generator = self.prior
        self.prior = copy.deepcopy(self.generator).requires_grad_(False)  # with ema 0: a copy of the latest
        self.critic = Discriminator(g, cfg.model.latent_size, cfg.model.code_dim).to(device)
        self.models = {"prior": self.prior, "generator": self.generator, "critic": self.critic}
        self.optimizers = {"generator": adam(self.generator.parameters(), g.lr, device, (g.beta1, g.beta2)),
                           "critic": adam(self.critic.parameters(), g.lr, device, (g.beta1, g.beta2))}
        self.lrs = {"generator": g.lr, "critic": g.lr}
        self.scale = 1 / self.vqvae.quantizer.codebook.float().std()
        self.train_u8 = data["train"].images.to(device) if g.target == "encoder" else None

    def batch(self, idx):
        if self.part.target == "encoder":  # encoded per batch: a whole split's continuous maps can be gigabytes
            n = len(self.train_u8)  # with mirror, items n..2n-1 are the mirror images of 0..n-1
            x = training_batch(self.train_u8, idx % n)
            if self.part.mirror:
                x = torch.where((idx >= n).view(-1, 1, 1, 1), x.flip(-1), x)
            with torch.no_grad(), autocast(self.device, self.bf16):
                return self.vqvae.encoder(x).float() * self.scale
        return self.vqvae.quantizer.lookup(self.train_idx[idx].long()).float() * self.scale

    def critic_input(self, maps: torch.Tensor) -> torch.Tensor:
        return gan.diff_augment(maps, self.part.augment)

    def step(self, real):
        g, t = self.part, self.global_step
        loss_d, penalty, d_real, d_fake = self.critic_step(real, t)
        loss_g = torch.zeros((), device=self.device)
        if t % g.n_critic == g.n_critic - 1:
            loss_g = self.generator_step(len(real))
            gan.update_ema(self.prior, self.generator, gan.ema_decay(g.ema, t // g.n_critic))
        return torch.stack([loss_d, loss_g, penalty, gan.critic_scores(g.loss, d_real).mean(),
                            gan.critic_scores(g.loss, d_fake).mean()]).detach()

    def critic_step(self, real: torch.Tensor, t: int):
        g = self.part
        with torch.no_grad():
            fake = self.generator(torch.randn(len(real), g.noise_dim, device=self.device))[0] * self.scale
        real, fake = self.critic_input(real), self.critic_input(fake)
        with autocast(self.device, self.bf16):
            d_real, d_fake = self.nets["critic"](real).float(), self.nets["critic"](fake).float()
        loss_d = gan.critic_loss(g.loss, d_real, d_fake, g.real_label)
        # Penalties through the critic itself, not its DDP wrapper: DDP cannot differentiate twice, and the
        # penalty's parameter gradients join loss_d's in the one backward that DDP averages across ranks.
        penalty, total = torch.zeros((), device=self.device), loss_d
        if g.gp_weight:
            penalty = gan.gradient_penalty(self.critic, real, fake)
            total = loss_d + g.gp_weight * penalty
        elif g.r1_gamma and t % g.r1_every == 0:
            penalty = gan.r1_penalty(self.critic, real)
            total = loss_d + g.r1_gamma / 2 * g.r1_every * penalty
        opt = self.optimizers["critic"]
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        return loss_d.detach(), penalty.detach(), d_real.detach(), d_fake.detach()  # the objective, penalty apart

    def generator_step(self, n: int) -> torch.Tensor:
        g = self.part
        self.critic.requires_grad_(False)  # the generator's step leaves the critic's gradients alone
        with autocast(self.device, self.bf16):
            fake = self.nets["generator"](torch.randn(n, g.noise_dim, device=self.device))[0] * self.scale
            loss_g = gan.generator_loss(g.loss, self.critic(self.critic_input(fake)).float())
        opt = self.optimizers["generator"]
        opt.zero_grad(set_to_none=True)
        loss_g.backward()
        opt.step()
        self.critic.requires_grad_(True)
        return loss_g.detach()


class PixelCNNStage(PriorStage):
    """Gated PixelCNN by maximum likelihood; reports validation bits per code."""
    name, loss_names, seed_offset, lr_flag = "pixelcnn", ("loss",), 2, "--pixelcnn-lr"

    def __init__(self, cfg, vqvae, data, device, bf16):
        super().__init__(cfg, vqvae, data, device, bf16)
        self.models = {"prior": self.prior}
        self.optimizers = {"adam": adam(self.prior.parameters(), self.part.lr, device)}
        self.lrs = {"adam": self.part.lr}

    def step(self, target):
        with autocast(self.device, self.bf16):
            logits = self.nets["prior"](target)
        loss = F.cross_entropy(logits.float(), target)
        opt = self.optimizers["adam"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()[None]

    def extra_metrics(self):
        return {"val_bits_per_code": bits_per_code(self.prior, self.val_idx, max(self.batch_size, 64), self.device,
                                                   self.bf16)}


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


class MaskGITStage(PriorStage):
    """MaskGIT by masked-token cross-entropy; reports the same loss on the validation maps with fixed masks."""
    name, loss_names, seed_offset, lr_schedule = "maskgit", ("loss",), 3, "cosine"

    def __init__(self, cfg, vqvae, data, device, bf16):
        super().__init__(cfg, vqvae, data, device, bf16)
        p = self.part
        self.warmup_steps = p.warmup_steps
        self.models = {"prior": self.prior}
        self.optimizers = {"adamw": torch.optim.AdamW(self.prior.parameters(), lr=p.lr, betas=(0.9, 0.95),
                                                      weight_decay=p.weight_decay)}
        self.lrs = {"adamw": p.lr}

    def step(self, target):
        tok, mask = self.prior.random_masks(target)
        with autocast(self.device, self.bf16):  # the run's precision, as every other stage; the loss is float32
            logits = self.nets["prior"](tok, mask)  # through DDP's forward
        loss = self.prior.masked_loss(logits, tok, mask)
        opt = self.optimizers["adamw"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.prior.parameters(), 1.0)  # attention logits can spike early on
        opt.step()
        return loss.detach()[None]

    @torch.no_grad()
    def extra_metrics(self):
        """Masked-token loss over the first 256 validation maps, in batches: the logits of 256 paper-grid maps
        at once (256 x 256 tokens x 16 codes x 512) would take gigabytes."""
        self.prior.eval()
        g = torch.Generator(self.device).manual_seed(0)  # the same masks every epoch: comparable numbers
        total = count = 0.0
        for idx in self.val_idx[:256].long().split(self.batch_size):
            tok, mask = self.prior.random_masks(idx, g)
            n = float(mask.sum()) * tok.shape[-1]
            total += float(self.prior.masked_loss(self.prior(tok, mask), tok, mask)) * n
            count += n
        self.prior.train()
        return {"val_masked_loss": total / count}


STAGES = {"gan": GANStage, "pixelcnn": PixelCNNStage, "maskgit": MaskGITStage}


def train_prior(name: str, cfg: Config, vqvae: VQVAE, data: dict[str, Split], run_dir, device="auto",
                resume: bool = False):
    """Train the prior `name` (one of config.PRIORS) on the frozen VQ-VAE's code maps of data["train"].
    Returns (prior, history)."""
    device, bf16 = setup(cfg, device)
    stage = STAGES[name](cfg, vqvae, data, device, bf16)
    return stage.prior, fit(stage, cfg, run_dir, resume)
