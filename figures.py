"""Figures: every plot the project draws, from tensors and histories. The only module that imports matplotlib."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torchvision.utils import make_grid  # noqa: E402

DARK = {"figure.facecolor": "black", "axes.facecolor": "black", "text.color": "white",
        "axes.labelcolor": "white", "xtick.color": "white", "ytick.color": "white", "axes.edgecolor": "gray"}


def grid(images: torch.Tensor, nrow: int = 8, pad: int = 2) -> torch.Tensor:
    """N x 1 x H x W in [0, 1] -> one 1 x H' x W' image, tiles separated by black lines (for TensorBoard too)."""
    images = images.detach().float().clamp(0, 1).cpu()
    return make_grid(images, nrow=min(nrow, len(images)), padding=pad)[:1]


def index_map_rgb(indices: torch.Tensor, num_codes: int) -> np.ndarray:
    """h x w code indices -> h x w x 3 uint8 colours; neighbouring codes get distant colours."""
    cmap = plt.get_cmap("hsv", num_codes)
    perm = np.random.default_rng(0).permutation(num_codes)  # fixed: colours mean the same in every figure
    return (cmap(perm[indices.cpu().numpy()])[..., :3] * 255).astype(np.uint8)


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=fig.dpi, bbox_inches="tight", facecolor=fig.get_facecolor())
    plt.close(fig)
    return path


def _image_axes(ax, image, title=None, **kw):
    if torch.is_tensor(image):
        image = image.detach().float().cpu().numpy()
    ax.imshow(image, cmap=kw.pop("cmap", "gray"), vmin=kw.pop("vmin", 0), vmax=kw.pop("vmax", 1),
              interpolation="nearest", **kw)
    ax.set_xticks([]), ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=10)


def save_montage(images: torch.Tensor, path, title: str = "", nrow: int = 8) -> Path:
    with plt.rc_context(DARK):
        g = grid(images, nrow)[0]
        fig, ax = plt.subplots(figsize=(min(16, g.shape[1] / 60 + 1), g.shape[0] / 60 + 0.6), dpi=100)
        _image_axes(ax, g, title)
        return _save(fig, path)


def save_reconstructions(originals: torch.Tensor, recons: torch.Tensor, path, title: str = "") -> Path:
    """Originals (top row) over reconstructions (middle) and the absolute error (bottom)."""
    n = len(originals)
    with plt.rc_context(DARK):
        fig, axes = plt.subplots(3, n, figsize=(1.6 * n, 5.2), dpi=100, squeeze=False)
        err = (originals.float() - recons.float().clamp(0, 1)).abs()
        for i in range(n):
            _image_axes(axes[0, i], originals[i, 0].cpu())
            _image_axes(axes[1, i], recons[i, 0].clamp(0, 1).cpu())
            _image_axes(axes[2, i], err[i, 0].cpu(), cmap="magma", vmax=0.25)
        for row, label in enumerate(["original", "reconstruction", "|error| (0-0.25)"]):
            axes[row, 0].set_ylabel(label, fontsize=9)
        fig.suptitle(title, fontsize=11)
        return _save(fig, path)


def save_code_map(image: torch.Tensor, indices: torch.Tensor, num_codes: int, path, title: str = "") -> Path:
    """A slice beside its code-index map (one colour per code)."""
    with plt.rc_context(DARK):
        fig, axes = plt.subplots(1, 2, figsize=(7, 3.8), dpi=100)
        _image_axes(axes[0], image[0].cpu(), "slice")
        h, w = indices.shape
        _image_axes(axes[1], index_map_rgb(indices, num_codes), f"code indices ({h}x{w} grid, K={num_codes})")
        fig.suptitle(title, fontsize=11)
        return _save(fig, path)


def save_curves(series: dict[str, tuple[list, list]], path, title: str = "", xlabel: str = "step",
                ylabel: str = "", logy: bool = False) -> Path:
    """Line plot of named (x, y) series."""
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=100)
    for name, (x, y) in series.items():
        ax.plot(x, y, label=name, lw=1.4)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel), ax.set_ylabel(ylabel), ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend()
    return _save(fig, path)


def save_gan_curves(series: dict[str, tuple[list, list]], path) -> Path:
    """What a GAN user reads, side by side: the losses and penalty; the critic's scores for real and generated
    maps (their gap is the critic's estimate of how far apart the two are)."""
    panels = {"losses": ("loss_d", "loss_g", "penalty"), "critic: D(real), D(fake)": ("d_real", "d_fake")}
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), dpi=100)
    for ax, (title, names) in zip(axes, panels.items()):
        for name in names:
            ax.plot(*series[name], label=name, lw=1.2)
        ax.set_xlabel("step"), ax.set_title(title), ax.grid(alpha=0.3), ax.legend()
    fig.suptitle("GAN training")
    return _save(fig, path)


def save_side_by_side(rows: dict[str, torch.Tensor], path, title: str = "") -> Path:
    """One labelled row of slices per entry (e.g. samples over their nearest training slices)."""
    n = max(len(v) for v in rows.values())
    with plt.rc_context(DARK):
        fig, axes = plt.subplots(len(rows), n, figsize=(1.7 * n, 1.85 * len(rows) + 0.4), dpi=100, squeeze=False)
        for r, (label, images) in enumerate(rows.items()):
            for i in range(n):
                if i < len(images):
                    _image_axes(axes[r, i], images[i, 0].float().clamp(0, 1).cpu())
                else:
                    axes[r, i].axis("off")
            axes[r, 0].set_ylabel(label, fontsize=9)
        fig.suptitle(title, fontsize=11)
        return _save(fig, path)


def save_captioned_rows(rows: dict[str, list[tuple[str, np.ndarray]]], path, title: str = "",
                        credit: str = "") -> Path:
    """One labelled row per entry of (caption, uint8 H x W slice) pairs, e.g. synthetic over real slices, with
    an optional credit line at the bottom."""
    n = max(len(v) for v in rows.values())
    with plt.rc_context(DARK):
        fig, axes = plt.subplots(len(rows), n, figsize=(2.0 * n, 2.3 * len(rows)), dpi=110, squeeze=False)
        for r, (label, items) in enumerate(rows.items()):
            for i in range(n):
                if i < len(items):
                    _image_axes(axes[r, i], items[i][1], vmin=0, vmax=255)
                    axes[r, i].set_title(items[i][0], color="0.7", fontsize=7)
                    for spine in axes[r, i].spines.values():
                        spine.set_visible(False)
                else:
                    axes[r, i].axis("off")
            axes[r, 0].set_ylabel(label, fontsize=10)
        fig.suptitle(title, fontsize=11)
        if credit:
            fig.text(0.5, 0.01, credit, color="0.6", fontsize=7, ha="center", va="bottom")
        return _save(fig, path)


def save_zoom(images: torch.Tensor, path, title: str = "") -> Path:
    """A 2x3 subset large enough to judge anatomy."""
    with plt.rc_context(DARK):
        fig, axes = plt.subplots(2, 3, figsize=(9, 6.3), dpi=110)
        for ax, im in zip(axes.flat, images[:6]):
            _image_axes(ax, im[0].float().clamp(0, 1).cpu())
        fig.suptitle(title, fontsize=11)
        return _save(fig, path)


PRIOR_NAMES = {"gan": "DCGAN", "pixelcnn": "PixelCNN", "maskgit": "MaskGIT"}


def save_pipeline(image, indices, recon, sample_indices, sample, num_codes: int, path, title: str = "", *,
                  prior: str) -> Path:
    """The pipeline on real tensors: slice -> codes -> reconstruction, and prior -> codes -> new slice."""
    panels = [[(image[0], "slice"), (index_map_rgb(indices, num_codes), "encoder + quantizer:\ncode indices"),
               (recon[0], "decoder:\nreconstruction")],
              [(None, f"prior\n({prior})"), (index_map_rgb(sample_indices, num_codes), "sampled\ncode indices"),
               (sample[0], "decoder:\nnew slice")]]
    with plt.rc_context(DARK):
        fig, axes = plt.subplots(2, 3, figsize=(9, 6.4), dpi=100)
        for r, row in enumerate(panels):
            for c, (im, label) in enumerate(row):
                ax = axes[r, c]
                if im is None:
                    ax.axis("off")
                    ax.text(0.5, 0.5, label, ha="center", va="center", fontsize=13, color="white",
                            bbox=dict(boxstyle="round", fc="#333333", ec="gray"))
                    continue
                _image_axes(ax, im.float().clamp(0, 1).cpu() if torch.is_tensor(im) else im, label)
                if c < 2:
                    ax.annotate("", xy=(1.13, 0.5), xytext=(1.01, 0.5), xycoords="axes fraction",
                                arrowprops=dict(arrowstyle="->", color="white", lw=2))
        axes[1, 0].annotate("", xy=(1.13, 0.5), xytext=(0.85, 0.5), xycoords="axes fraction",
                            arrowprops=dict(arrowstyle="->", color="white", lw=2))
        fig.suptitle(title, fontsize=11)
        return _save(fig, path)


# ---------------------------------------------------------------- a run's figures

def save_run_figures(out, cfg, histories: dict, example, samples: dict, nearest: dict) -> list[Path]:
    """Every figure of a run into folder `out`.

    histories: {stage name: fit()'s history}; example: (originals, reconstructions, index maps) of a few test
    slices; samples: {prior: (slices, index maps)}; nearest: {prior: (SSIM, nearest training slice) of its
    first samples}. The pipeline figure shows `cfg.prior` (the run's generator) when it was sampled."""
    out = Path(out)
    made = save_vqvae_curves(histories.get("vqvae"), out) + save_prior_curves(histories, out)
    x, rec, idx = example
    mid = len(x) // 2
    made.append(save_reconstructions(x, rec, out / "reconstructions.png",
                                     "test slices: original, reconstruction, error"))
    made.append(save_code_map(x[mid], idx[mid], cfg.model.num_codes, out / "code_map.png"))
    if samples:
        name = cfg.prior if cfg.prior in samples else next(iter(samples))
        images, sample_idx = samples[name]
        data = Path(cfg.data_dir).name if cfg.data_dir else "built-in data"
        made.append(save_pipeline(x[mid], idx[mid], rec[mid], sample_idx[0], images[0], cfg.model.num_codes,
                                  out / "pipeline.png", f"{cfg.preset} preset, {data}, {name} prior",
                                  prior=PRIOR_NAMES[name]))
        made.append(save_which_are_real(x, images[:len(x)], out / "which_are_real.png",
                                        f"which are real? test slices and {name} samples, mixed", cfg.seed))
    for name, (images, _) in samples.items():
        made.append(save_montage(images[:64], out / f"samples_{name}.png",
                                 f"{min(len(images), 64)} samples, {name} prior"))
        made.append(save_zoom(images, out / f"samples_{name}_zoom.png", f"samples, {name} prior"))
    for name, (ssim, slices) in nearest.items():
        made.append(save_side_by_side(
            {"sample": samples[name][0][:len(slices)], "nearest train": slices}, out / f"nearest_{name}.png",
            f"{name} samples over their nearest training slices (SSIM {', '.join(f'{v:.2f}' for v in ssim.tolist())})"))
    return made


def save_which_are_real(real: torch.Tensor, fake: torch.Tensor, path, title: str = "", seed: int = 0) -> Path:
    """Real and generated slices shuffled into one grid, numbered, with the key printed under it."""
    images = torch.cat([real, fake]).float().clamp(0, 1).cpu()
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    cols = 4
    rows = -(-len(images) // cols)
    with plt.rc_context(DARK):
        fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.3 * rows + 0.6), dpi=100, squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for k, i in enumerate(order.tolist()):
            _image_axes(axes.flat[k], images[i, 0], str(k + 1))
        key = ", ".join(str(k + 1) for k, i in enumerate(order.tolist()) if i < len(real))
        fig.suptitle(title, fontsize=11)
        fig.text(0.5, 0.005, f"real: {key}; the others are generated", ha="center", fontsize=9, color="gray")
        return _save(fig, path)


def save_vqvae_curves(history: dict | None, out: Path) -> list[Path]:
    if not history:
        return []
    rows = history["train"]
    steps, losses, recon = ([r[i] for r in rows] for i in range(3))
    val, epochs = history["val"], [v["epoch"] for v in history["val"]]
    return [save_curves({"total loss": (steps, losses), "reconstruction MSE": (steps, recon)},
                        out / "vqvae_loss.png", "VQ-VAE training loss", "step", "loss", logy=True),
            save_curves({"SSIM": (epochs, [v["ssim"] for v in val]),
                         "codebook usage": (epochs, [v["codebook_usage"] for v in val])},
                        out / "val_ssim.png", "validation split, after each epoch", "epoch", "")]


def save_prior_curves(histories: dict, out: Path) -> list[Path]:
    """Each prior's training losses; the PixelCNN's validation likelihood too."""
    made = []
    for name, history in histories.items():
        if name == "vqvae" or not history:
            continue
        rows = history["train"]
        series = {loss: ([r[0] for r in rows], [r[i + 1] for r in rows]) for i, loss in enumerate(history["losses"])}
        if {"d_real", "d_fake"} <= set(series):
            made.append(save_gan_curves(series, out / f"{name}_losses.png"))
        else:
            made.append(save_curves(series, out / f"{name}_losses.png", f"{name} training", "step", ""))
        val = [v for v in history["val"] if "val_bits_per_code" in v]
        if val:
            made.append(save_curves({"validation": ([v["epoch"] for v in val], [v["val_bits_per_code"] for v in val])},
                                    out / f"{name}_nll.png", f"{name} validation NLL", "epoch", "bits per code"))
    return made


def save_png(image: torch.Tensor, path) -> Path:
    """One 1 x H x W slice in [0, 1] as an 8-bit grayscale PNG."""
    from PIL import Image

    Image.fromarray((image[0].float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)).save(path)
    return Path(path)
