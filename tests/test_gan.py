import dataclasses

import pytest
import torch
from test_vqvae import blob_split, tiny

from config import preset
from evaluate import sample_codes
from modules import VQVAE, CodeGenerator, Discriminator
from train import train_prior, train_vqvae


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    data = {"train": blob_split(32), "validate": blob_split(8, seed=1), "test": blob_split(8, seed=2)}
    vqvae, _ = train_vqvae(tiny(epochs=1), data, tmp_path_factory.mktemp("vq"), "cpu")
    return vqvae.eval(), data


@pytest.mark.parametrize("head", ["snap", "logits"])
def test_generated_maps_are_exact_codebook_vectors(trained, head):
    vqvae, _ = trained
    cfg = preset("tiny")
    gen = CodeGenerator(dataclasses.replace(cfg.gan, head=head), cfg.model)
    gen.codebook.copy_(vqvae.quantizer.codebook)
    for mode in (gen.train, gen.eval):
        mode()
        maps, idx = gen(torch.randn(4, cfg.gan.noise_dim))
        assert torch.equal(maps, vqvae.quantizer.lookup(idx))


@pytest.mark.parametrize("head", ["snap", "logits"])
def test_generator_gets_gradients_through_the_snap(trained, head):
    vqvae, _ = trained
    cfg = preset("tiny")
    gen = CodeGenerator(dataclasses.replace(cfg.gan, head=head), cfg.model).train()
    gen.codebook.copy_(vqvae.quantizer.codebook)
    disc = Discriminator(cfg.gan, cfg.model.latent_size, cfg.model.code_dim)
    maps, _ = gen(torch.randn(4, cfg.gan.noise_dim))
    disc(maps).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gen.parameters() if p.ndim > 1)


def test_sampling_is_deterministic_for_a_seed(trained):
    vqvae, _ = trained
    cfg = preset("tiny")
    gen = CodeGenerator(cfg.gan, cfg.model)
    gen.codebook.copy_(vqvae.quantizer.codebook)
    a = sample_codes(gen, 5, seed=3, device=torch.device("cpu"), settings=cfg.gan)
    b = sample_codes(gen, 5, seed=3, device=torch.device("cpu"), settings=cfg.gan)
    c = sample_codes(gen, 5, seed=4, device=torch.device("cpu"), settings=cfg.gan)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_gan_resume_matches_an_uninterrupted_run(trained, tmp_path):
    vqvae, data = trained
    cfg = tiny()
    full_cfg = dataclasses.replace(cfg, gan=dataclasses.replace(cfg.gan, epochs=2))
    cut_cfg = dataclasses.replace(cfg, gan=dataclasses.replace(cfg.gan, epochs=1))
    full, _ = train_prior("gan", full_cfg, vqvae, data, tmp_path / "full", "cpu")
    train_prior("gan", cut_cfg, vqvae, data, tmp_path / "cut", "cpu")
    resumed, history = train_prior("gan", full_cfg, vqvae, data, tmp_path / "cut", "cpu", resume=True)
    assert [v["epoch"] for v in history["val"]] == [1, 2]
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_discriminator_and_generator_sizes_follow_any_grid():
    cfg = preset("tiny")
    for grid in (4, 8, 16, 64):
        model_cfg = dataclasses.replace(cfg.model, image_size=grid * 4)
        gen = CodeGenerator(cfg.gan, model_cfg)
        maps, idx = gen(torch.randn(2, cfg.gan.noise_dim))
        assert maps.shape == (2, model_cfg.code_dim, grid, grid) and idx.shape == (2, grid, grid)
        assert Discriminator(cfg.gan, grid, model_cfg.code_dim)(maps).shape == (2,)
    with pytest.raises(ValueError):
        CodeGenerator(cfg.gan, dataclasses.replace(cfg.model, image_size=24 * 4))


def test_prior_checkpoint_of_another_vqvae_is_not_resumed(trained, tmp_path):
    vqvae, data = trained
    cfg = tiny()
    train_prior("gan", cfg, vqvae, data, tmp_path, "cpu")
    other = VQVAE(cfg.model)
    other.quantizer.codebook.add_(1.0)  # a VQ-VAE whose codebook changed since
    _, history = train_prior("gan", cfg, other.eval(), data, tmp_path, "cpu", resume=True)
    assert [v["epoch"] for v in history["val"]] == [1, 2]  # trained again, not skipped as finished
    _, history = train_prior("gan", cfg, other.eval(), data, tmp_path, "cpu", resume=True)
    assert [v["epoch"] for v in history["val"]] == [1, 2]  # now its own: nothing left to do
