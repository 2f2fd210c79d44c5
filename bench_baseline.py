"""bench.py's baseline: the training pipeline written the report's way, measured in a fresh process.

Data: a torch Dataset that decodes one PNG per item with skimage.io.imread (skimage.transform.resize only when
the size differs), in a DataLoader with num_workers=0. Model: the project's Encoder and Decoder (with torch's own
ConvTranspose2d) around the report's dense one-hot quantizer, fp32, contiguous, plain Adam, loss.item() per step.

bench.py runs `measure` in a spawned process, so that none of its own settings (cudnn.benchmark and TF32 on
CUDA, glibc's malloc tuning from runs.keep_freed_host_memory on CPU) apply here: PyTorch's defaults as they come.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import config
from dataset import list_pngs
from modules import ConvTranspose2d, Decoder, Encoder, Quantized


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


def endless(loader):
    """The loader's batches, epoch after epoch."""
    while True:
        yield from loader


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


def measure(cfg: config.Config, device, train_folder, steps: int, items: int) -> dict:
    """The baseline's figures, as bench_preset's baseline_* keys: data (about `items` images through the
    DataLoader), step (`steps` steps on one batch), end to end (`steps` steps on fresh DataLoader batches) and
    the peak memory of the step."""
    # bench imports this module, so its measuring tools are imported here, once both modules are loaded.
    from bench import PeakMemory, rate

    bs = cfg.train.batch_size
    batches = endless(baseline_loader(train_folder, cfg.model.image_size, bs, cfg.seed))
    out = {"baseline_data_img_s": rate(lambda: next(batches).to(device), device, steps=-(-items // bs), items=bs,
                                       warmup=1)}
    model = BaselineVQVAE(cfg.model).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    x = next(batches).to(device)
    with PeakMemory(device) as mem:
        out["baseline_step_img_s"] = rate(lambda: baseline_step(model, opt, x), device, steps=steps, items=bs,
                                          warmup=1)
    out["baseline_peak_mem_mb"] = mem.mb
    out["baseline_end_to_end_img_s"] = rate(lambda: baseline_step(model, opt, next(batches).to(device)), device,
                                            steps=steps, items=bs)
    return out
