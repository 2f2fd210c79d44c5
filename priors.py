"""MaskGIT over code maps: a bidirectional transformer that fills in masked codes, and decodes a new map in a
few parallel refinement steps (Chang et al. 2022). Torch only, no I/O; built by `modules.build_prior`.

Tokens are p x p patches of codes (p = latent size / `tokens`: 2x2 codes at the quick 32x32 grid, 4x4 at the
paper's 64x64), so attention runs over `tokens`^2 positions whatever the grid: every code sees the whole map,
which is what a prior needs for global anatomy (symmetry, ventricles in the middle), at a cost a CPU affords.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from config import MaskGITConfig, ModelConfig, check_choice


def cosine_mask_ratio(r: torch.Tensor) -> torch.Tensor:
    """Fraction of tokens masked at schedule position r in [0, 1]: 1 at r = 0, 0 at r = 1."""
    return torch.cos(r * math.pi / 2)


class Block(nn.Module):
    def __init__(self, d: int, heads: int, mlp_ratio: int, dropout: float, grid: int = 0):
        super().__init__()
        self.grid = grid  # > 0: token grid side, for the depthwise conv in the MLP
        self.dw = nn.Conv2d(mlp_ratio * d, mlp_ratio * d, 3, padding=1, groups=mlp_ratio * d) if grid else None
        self.heads, self.dropout = heads, dropout
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, mlp_ratio * d), nn.GELU(), nn.Linear(mlp_ratio * d, d))
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        n, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(n, t, d)))
        if self.dw is None:
            return x + self.drop(self.mlp(self.ln2(x)))
        h = self.mlp[0](self.ln2(x))
        g = self.grid
        h = h + self.dw(h.transpose(1, 2).reshape(n, -1, g, g)).flatten(2).transpose(1, 2)
        return x + self.drop(self.mlp[2](self.mlp[1](h)))


class MaskGITPrior(nn.Module):
    """Bidirectional masked-token transformer over p x p patches of codes (one token per patch).

    A token's embedding is the sum of one learned embedding per (sub-position, code) pair, plus a learned
    position embedding; a masked token is a learned vector (plus position). The head predicts K logits for each
    of a token's p*p codes. The whole patch is masked or visible together, so the trunk never sees any code of
    a token it must predict. With `head="sequential"` the head reads a token's codes in raster order: the
    logits of code j also see codes 0..j-1 of the same token (the true ones in training, the drawn ones when
    sampling), so the p*p codes of a token are drawn jointly, not each on its own ("independent", the first
    version's head, whose independently drawn neighbours disagree: speckle).
    """

    def __init__(self, cfg: MaskGITConfig, model_cfg: ModelConfig):
        super().__init__()
        num_codes, latent_size = model_cfg.num_codes, model_cfg.latent_size
        if latent_size % cfg.tokens:
            raise ValueError(f"latent size {latent_size} not divisible by token grid {cfg.tokens}")
        self.cfg, self.num_codes, self.size = cfg, num_codes, latent_size
        self.patch = latent_size // cfg.tokens
        self.n_tok, pp, d = cfg.tokens ** 2, self.patch ** 2, cfg.hidden
        self.embed = nn.Embedding(pp * num_codes, d)
        self.register_buffer("offsets", torch.arange(pp) * num_codes, persistent=False)
        self.mask_emb = nn.Parameter(torch.zeros(d))
        self.pos = nn.Parameter(torch.zeros(1, self.n_tok, d))
        nn.init.normal_(self.pos, std=0.02)
        nn.init.normal_(self.embed.weight, std=0.02 / math.sqrt(pp) * 4)
        nn.init.normal_(self.mask_emb, std=0.02)
        self.drop = nn.Dropout(cfg.dropout)
        grid = cfg.tokens if cfg.conv_mlp else 0
        self.blocks = nn.ModuleList(Block(d, cfg.heads, cfg.mlp_ratio, cfg.dropout, grid) for _ in range(cfg.layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, pp * num_codes)  # read as pp x K x d: one K-way classifier per sub-position
        self.context = self.mix = None
        if cfg.head == "sequential":
            self.context = nn.Embedding(pp * num_codes, d)  # code c at sub-position i, seen by later sub-positions
            nn.init.normal_(self.context.weight, std=0.02)
            self.mix = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d), nn.GELU(), nn.Linear(d, d))
            nn.init.zeros_(self.mix[-1].weight)  # starts as the independent head plus an additive context
            nn.init.zeros_(self.mix[-1].bias)
        else:
            check_choice("maskgit.head", cfg.head)

    # maps <-> tokens
    def to_tokens(self, idx: torch.Tensor) -> torch.Tensor:
        """N x h x w -> N x T x p*p (row-major tokens, row-major codes inside a token)."""
        n, p, t = idx.shape[0], self.patch, self.cfg.tokens
        return idx.view(n, t, p, t, p).permute(0, 1, 3, 2, 4).reshape(n, t * t, p * p)

    def to_map(self, tok: torch.Tensor) -> torch.Tensor:
        n, p, t = tok.shape[0], self.patch, self.cfg.tokens
        return tok.view(n, t, t, p, p).permute(0, 1, 3, 2, 4).reshape(n, t * p, t * p)

    def trunk(self, tok: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """tok: N x T x pp codes (values under mask are ignored), mask: N x T bool -> N x T x d features."""
        x = self.embed(tok.long() + self.offsets).sum(2)
        # torch.where, not multiplication: a masked token's input is exactly the mask vector, whatever its codes
        x = torch.where(mask[..., None], self.mask_emb.to(x.dtype).expand_as(x), x)
        x = self.drop(x + self.pos)
        for b in self.blocks:
            x = b(x)
        return self.ln(x)

    def forward(self, tok: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """-> N x T x pp x K logits (a sequential head reads each token's own earlier codes from `tok`)."""
        return self.logits(self.trunk(tok, mask), tok)

    def logits(self, x: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
        """x: ... x d token features, tok: ... x pp their codes -> ... x pp x K."""
        pp, k = self.patch ** 2, self.num_codes
        if self.context is None:
            return self.head(x).view(*x.shape[:-1], pp, k)
        e = self.context(tok.long() + self.offsets)
        # code j sees the sum of codes 0..j-1's context embeddings (an exclusive cumulative sum: 0 for code 0)
        h = x[..., None, :] + F.pad(e[..., :-1, :].cumsum(-2), (0, 0, 1, 0))
        return self.read(h + self.mix(h), slice(None))

    def read(self, h: torch.Tensor, j) -> torch.Tensor:
        """Sub-position j's (a slice: every sub-position's) K logits from features h."""
        w = self.head.weight.view(self.patch ** 2, self.num_codes, -1)[j]
        b = self.head.bias.view(self.patch ** 2, self.num_codes)[j]
        return torch.einsum("...d,kd->...k" if isinstance(j, int) else "...pd,pkd->...pk", h, w.to(h.dtype)) \
            + b.to(h.dtype)

    def random_masks(self, idx: torch.Tensor, generator: torch.Generator | None = None):
        """(tokens N x T x pp, mask N x T): per map a fraction cos(pi/2 r), r ~ U(0, 1), of whole tokens masked."""
        tok = self.to_tokens(idx.long())
        n, t = tok.shape[:2]
        r = torch.rand(n, generator=generator, device=tok.device)
        n_mask = (cosine_mask_ratio(r) * t).ceil().clamp(1, t)
        rank = torch.rand(n, t, generator=generator, device=tok.device).argsort(1).argsort(1)
        return tok, rank < n_mask[:, None]

    def masked_loss(self, logits: torch.Tensor, tok: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Cross-entropy on the masked codes only: the visible ones are given, not predicted."""
        return F.cross_entropy(logits[mask].float().reshape(-1, self.num_codes), tok[mask].reshape(-1),
                               label_smoothing=self.cfg.label_smoothing)

    def loss(self, idx: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        tok, mask = self.random_masks(idx, generator)
        return self.masked_loss(self(tok, mask), tok, mask)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, steps: int | None = None,
               temperature: float | None = None, choice_temperature: float | None = None, top_k: int | None = None,
               order: str | None = None, device=None, chunk: int = 16) -> torch.Tensor:
        """n maps by iterative decoding; all randomness from `generator` (CPU), so a seed fixes the maps.

        Each step draws every masked token and keeps as many as the cosine schedule says. `order` picks which:
        "confidence" (the MaskGIT paper's) keeps the likeliest draws, with Gumbel noise of `choice_temperature`
        on their log-probabilities; "random" keeps a uniformly random subset, and draws each code from the
        model's estimate of the data's conditional, its output with label smoothing's floor removed
        (`unsmoothed`). With enough steps that few tokens are drawn together, random order approaches exact
        sampling from the model's joint, where confidence order is greedy: it would keep the likely codes
        first, so with the floor removed it flattens textures, and with the floor kept its last steps keep
        the floor's stray codes."""
        c = self.cfg
        steps = steps or c.steps
        temperature = c.temperature if temperature is None else temperature
        choice_temperature = c.choice_temperature if choice_temperature is None else choice_temperature
        top_k = c.top_k if top_k is None else top_k
        order = order or c.order
        check_choice("maskgit.order", order)
        floor = self.cfg.label_smoothing if order == "random" else 0.0
        device = torch.device(device) if device is not None else self.pos.device
        was_training = self.training
        self.eval()
        try:
            t, pp = self.n_tok, self.patch ** 2
            tok = torch.zeros(n, t, pp, dtype=torch.long, device=device)
            mask = torch.ones(n, t, dtype=torch.bool, device=device)
            for s in range(steps):
                u = torch.rand(n, t, pp, generator=generator).to(device)
                draw = tok.clone()
                conf = torch.full((n, t), float("inf"), device=device)  # fixed tokens are never re-masked
                for a in range(0, n, chunk):  # bounded memory at the paper grid; the head runs on masked tokens only
                    b = slice(a, a + chunk)
                    m = mask[b]
                    d, logp = self.draw_tokens(self.trunk(tok[b], m)[m], u[b][m], temperature, top_k, floor)
                    draw[b] = draw[b].masked_scatter(m[..., None].expand(-1, -1, pp), d)
                    conf[b] = conf[b].masked_scatter(m, logp)
                tok = torch.where(mask[..., None], draw, tok)
                n_next = int(math.floor(float(cosine_mask_ratio(torch.tensor((s + 1) / steps))) * t))
                if s == steps - 1 or n_next == 0:
                    mask = torch.zeros_like(mask)
                    break
                g = torch.rand(n, t, generator=generator).clamp_(1e-20, 1).to(device)
                if order == "random":  # fixed tokens (conf inf) last, the masked ones in a random order
                    noisy = torch.where(torch.isinf(conf), conf, g)
                else:
                    noisy = conf - choice_temperature * (1 - (s + 1) / steps) * torch.log(-torch.log(g))
                mask = torch.zeros_like(mask).scatter_(1, noisy.argsort(1)[:, :n_next], True)
            return self.to_map(tok)
        finally:
            self.train(was_training)

    def draw_tokens(self, x: torch.Tensor, u: torch.Tensor, temperature: float, top_k: int, floor: float = 0.0):
        """Codes M x pp for M token features x (M x d), inverse-CDF draws from uniforms u (M x pp), and each
        token's log-probability (M). A sequential head draws a token's codes in order, each seeing those before;
        the independent head draws them all at once. floor > 0: draw from `unsmoothed(logits, floor)`."""
        m, pp = x.shape[0], self.patch ** 2
        if self.context is None:
            logits = unsmoothed(self.logits(x, None).float().view(m * pp, -1), floor)
            d, logp = draw(logits / temperature, u.reshape(-1), top_k)
            return d.view(m, pp), logp.view(m, pp).sum(1)
        codes, total, ctx = [], 0.0, torch.zeros_like(x)
        for j in range(pp):
            h = x + ctx
            d, logp = draw(unsmoothed(self.read(h + self.mix(h), j).float(), floor) / temperature, u[:, j], top_k)
            codes.append(d)
            total = total + logp
            ctx = ctx + self.context(d + self.offsets[j]).to(x.dtype)
        return torch.stack(codes, 1), total


def unsmoothed(logits: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Log-probabilities of the distribution p that a model trained with label smoothing `smoothing` estimates,
    from its logits (... x K): cross-entropy against (1 - s) one-hot + s / K is minimised by predicting
    q = (1 - s) p + s / K, so p is q less the floor s / K, renormalised. A code the model gives no more than
    the floor gets probability 0: it is the smoothing's, not the data's. smoothing 0: the logits unchanged."""
    if smoothing <= 0:
        return logits
    q = logits.softmax(-1) - smoothing / logits.shape[-1]
    return q.clamp_min(0).log()  # the likeliest code always keeps q > 0 (its q >= 1 / K > s / K)


def draw(logits: torch.Tensor, u: torch.Tensor, top_k: int):
    """One code per row of logits (M x K) by inverse CDF at the uniforms u (M), and its log-probability."""
    k = logits.shape[-1]
    if top_k:
        kth = logits.topk(min(top_k, k), -1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    logp = logits.log_softmax(-1)
    cdf = logp.exp().cumsum(-1)
    d = (cdf <= u[:, None] * cdf[:, -1:]).sum(-1).clamp_(max=k - 1)  # <=: a code of probability 0 is never drawn
    return d, logp.gather(-1, d[:, None])[:, 0]
