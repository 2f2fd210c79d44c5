"""Models: the VQ-VAE (Encoder, VectorQuantizer, Decoder) and the DCGAN over its quantized maps.

Everything here takes tensors and returns tensors; nothing knows about files, devices or logging.
Images are N x 1 x H x W floats in [0, 1]; code maps are N x D x h x w; index maps are N x h x w (long).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from config import Config, GANConfig, ModelConfig, PixelCNNConfig, check_choice
from priors import MaskGITPrior


# ---------------------------------------------------------------- VQ-VAE

class ResidualBlock(nn.Module):
    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.block = nn.Sequential(
            nn.ReLU(), nn.Conv2d(channels, hidden, 3, padding=1),
            nn.ReLU(), nn.Conv2d(hidden, channels, 1),
        )

    def forward(self, x):
        return x + self.block(x)


def residual_stack(channels: int, hidden: int, n: int) -> nn.Sequential:
    return nn.Sequential(*[ResidualBlock(channels, hidden) for _ in range(n)], nn.ReLU())


class ConvTranspose2d(nn.ConvTranspose2d):
    """nn.ConvTranspose2d with its bias added after the convolution on CPU. Same parameters and state-dict keys.

    PyTorch's CPU (oneDNN) transposed-convolution backward spends longer on the fused bias gradient than on the
    convolution itself; added outside, the bias's gradient is one plain sum over batch and pixels. On CUDA the
    fused bias is the fast one.
    """

    def forward(self, x, output_size=None):
        if x.is_cuda or self.bias is None or output_size is not None:
            return super().forward(x, output_size)
        y = F.conv_transpose2d(x, self.weight, None, self.stride, self.padding, self.output_padding, self.groups,
                               self.dilation)
        return y + self.bias.to(y.dtype)[:, None, None]


def stage_widths(cfg: ModelConfig) -> list[int]:
    """Channels after each downsampling: (64, 128) for the paper's hidden=128 with two of them."""
    return [max(cfg.hidden // 2 ** (cfg.downsamples - 1 - i), 8) for i in range(cfg.downsamples)]


class Encoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        layers, c_in = [], 1
        for i, c in enumerate(stage_widths(cfg)):
            layers += [nn.Conv2d(c_in, c, 4, stride=2, padding=1), nn.ReLU()]
            c_in = c
        layers.pop()  # the paper's encoder has no ReLU between the last downsampling and the 3x3 conv
        layers += [nn.Conv2d(c_in, cfg.hidden, 3, padding=1), residual_stack(cfg.hidden, cfg.res_hidden, cfg.n_res),
                   nn.Conv2d(cfg.hidden, cfg.code_dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x - 0.5)  # centred input: the codebook sees zero-mean features from the start


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        widths = stage_widths(cfg)[::-1]  # e.g. (128, 64)
        layers = [nn.Conv2d(cfg.code_dim, cfg.hidden, 3, padding=1),
                  residual_stack(cfg.hidden, cfg.res_hidden, cfg.n_res)]
        c_in = cfg.hidden
        for c in widths[1:]:
            layers += [ConvTranspose2d(c_in, c, 4, stride=2, padding=1), nn.ReLU()]
            c_in = c
        layers.append(ConvTranspose2d(c_in, 1, 4, stride=2, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, z):
        return self.net(z) + 0.5


def nearest_with_distance(flat: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(squared distance to, index of) the nearest row of codebook (K x D) for each row of flat (M x D).

    In fp32 even under autocast: bf16 rounding would flip the argmin between near-equal codes."""
    with torch.autocast(flat.device.type, enabled=False):
        flat, codes = flat.float(), codebook.float()
        # |x|^2 is the same for every code: leave it out of the M x K matrix, add it to the minimum only.
        partial, idx = torch.addmm(codes.pow(2).sum(1)[None], flat, codes.t(), alpha=-2).min(1)
        return partial + flat.pow(2).sum(1), idx


def nearest_code(flat: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    return nearest_with_distance(flat, codebook)[1]


class Quantized(NamedTuple):
    z_q: torch.Tensor        # N x D x h x w, straight-through: forward value is the code, gradient goes to z_e
    indices: torch.Tensor    # N x h x w
    loss: torch.Tensor       # beta * commitment (+ codebook loss in "loss" mode)


class VectorQuantizer(nn.Module):
    """Nearest-code quantizer with an EMA codebook (or the report's loss-trained one) and dead-code restarts.

    Distances are computed in fp32 even under autocast: bf16 rounding would flip the argmin between
    near-equal codes. The codebook is initialised from the first training batch's encoder outputs (the
    report's U(-1/K, 1/D) starts codes far from the data on one side, so many never get used). With
    `distributed` set (by the training loop, under torchrun), EMA statistics are all-reduced and restarts
    broadcast from rank 0, so every rank holds the same codebook; it is off otherwise, so that a quantizer
    used in train mode by one rank alone never waits for the others.
    """

    def __init__(self, num_codes: int, code_dim: int, beta: float = 0.25, mode: str = "ema",
                 decay: float = 0.99, dead_after: int = 100, eps: float = 1e-5):
        super().__init__()
        check_choice("model.codebook", mode)
        self.num_codes, self.code_dim, self.beta, self.mode = num_codes, code_dim, beta, mode
        self.decay, self.dead_after, self.eps = decay, dead_after, eps
        init = torch.randn(num_codes, code_dim) / math.sqrt(code_dim)
        if mode == "loss":
            self.codebook = nn.Parameter(init)
        else:
            self.register_buffer("codebook", init)
        self.register_buffer("ema_count", torch.ones(num_codes))
        self.register_buffer("ema_sum", init.clone())
        self.register_buffer("last_used", torch.zeros(num_codes, dtype=torch.long))
        self.register_buffer("usage", torch.zeros(num_codes, dtype=torch.long))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))
        self._ready = False
        self.distributed = False

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(t)
        return t

    def _broadcast(self, t: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.broadcast(t, src=0)
        return t

    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code for each row of flat (M x D), by squared distance in fp32."""
        return self.nearest_with_distance(flat)[1]

    def nearest_with_distance(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(squared distance to, index of) the nearest code for each row of flat."""
        return nearest_with_distance(flat, self.codebook)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """N x h x w indices -> N x D x h x w code map."""
        return F.embedding(indices, self.codebook).permute(0, 3, 1, 2)

    def forward(self, z_e: torch.Tensor) -> Quantized:
        n, d, h, w = z_e.shape
        flat = z_e.permute(0, 2, 3, 1).reshape(-1, d).float()
        if self.training:
            self._init_from(flat)
        with torch.no_grad():  # the indices need no gradient, and autograd need not keep the M x K matrix's inputs
            dist_sq, idx = self.nearest_with_distance(flat)
        z_q = self.codebook[idx].float()
        loss = self.beta * F.mse_loss(flat, z_q.detach())
        if self.mode == "loss":
            loss = loss + F.mse_loss(z_q, flat.detach())
        if self.training:
            self._update(flat.detach(), idx, dist_sq)
        # Straight-through: the forward value is exactly the code, the decoder's gradient goes to the encoder only.
        z_q = z_q.detach() + (flat - flat.detach())
        z_q = z_q.view(n, h, w, d).permute(0, 3, 1, 2).to(z_e.dtype)
        return Quantized(z_q, idx.view(n, h, w), loss)

    @torch.no_grad()
    def _init_from(self, flat: torch.Tensor) -> None:
        # A Python flag mirrors the buffer so that only the first step (or the first after loading) reads it.
        if self._ready or bool(self.initialised):
            self._ready = True
            return
        pick = torch.randint(len(flat), (self.num_codes,), device=flat.device)
        codes = self._broadcast(flat[pick].clone())
        self.codebook.data.copy_(codes)
        self.ema_sum.copy_(codes)
        self.ema_count.fill_(1.0)
        self.initialised.fill_(True)
        self._ready = True

    @torch.no_grad()
    def _update(self, flat: torch.Tensor, idx: torch.Tensor, dist_sq: torch.Tensor) -> None:
        counts = self._all_reduce(torch.bincount(idx, minlength=self.num_codes).float())
        self.steps += 1
        self.usage += counts.long()
        self.last_used.copy_(torch.where(counts > 0, self.steps, self.last_used))
        if self.mode == "ema":
            sums = self._all_reduce(torch.zeros_like(self.ema_sum).index_add_(0, idx, flat))
            self.ema_count.mul_(self.decay).add_(counts, alpha=1 - self.decay)
            self.ema_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
            total = self.ema_count.sum()
            # Laplace smoothing keeps a rarely chosen code from dividing by ~0.
            smoothed = (self.ema_count + self.eps) / (total + self.num_codes * self.eps) * total
            self.codebook.copy_(self.ema_sum / smoothed[:, None])
        self._restart_dead(flat, dist_sq)

    @torch.no_grad()
    def _restart_dead(self, flat: torch.Tensor, dist_sq: torch.Tensor) -> None:
        """Move codes unused for `dead_after` steps onto encoder outputs of this batch.

        Outputs are drawn in proportion to their distance from the codebook (as k-means++ seeds): uniform
        draws would mostly land on the black background, which already has its codes, and die again.
        A candidate is drawn for every code and kept only where the code is dead, so that the step needs
        no host sync to count the dead codes.
        """
        dead = ((self.steps - self.last_used) >= self.dead_after)[:, None]
        # nan_to_num: a diverging run must reach the training loop's NaN check, not fail in here.
        weights = torch.nan_to_num(dist_sq, nan=0.0, posinf=0.0).clamp_min(0) + 1e-12
        pick = torch.multinomial(weights, self.num_codes, replacement=True)
        fresh = self._broadcast(flat[pick].clone())
        self.codebook.data.copy_(torch.where(dead, fresh, self.codebook.data))
        self.ema_sum.copy_(torch.where(dead, fresh, self.ema_sum))
        self.ema_count.copy_(torch.where(dead[:, 0], 1.0, self.ema_count))
        self.last_used.copy_(torch.where(dead[:, 0], self.steps, self.last_used))


class VQVAE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.image_size % 2 ** cfg.downsamples:
            raise ValueError(f"image_size {cfg.image_size} is not divisible by 2**downsamples")
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quantizer = VectorQuantizer(cfg.num_codes, cfg.code_dim, cfg.beta, cfg.codebook,
                                         cfg.ema_decay, cfg.dead_after)
        self.decoder = Decoder(cfg)

    def forward(self, x: torch.Tensor):
        """x in [0, 1] -> (reconstruction, quantizer loss, index map)."""
        q = self.quantizer(self.encoder(x))
        return self.decoder(q.z_q), q.loss, q.indices

    @torch.no_grad()
    def encode_indices(self, x: torch.Tensor) -> torch.Tensor:
        z = self.encoder(x)
        n, d, h, w = z.shape
        return self.quantizer.nearest(z.permute(0, 2, 3, 1).reshape(-1, d)).view(n, h, w)

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.quantizer.lookup(indices))


# ---------------------------------------------------------------- DCGAN over code maps

def _upsamplings(latent_size: int) -> int:
    steps = int(math.log2(latent_size)) - 2
    if latent_size < 4 or 2 ** (steps + 2) != latent_size:
        raise ValueError(f"the GAN needs a power-of-two latent grid of at least 4, not {latent_size}")
    return steps


class Generator(nn.Module):
    """Noise (N x nz) -> 4x4 -> ... -> latent grid, with `out_channels` maps (D for "snap", K for "logits")."""

    def __init__(self, cfg: GANConfig, latent_size: int, out_channels: int):
        super().__init__()
        c = cfg.g_width
        layers = [nn.ConvTranspose2d(cfg.noise_dim, c, 4, 1, 0, bias=False), nn.BatchNorm2d(c), nn.ReLU(True)]
        for _ in range(_upsamplings(latent_size) - 1):
            c_out = max(c // 2, 32)
            layers += [nn.ConvTranspose2d(c, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(True)]
            c = c_out
        # No tanh: snapped outputs must be able to reach every code, whatever the codebook's range.
        if _upsamplings(latent_size):
            layers.append(ConvTranspose2d(c, out_channels, 4, 2, 1))
        else:
            layers.append(nn.Conv2d(c, out_channels, 3, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, noise: torch.Tensor) -> torch.Tensor:
        return self.net(noise[:, :, None, None])


class MinibatchStd(nn.Module):
    """Appends one channel: the mean over features of their std within groups of `group` maps (Karras et al.
    2018). A critic that sees how varied a batch is can punish a generator that makes one map again and again."""

    def __init__(self, group: int = 4):
        super().__init__()
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        g = self.group if n % self.group == 0 else 1
        if g == 1:
            return torch.cat([x, x.new_zeros(n, 1, h, w)], 1)
        std = (x.view(g, n // g, c, h, w).float().var(0, unbiased=False) + 1e-8).sqrt().mean((1, 2, 3))
        return torch.cat([x, std.to(x.dtype).view(1, n // g, 1, 1, 1).expand(g, -1, 1, h, w).reshape(n, 1, h, w)], 1)


class Discriminator(nn.Module):
    """Code map -> one score per map (a logit or a critic estimate: the loss decides).

    norm: "batch" (the report's), "spectral" (spectral normalisation of every conv), or "none" (what a gradient
    penalty needs: BatchNorm couples the maps that the penalty treats one by one). minibatch_std appends the
    batch's spread before the last conv."""

    def __init__(self, cfg: GANConfig, latent_size: int, in_channels: int):
        super().__init__()
        check_choice("gan.critic_norm", cfg.critic_norm)
        c = cfg.d_width
        sn = nn.utils.parametrizations.spectral_norm if cfg.critic_norm == "spectral" else (lambda layer: layer)
        norm = nn.BatchNorm2d if cfg.critic_norm == "batch" else (lambda ch: nn.Identity())
        layers = [sn(nn.Conv2d(in_channels, c, 4, 2, 1)), nn.LeakyReLU(0.2, True)]  # no norm on the first layer
        for _ in range(_upsamplings(latent_size) - 1):
            layers += [sn(nn.Conv2d(c, c * 2, 4, 2, 1, bias=cfg.critic_norm != "batch")), norm(c * 2),
                       nn.LeakyReLU(0.2, True)]
            c *= 2
        if cfg.minibatch_std:
            layers.append(MinibatchStd())
        size = 4 if _upsamplings(latent_size) else 2
        layers.append(sn(nn.Conv2d(c + cfg.minibatch_std, 1, size, 1, 0)))
        self.net = nn.Sequential(*layers)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        return self.net(maps).flatten()


class CodeGenerator(nn.Module):
    """A Generator whose output is always an exact codebook map, with gradients for training.

    "snap" (the report's): a continuous D-channel map snapped to the nearest code, straight-through.
    "logits": K logits per position; forward the code of the argmax, backward the gradient of the softmax's
    mixture of codes (straight-through), so a critic never sees a map that is not made of codebook vectors.
    It keeps a copy of the frozen VQ-VAE's codebook (K x D, small), so that it samples from its checkpoint alone.
    """

    def __init__(self, cfg: GANConfig, model_cfg: ModelConfig):
        super().__init__()
        cfg.check()
        self.head, self.noise_dim = cfg.head, cfg.noise_dim
        self.continuous = cfg.target == "encoder"  # trains on unsnapped maps, like the encoder's outputs
        out = model_cfg.code_dim if cfg.head == "snap" else model_cfg.num_codes
        self.net = Generator(cfg, model_cfg.latent_size, out)
        self.register_buffer("codebook", torch.zeros(model_cfg.num_codes, model_cfg.code_dim))

    def forward(self, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (code map N x D x h x w made of exact codebook vectors, index map N x h x w); a generator of
        continuous maps (target "encoder") in training mode returns its map unsnapped, for the critic."""
        out = self.net(noise).float()
        codebook = self.codebook.float()
        if self.head == "snap":
            n, d, h, w = out.shape
            flat = out.permute(0, 2, 3, 1).reshape(-1, d)
            idx = nearest_code(flat, codebook)
            if self.continuous and self.training:
                return out, idx.view(n, h, w)
            snapped = codebook[idx] + (flat - flat.detach())  # exact codes forward, gradients to G
            return snapped.view(n, h, w, d).permute(0, 3, 1, 2), idx.view(n, h, w)
        logits = out.permute(0, 2, 3, 1)  # N h w K: softmax and argmax over the contiguous last dim
        idx = logits.argmax(-1)
        hard = F.embedding(idx, codebook)
        if self.training:
            soft = logits.softmax(-1) @ codebook
            hard = hard + (soft - soft.detach())  # exactly the codes forward
        return hard.permute(0, 3, 1, 2), idx

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, device=None,
               temperature: float = 1.0) -> torch.Tensor:
        """n index maps from noise drawn on the CPU by `generator`: a seed gives the same maps on any device.
        The noise is scaled by `temperature`, so one seed's maps at lower temperatures lie between the same
        draws and the generator's map for zero noise."""
        device = torch.device(device) if device is not None else self.codebook.device
        noise = temperature * torch.randn(n, self.noise_dim, generator=generator).to(device)
        was_training = self.training
        self.eval()
        try:
            return self(noise)[1]
        finally:
            self.train(was_training)


# ---------------------------------------------------------------- gated PixelCNN prior over index maps

def _gate(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


class GatedLayer(nn.Module):
    """One gated layer of van den Oord et al. (2016), made of plain convs on padded inputs.

    The vertical conv sees rows i - k//2 .. i of its input and the horizontal conv columns j - k//2 .. j.
    `PixelCNN` shifts its embedded input once, down for the vertical stack and right for the horizontal
    one, so every position sees only earlier ones without masked weights, and without a blind spot.
    """

    def __init__(self, channels: int, kernel: int):
        super().__init__()
        self.pad = kernel // 2
        self.v_conv = nn.Conv2d(channels, 2 * channels, (self.pad + 1, kernel))
        self.h_conv = nn.Conv2d(channels, 2 * channels, (1, self.pad + 1))
        self.v_to_h = nn.Conv2d(2 * channels, 2 * channels, 1)
        self.h_out = nn.Conv2d(channels, channels, 1)

    def vertical(self, v: torch.Tensor, pad_top: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (pre-activation, for the link into the horizontal stack; the next layer's vertical input).
        pad_top=False: v already starts `pad` rows above the first output row (sampling's cached rows)."""
        pre = self.v_conv(F.pad(v, (self.pad, self.pad, self.pad if pad_top else 0, 0)))
        return pre, _gate(pre)

    def horizontal(self, h: torch.Tensor, link: torch.Tensor, pad_left: bool = True) -> torch.Tensor:
        out = self.h_out(_gate(self.h_conv(F.pad(h, (self.pad if pad_left else 0, 0))) + link))
        return h[..., h.shape[-1] - out.shape[-1]:] + out


def draw_codes(logits: torch.Tensor, u: torch.Tensor, temperature: float = 1.0, top_k: int = 0) -> torch.Tensor:
    """Inverse-CDF draw from softmax(logits / temperature) (N x K) with one uniform per row (N): the uniforms
    can come from any generator, so a seed gives the same maps on every device. top_k > 0 keeps the k likeliest."""
    logits = logits.float() / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    cdf = logits.softmax(-1).cumsum(-1)
    return (cdf <= u[:, None].to(cdf) * cdf[:, -1:]).sum(-1).clamp_(max=logits.shape[-1] - 1)


class PixelCNN(nn.Module):
    """Gated PixelCNN over N x h x w index maps (no class conditioning) -> N x K x h x w logits.

    Logits at (i, j) depend only on positions before (i, j) in raster order. The first layer has a 7-wide
    kernel, the rest 3-wide, so a position sees `reach` rows up and as many columns left and right; a
    learned position map added to the code embeddings tells it where on the grid it is.
    """

    def __init__(self, cfg: PixelCNNConfig, model_cfg: ModelConfig):
        super().__init__()
        c, self.num_codes, self.size = cfg.hidden, model_cfg.num_codes, model_cfg.latent_size
        kernels = [7] + [3] * (cfg.layers - 1)
        self.embed = nn.Embedding(self.num_codes, c)
        self.layers = nn.ModuleList(GatedLayer(c, k) for k in kernels)
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(c, c, 1), nn.ReLU(), nn.Conv2d(c, self.num_codes, 1))
        self.reach = 1 + sum(k // 2 for k in kernels)  # the input shift, then each layer's k//2
        # Where a code sits says much about it (brains are centred, borders are background), and a model
        # that sees only `reach` codes around it cannot tell: without this map, samples grew stray partial
        # brains at the bottom of the grid. Added to the input, it is shifted with it, so stays causal.
        self.pos = nn.Parameter(torch.zeros(1, c, self.size, self.size))

    def embedding(self, idx: torch.Tensor, rows: slice = slice(None), cols: slice = slice(None)) -> torch.Tensor:
        """Embeddings of idx, the codes at grid rows x cols: N x C x h x w, channels_last in memory."""
        return self.embed(idx.long()).permute(0, 3, 1, 2) + self.pos[:, :, rows, cols]

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embedding(idx)
        v, h = F.pad(x, (0, 0, 1, -1)), F.pad(x, (1, -1))  # the one shift that makes both stacks causal
        for layer in self.layers:
            pre, v = layer.vertical(v)
            h = layer.horizontal(h, layer.v_to_h(pre))
        return self.head(h)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, temperature: float = 1.0, top_k: int = 0,
               device=None) -> torch.Tensor:
        """n index maps by ancestral sampling in raster order, with the same logits as `forward`.

        Rerunning the network per position would cost h*w full forwards. Instead each layer keeps the few
        input rows (vertical stack) and columns (horizontal stack) its kernel needs, and computes one new
        row per image row and one new column per position: about one forward's work in all. Uniforms come
        from `generator` (CPU or device), so a seed gives the same maps. `device` defaults to the model's."""
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, not {temperature}; top_k=1 gives the likeliest codes")
        device = torch.device(device) if device is not None else self.embed.weight.device
        was_training, threads = self.training, torch.get_num_threads()
        self.eval()
        if device.type == "cpu":  # each step's tensors are tiny: a second thread has no work to share, only
            torch.set_num_threads(1)  # a wake-up to wait for, per op (long where other jobs hold the cores)
        try:
            return self._sample(n, generator, temperature, top_k, device)
        finally:
            torch.set_num_threads(threads)
            self.train(was_training)

    def _sample(self, n, generator, temperature, top_k, device) -> torch.Tensor:
        s, c = self.size, self.embed.embedding_dim
        u = torch.rand(n, s, s, generator=generator,
                       device=generator.device if generator is not None else "cpu").to(device)
        idx = torch.zeros(n, s, s, dtype=torch.long, device=device)
        zero = torch.zeros(n, c, 1, 1, device=device)
        rows = [zero.expand(n, c, layer.pad + 1, s) for layer in self.layers]  # zeros stand for the padding
        for r in range(s):
            v = self.embedding(idx[:, r - 1:r], slice(r - 1, r)) if r else zero.expand(n, c, 1, s)
            links = []
            for i, layer in enumerate(self.layers):
                rows[i] = torch.cat([rows[i][:, :, 1:], v.to(rows[i].dtype)], 2)
                pre, v = layer.vertical(rows[i], pad_top=False)
                links.append(layer.v_to_h(pre))
            cols = [zero.expand(n, c, 1, layer.pad + 1) for layer in self.layers]
            for j in range(s):
                h = self.embedding(idx[:, r:r + 1, j - 1:j], slice(r, r + 1), slice(j - 1, j)) if j else zero
                for i, layer in enumerate(self.layers):
                    cols[i] = torch.cat([cols[i][..., 1:], h.to(cols[i].dtype)], 3)
                    h = layer.horizontal(cols[i], links[i][..., j:j + 1], pad_left=False)
                idx[:, r, j] = draw_codes(self.head(h)[:, :, 0, 0], u[:, r, j], temperature, top_k)
        return idx


# ---------------------------------------------------------------- priors by name

PRIOR_MODELS = {"gan": CodeGenerator, "pixelcnn": PixelCNN, "maskgit": MaskGITPrior}


def build_prior(name: str, cfg: Config) -> nn.Module:
    """The prior `name` (one of config.PRIORS), built from its own config section and the VQ-VAE's.
    Every prior has `sample(n, generator, device, **settings) -> N x h x w index maps`."""
    return PRIOR_MODELS[name](getattr(cfg, name), cfg.model)
