import dataclasses

import pytest
import torch
import torch.nn.functional as F

from config import preset
from dataset import Split
from modules import VQVAE, ConvTranspose2d, VectorQuantizer
from evaluate import load_vqvae
from runs import RunError
from train import TrainingDiverged, train_vqvae


def quantizer(k=6, d=3, **kw) -> VectorQuantizer:
    torch.manual_seed(0)
    return VectorQuantizer(k, d, **kw)


def test_nearest_code_matches_brute_force():
    q = quantizer(k=37, d=5)
    x = torch.randn(200, 5)
    brute = torch.stack([((q.codebook - row) ** 2).sum(1).argmin() for row in x])
    assert torch.equal(q.nearest(x), brute)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # distances stay fp32 under autocast
        assert torch.equal(q.nearest(x), brute)


def test_forward_returns_exact_codes_and_straight_through_gradient():
    q = quantizer().eval()
    z = torch.randn(2, 3, 4, 4, requires_grad=True)
    out = q(z)
    assert torch.allclose(out.z_q, q.lookup(out.indices))
    out.z_q.sum().backward()
    assert torch.allclose(z.grad, torch.ones_like(z))  # identity gradient to the encoder side


def test_conv_transpose_with_bias_outside_matches_torch():
    torch.manual_seed(0)
    ours, ref = ConvTranspose2d(6, 3, 4, stride=2, padding=1), torch.nn.ConvTranspose2d(6, 3, 4, stride=2, padding=1)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 6, 5, 5).contiguous(memory_format=torch.channels_last)
    out, want = ours(x), ref(x)
    assert torch.allclose(out, want, atol=1e-6)
    out.square().sum().backward()
    want.square().sum().backward()
    for a, b in zip(ours.parameters(), ref.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ours(x).dtype == torch.bfloat16  # the fp32 bias must not promote bf16 activations


def test_gradient_reaches_encoder():
    cfg = preset("tiny").model
    model = VQVAE(cfg)
    recon, loss, _ = model(torch.rand(2, 1, cfg.image_size, cfg.image_size))
    (F.mse_loss(recon, torch.rand_like(recon)) + loss).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.parameters())


def test_ema_update_matches_hand_computation():
    q = quantizer(k=2, d=1, decay=0.5, eps=0.0, dead_after=10**6)
    q.initialised.fill_(True)
    q.codebook.copy_(torch.tensor([[0.0], [10.0]]))
    q.ema_sum.copy_(q.codebook)
    q.ema_count.fill_(1.0)
    q.train()(torch.tensor([1.0, 2.0, 9.0]).view(1, 1, 1, 3))
    # counts (2, 1), sums (3, 9): ema_count = (1.5, 1.0), ema_sum = (1.5, 9.5)
    assert torch.allclose(q.ema_count, torch.tensor([1.5, 1.0]))
    assert torch.allclose(q.ema_sum, torch.tensor([[1.5], [9.5]]))
    assert torch.allclose(q.codebook, torch.tensor([[1.0], [9.5]]))
    assert q.usage.tolist() == [2, 1]


def test_laplace_smoothing_keeps_unused_codes_finite():
    q = quantizer(k=4, d=2, decay=0.0, dead_after=10**6)
    q.initialised.fill_(True)
    q.train()(torch.zeros(1, 2, 1, 1) + q.codebook[0].view(1, 2, 1, 1))
    assert torch.isfinite(q.codebook).all()


def test_dead_codes_are_restarted_onto_encoder_outputs():
    q = quantizer(k=8, d=2, dead_after=3)
    q.train()
    z = torch.randn(1, 2, 4, 4) * 0.01 + 5.0  # one tight cluster: most codes go unused
    q(z)
    q.codebook[1:] = -100.0  # far away: never chosen again
    q.ema_sum[1:] = -100.0
    for _ in range(3):
        q(z)
    assert (q.codebook - 5.0).abs().max() < 0.1  # every code was moved back onto the data


def test_codebook_init_from_data_and_loss_mode():
    q = quantizer(k=4, d=2, mode="loss")
    assert isinstance(q.codebook, torch.nn.Parameter)
    z = torch.randn(1, 2, 4, 4, requires_grad=True)
    out = q.train()(z)
    out.loss.backward()
    assert q.codebook.grad is not None  # the report's codebook loss trains the codes
    with pytest.raises(ValueError):
        VectorQuantizer(4, 2, mode="kmeans")


# ---------------------------------------------------------------- training

def blob_split(n: int, size: int = 32, seed: int = 0) -> Split:
    """Smooth bright discs on black: learnable in a few dozen steps, unlike noise."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    centres = torch.rand(n, 2, generator=g) * size * 0.5 + size * 0.25
    radius = torch.rand(n, generator=g) * size * 0.2 + size * 0.15
    d = ((yy - centres[:, 0, None, None]) ** 2 + (xx - centres[:, 1, None, None]) ** 2).sqrt()
    images = (255 * torch.sigmoid(radius[:, None, None] - d)).to(torch.uint8)
    return Split(images[:, None], [f"case_{i:03d}.png" for i in range(n)], None)


@pytest.fixture(scope="module")
def data():
    return {"train": blob_split(64), "validate": blob_split(16, seed=1), "test": blob_split(16, seed=2)}


def tiny(amp: str = "off", compile: str = "off", **train):
    cfg = preset("tiny")
    cfg.train = dataclasses.replace(cfg.train, **train)
    cfg.runtime = dataclasses.replace(cfg.runtime, amp=amp, compile=compile)
    return cfg


def test_loss_falls_within_a_few_dozen_steps(data, tmp_path):
    _, history = train_vqvae(tiny(epochs=5), data, tmp_path, "cpu")  # 5 epochs x 8 steps
    losses = [row[1] for row in history["train"]]
    assert losses[-1] < 0.5 * losses[0]


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(data, tmp_path):
    full, _ = train_vqvae(tiny(epochs=2), data, tmp_path / "full", "cpu")
    train_vqvae(tiny(epochs=1), data, tmp_path / "cut", "cpu")
    resumed, history = train_vqvae(tiny(epochs=2), data, tmp_path / "cut", "cpu", resume=True)
    assert [v["epoch"] for v in history["val"]] == [1, 2]
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_checkpoint_alone_rebuilds_the_model(data, tmp_path):
    model, _ = train_vqvae(tiny(epochs=1), data, tmp_path, "cpu")
    rebuilt, cfg = load_vqvae(tmp_path)
    assert cfg.preset == "tiny"
    x = data["test"].images[:4].float() / 255
    model.eval()
    assert torch.allclose(model(x)[0], rebuilt(x)[0])


def test_mismatched_checkpoint_fails_in_one_line(data, tmp_path):
    train_vqvae(tiny(epochs=1), data, tmp_path, "cpu")
    other = tiny(epochs=2)
    other.model = dataclasses.replace(other.model, num_codes=32)
    with pytest.raises(RunError) as err:
        train_vqvae(other, data, tmp_path, "cpu", resume=True)
    assert "num_codes=16" in str(err.value) and "\n" not in str(err.value)


def test_nan_loss_stops_and_names_last_good_checkpoint(data, tmp_path):
    cfg = tiny(epochs=2, lr=1e30)
    with pytest.raises(TrainingDiverged, match="last good checkpoint"):
        train_vqvae(cfg, data, tmp_path, "cpu")


def test_bf16_channels_last_path_runs_on_cpu(data, tmp_path):
    model, history = train_vqvae(tiny(epochs=1, amp="bf16"), data, tmp_path, "cpu")
    assert history["val"][0]["ssim"] > -1
    assert next(model.encoder.parameters()).is_contiguous(memory_format=torch.channels_last)


def test_compiled_encoder_and_decoder_train(data, tmp_path):
    # aot_eager traces through dynamo and AOTAutograd like inductor does, without minutes of C++ codegen
    model, history = train_vqvae(tiny(epochs=1, compile="aot_eager"), data, tmp_path, "cpu")
    assert history["val"][0]["ssim"] > -1
    assert set(model.state_dict()) == set(VQVAE(preset("tiny").model).state_dict())


def test_tensorboard_holds_scalars_and_images(data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train_vqvae(tiny(epochs=1), data, tmp_path, "cpu")
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "images": 0, "histograms": 0}).Reload()
    tags = events.Tags()
    for tag in ("vqvae/loss", "vqvae/recon_mse", "vqvae/vq_loss", "val/mse", "val/ssim", "val/psnr",
                "val/codebook_usage", "val/perplexity", "perf/vqvae_images_per_s"):
        assert tag in tags["scalars"], tag
    assert len(events.Scalars("vqvae/loss")) == 8  # one per step
    assert {"val/originals_over_reconstructions", "val/code_indices"} <= set(tags["images"])
    assert "val/code_use" in tags["histograms"]


def test_loss_mode_codebook_learns_from_its_loss_only():
    q = quantizer(k=4, d=2, mode="loss")
    q.train()
    z = torch.randn(1, 2, 4, 4, requires_grad=True)
    q(z).z_q.sum().backward()  # the decoder's gradient: straight through to the encoder, not into the codes
    assert z.grad is not None
    assert q.codebook.grad is None or not q.codebook.grad.any()
