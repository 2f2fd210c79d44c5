"""What a GAN over code maps needs besides its networks: objectives, R1 and gradient penalties, DiffAugment and
the generator's moving average. Tensors in, tensors out; train.GANStage puts them together into one step.

Why these: real code maps are exact codebook vectors, so a critic can separate them from anything a generator
makes and win within a few dozen steps (the report's BCE GAN collapses to one map). A hinge or Wasserstein
objective keeps the generator's gradient alive where BCE saturates; a penalty on the critic's input gradient
(R1 on reals, or WGAN-GP between real and fake) keeps the critic smooth; augmenting real and fake maps alike
(DiffAugment) keeps a critic trained on a few thousand maps from memorising them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from config import CHOICES

LOSSES = CHOICES["gan.loss"]


def critic_loss(kind: str, d_real: torch.Tensor, d_fake: torch.Tensor, real_label: float = 1.0) -> torch.Tensor:
    """The critic's loss on its scores (logits) for a real and a fake batch."""
    if kind == "bce":
        return (F.binary_cross_entropy_with_logits(d_real, torch.full_like(d_real, real_label))
                + F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake)))
    if kind == "hinge":
        return F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()
    if kind == "wgan":
        # The small drift term keeps the critic's offset from wandering (Karras et al. 2018).
        return d_fake.mean() - d_real.mean() + 1e-3 * d_real.pow(2).mean()
    raise ValueError(f"GAN loss must be one of {', '.join(LOSSES)}, not {kind!r}")


def generator_loss(kind: str, d_gen: torch.Tensor) -> torch.Tensor:
    """The generator's loss on the critic's scores for its maps (non-saturating for BCE)."""
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(d_gen, torch.ones_like(d_gen))
    if kind in ("hinge", "wgan"):
        return -d_gen.mean()
    raise ValueError(f"GAN loss must be one of {', '.join(LOSSES)}, not {kind!r}")


def critic_scores(kind: str, scores: torch.Tensor) -> torch.Tensor:
    """What a GAN user reads for D(real)/D(fake): probabilities for BCE, the raw critic estimate otherwise."""
    return torch.sigmoid(scores) if kind == "bce" else scores


def r1_penalty(critic, real: torch.Tensor) -> torch.Tensor:
    """R1 (Mescheder et al. 2018): E ||grad_x critic(x)||^2 over the real batch x, unweighted (the loss term is
    gamma / 2 times this). With a graph to the critic's parameters. Summing the scores before differentiating
    gives each map its own gradient because maps do not interact in the critic (a minibatch-std layer adds a
    small cross-map term, as in StyleGAN2)."""
    x = real.detach().float().requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(x).float().sum(), x, create_graph=True)
    return grad.flatten(1).pow(2).sum(1).mean()


def gradient_penalty(critic, real: torch.Tensor, fake: torch.Tensor, alpha: torch.Tensor | None = None,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """WGAN-GP (Gulrajani et al. 2017): E (||grad_x critic(x)|| - 1)^2 at x = alpha real + (1 - alpha) fake,
    one alpha ~ U(0, 1) per map unless given, unweighted (the usual weight is 10)."""
    n = real.shape[0]
    if alpha is None:
        alpha = torch.rand(n, generator=generator).to(real.device)
    alpha = alpha.to(real.device, torch.float32).view(n, *([1] * (real.dim() - 1)))
    x = (alpha * real.detach().float() + (1 - alpha) * fake.detach().float()).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(x).float().sum(), x, create_graph=True)
    return (grad.flatten(1).norm(2, dim=1) - 1).pow(2).mean()


def diff_augment(x: torch.Tensor, policy: str) -> torch.Tensor:
    """DiffAugment (Zhao et al. 2020) on maps N x C x h x w, differentiable in x, each map drawn on its own.
    "translation": shift by up to h/8 cells, border cells repeated (brains sit on background);
    "cutout": zero one square of side h/4 at a random place. Comma-separated; "" does nothing."""
    for name in filter(None, policy.split(",")):
        if name == "translation":
            x = _translate(x, max(x.shape[-1] // 8, 1))
        elif name == "cutout":
            x = _cutout(x, max(x.shape[-1] // 4, 1))
        else:
            raise ValueError(f"unknown GAN augmentation {name!r}: use translation, cutout or both")
    return x


def _translate(x: torch.Tensor, reach: int) -> torch.Tensor:
    n, c, h, w = x.shape
    dy, dx = torch.randint(-reach, reach + 1, (2, n, 1), device=x.device)
    rows = (torch.arange(h, device=x.device) + dy).clamp(0, h - 1)  # n x h
    cols = (torch.arange(w, device=x.device) + dx).clamp(0, w - 1)  # n x w
    x = x.gather(2, rows[:, None, :, None].expand(n, c, h, w))
    return x.gather(3, cols[:, None, None, :].expand(n, c, h, w))


def _cutout(x: torch.Tensor, side: int) -> torch.Tensor:
    n, _, h, w = x.shape
    cy, cx = torch.randint(0, h, (n, 1, 1), device=x.device), torch.randint(0, w, (n, 1, 1), device=x.device)
    yy, xx = torch.arange(h, device=x.device)[:, None], torch.arange(w, device=x.device)[None, :]
    keep = ((yy - cy).abs() > side // 2) | ((xx - cx).abs() > side // 2)
    return x * keep[:, None].to(x.dtype)


@torch.no_grad()
def update_ema(average: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """average <- decay * average + (1 - decay) * model for parameters; buffers (BatchNorm statistics) copied."""
    for pa, p in zip(average.parameters(), model.parameters()):
        pa.lerp_(p, 1 - decay)
    for ba, b in zip(average.buffers(), model.buffers()):
        ba.copy_(b)


def ema_decay(decay: float, updates: int) -> float:
    """The decay after `updates` generator steps, warmed up as (1 + t) / (10 + t): early on the average would
    otherwise hold mostly the random initial weights."""
    return min(decay, (1 + updates) / (10 + updates))
