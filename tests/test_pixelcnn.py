"""Gated PixelCNN prior: causality, cached sampling, learning, determinism, training loop and resume."""
import dataclasses

import pytest
import torch

import config
import modules
from dataset import Split
from modules import VQVAE, PixelCNN
from runs import load_checkpoint
from train import train_prior


@pytest.fixture
def cfg():
    return config.preset("tiny")  # 8 x 8 grid, K = 16; receptive field 5 rows up, less than the grid


def make_prior(cfg, seed=0):
    torch.manual_seed(seed)
    prior = PixelCNN(cfg.pixelcnn, cfg.model).eval()
    torch.nn.init.normal_(prior.pos)  # starts at zero; make it matter, so that its slicing is tested too
    return prior


def test_logits_at_a_position_depend_only_on_earlier_positions(cfg):
    prior = make_prior(cfg)
    s, k = cfg.model.latent_size, cfg.model.num_codes
    idx = torch.randint(0, k, (1, s, s), generator=torch.Generator().manual_seed(1))
    base = prior(idx)
    for p in [0, 3, s + 2, 3 * s, 3 * s + 5, s * s - 1]:
        changed = idx.clone()
        changed.view(-1)[p] = (changed.view(-1)[p] + 1) % k
        diff = (prior(changed) - base).abs().amax(1).flatten()  # per position, raster order
        assert diff[:p + 1].max() == 0, f"changing position {p} changed logits at or before it"
        if p < s * s - 1:
            assert diff[p + 1:].max() > 0, f"changing position {p} changed nothing after it"


def test_no_blind_spot(cfg):
    # (3, 7) is one row up and four columns right of (4, 3): a plain stack of masked 7x7 then 3x3 convs
    # cannot see it from there (its blind spot); the vertical stack must.
    prior = make_prior(cfg)
    s = cfg.model.latent_size
    idx = torch.zeros(1, s, s, dtype=torch.long)
    changed = idx.clone()
    changed[0, 3, 7] = 5
    assert (prior(changed)[:, :, 4, 3] - prior(idx)[:, :, 4, 3]).abs().max() > 0


def test_cached_sampling_gives_the_full_forward_logits(cfg, monkeypatch):
    prior = make_prior(cfg)
    seen = []

    def record(logits, u, temperature=1.0, top_k=0):
        seen.append(logits.clone())
        return draw(logits, u, temperature, top_k)

    draw = modules.draw_codes
    monkeypatch.setattr(modules, "draw_codes", record)
    idx = prior.sample(3, torch.Generator().manual_seed(0))
    s = cfg.model.latent_size
    full = prior(idx).permute(2, 3, 0, 1).reshape(s * s, 3, -1)  # raster order; earlier codes are final
    torch.testing.assert_close(torch.stack(seen), full, rtol=1e-5, atol=1e-5)


def test_sampling_is_deterministic_for_a_seed(cfg):
    prior = make_prior(cfg).train()
    a = prior.sample(4, torch.Generator().manual_seed(0))
    b = prior.sample(4, torch.Generator().manual_seed(0))
    c = prior.sample(4, torch.Generator().manual_seed(1))
    s = cfg.model.latent_size
    assert a.shape == (4, s, s) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert prior.training  # restored after sampling


def test_top_k_one_is_greedy_and_temperature_runs(cfg):
    prior = make_prior(cfg)
    idx = prior.sample(2, torch.Generator().manual_seed(0), top_k=1)
    assert torch.equal(prior(idx).argmax(1), idx)
    cold = prior.sample(2, torch.Generator().manual_seed(0), temperature=0.5, top_k=3)
    assert cold.min() >= 0 and cold.max() < cfg.model.num_codes
    u = torch.rand(5)
    logits = torch.randn(5, 16)
    assert torch.equal(modules.draw_codes(logits, u, top_k=1), logits.argmax(1))


def test_loss_falls_on_a_tiny_grid(cfg):
    prior = make_prior(cfg).train()
    s = cfg.model.latent_size
    # Stripes with a random phase: predictable from the left neighbour, not from the position alone.
    phase = torch.randint(0, 4, (32, 1, 1), generator=torch.Generator().manual_seed(0))
    idx = (torch.arange(s)[None, None, :] + phase).remainder(4).expand(32, s, s).contiguous()
    opt = torch.optim.Adam(prior.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = torch.nn.functional.cross_entropy(prior(idx), idx)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]


def tiny_data(n):
    g = torch.Generator().manual_seed(n)

    def split(m):
        return Split(torch.randint(0, 256, (m, 1, 32, 32), dtype=torch.uint8, generator=g),
                     [f"case_{i}_slice_0.nii.png" for i in range(m)], None)
    return {"train": split(n), "validate": split(8)}


def test_train_prior_runs_resumes_and_reloads(cfg, tmp_path):
    torch.manual_seed(0)
    vqvae = VQVAE(cfg.model)
    data = tiny_data(24)
    prior, history = train_prior("pixelcnn", cfg, vqvae, data, tmp_path, device="cpu")
    assert [v["epoch"] for v in history["val"]] == [1, 2]
    assert {"val_bits_per_code", "code_js", "codes_used", "step"} <= set(history["val"][0])
    assert history["train"][-1][0] == history["val"][-1]["step"] == 2 * (24 // cfg.pixelcnn.batch_size)

    ckpt = load_checkpoint(tmp_path / "pixelcnn_last.pt")
    assert set(ckpt) == {"config", "models", "optimizers", "state", "rng"} and ckpt["state"]["epoch"] == 2
    fresh = PixelCNN(cfg.pixelcnn, cfg.model)
    fresh.load_state_dict(ckpt["models"]["prior"])
    idx = torch.randint(0, cfg.model.num_codes, (2, 8, 8))
    prior.eval(), fresh.eval()
    assert torch.equal(prior(idx), fresh(idx))

    more = dataclasses.replace(cfg, pixelcnn=dataclasses.replace(cfg.pixelcnn, epochs=3))
    _, resumed = train_prior("pixelcnn", more, vqvae, data, tmp_path, device="cpu", resume=True)
    assert [v["epoch"] for v in resumed["val"]] == [1, 2, 3]
    assert resumed["val"][:2] == history["val"]
    assert resumed["val"][2]["step"] == 3 * (24 // cfg.pixelcnn.batch_size)

    straight, _ = train_prior("pixelcnn", more, vqvae, data, tmp_path / "straight", device="cpu")
    saved = load_checkpoint(tmp_path / "pixelcnn_last.pt")["models"]["prior"]
    for a, b in zip(straight.state_dict().values(), saved.values()):
        assert torch.equal(a, b)  # resuming is exact: the same weights as one uninterrupted run
