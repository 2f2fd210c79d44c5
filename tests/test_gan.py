import dataclasses

import pytest
import torch
from test_vqvae import blob_split, tiny

import gan
from config import DEFAULT_GAN_RECIPE, GAN_RECIPES, RECIPE_FIELDS, GANConfig, gan_recipe, preset
from evaluate import sample_codes
from modules import VQVAE, CodeGenerator, Discriminator, MinibatchStd
import train
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
    gen = CodeGenerator(dataclasses.replace(cfg.gan, head=head, target="codes"), cfg.model)
    gen.codebook.copy_(vqvae.quantizer.codebook)
    for mode in (gen.train, gen.eval):
        mode()
        maps, idx = gen(torch.randn(4, cfg.gan.noise_dim))
        assert torch.equal(maps, vqvae.quantizer.lookup(idx))


def test_a_continuous_generator_trains_unsnapped_and_samples_exact_codes(trained):
    vqvae, _ = trained
    cfg = preset("tiny")
    gen = CodeGenerator(gan_recipe("wgan-gp-latent", cfg.gan), cfg.model)
    gen.codebook.copy_(vqvae.quantizer.codebook)
    noise = torch.randn(4, cfg.gan.noise_dim)
    raw, idx = gen.train()(noise)
    assert not torch.equal(raw, vqvae.quantizer.lookup(idx))  # the critic sees what the encoder would output
    maps, idx = gen.eval()(noise)
    assert torch.equal(maps, vqvae.quantizer.lookup(idx))  # what reaches the decoder: exact codes
    with pytest.raises(ValueError, match="needs the snap head"):
        CodeGenerator(dataclasses.replace(cfg.gan, target="encoder", head="logits"), cfg.model)


@pytest.mark.parametrize("head", ["snap", "logits"])
def test_generator_gets_gradients_through_the_snap(trained, head):
    vqvae, _ = trained
    cfg = preset("tiny")
    gen = CodeGenerator(dataclasses.replace(cfg.gan, head=head, target="codes"), cfg.model).train()
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


def test_sampling_temperature_scales_the_noise_of_the_same_draws(trained):
    vqvae, _ = trained
    cfg = preset("tiny")
    gen = CodeGenerator(cfg.gan, cfg.model).eval()
    gen.codebook.copy_(vqvae.quantizer.codebook)
    noise = torch.randn(5, cfg.gan.noise_dim, generator=torch.Generator().manual_seed(3))
    cooler = sample_codes(gen, 5, seed=3, device=torch.device("cpu"), settings=dataclasses.replace(cfg.gan,
                                                                                                   temperature=0.5))
    assert torch.equal(cooler, gen(0.5 * noise)[1])
    frozen = sample_codes(gen, 5, seed=3, device=torch.device("cpu"), settings=dataclasses.replace(cfg.gan,
                                                                                                   temperature=1e-9))
    assert torch.equal(frozen, gen(torch.zeros_like(noise))[1])  # noise all but zero: the one map of zero noise


@pytest.mark.parametrize("recipe", list(GAN_RECIPES))
def test_gan_resume_matches_an_uninterrupted_run(trained, tmp_path, recipe):
    vqvae, data = trained
    cfg = tiny()
    cfg.gan = dataclasses.replace(gan_recipe(recipe, cfg.gan), r1_every=2)  # the lazy R1 runs before and after the cut
    full_cfg = dataclasses.replace(cfg, gan=dataclasses.replace(cfg.gan, epochs=2))
    cut_cfg = dataclasses.replace(cfg, gan=dataclasses.replace(cfg.gan, epochs=1))
    full, _ = train_prior("gan", full_cfg, vqvae, data, tmp_path / "full", "cpu")
    train_prior("gan", cut_cfg, vqvae, data, tmp_path / "cut", "cpu")
    resumed, history = train_prior("gan", full_cfg, vqvae, data, tmp_path / "cut", "cpu", resume=True)
    assert [v["epoch"] for v in history["val"]] == [1, 2]
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_mirror_shows_the_critic_the_encoder_outputs_of_mirrored_slices(trained):
    vqvae, data = trained
    cfg = tiny()
    cfg.gan = dataclasses.replace(cfg.gan, mirror=True)  # the default recipe: the critic sees encoder outputs
    stage = train.GANStage(cfg, vqvae, data, torch.device("cpu"), False)
    n = len(data["train"].images)
    assert stage.n_items == 2 * n
    idx = torch.tensor([0, n + 0, 5, n + 5])
    images = data["train"].images[[0, 0, 5, 5]].float() / 255
    images[1::2] = images[1::2].flip(-1)
    with torch.no_grad():
        expected = vqvae.encoder(images) * stage.scale
    torch.testing.assert_close(stage.batch(idx), expected)


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


# ---------------------------------------------------------------- penalties, objectives, augmentation by hand

def test_r1_penalty_matches_a_hand_computation():
    # critic(x) = 0.5 * sum(x^2) per map: its input gradient is x itself, so R1 = mean over maps of sum(x^2).
    x = torch.tensor([[[[1.0, 2.0]]], [[[3.0, -1.0]]]])  # 2 maps of 1 x 1 x 2
    critic = lambda v: 0.5 * v.pow(2).flatten(1).sum(1)
    assert gan.r1_penalty(critic, x).item() == pytest.approx((1 + 4 + 9 + 1) / 2)


def test_r1_penalty_carries_a_gradient_to_the_critic():
    w = torch.tensor([2.0, -1.0], requires_grad=True)
    critic = lambda v: (v.flatten(1) * w).sum(1)  # input gradient w: R1 = |w|^2, d R1 / dw = 2w
    gan.r1_penalty(critic, torch.randn(3, 1, 1, 2)).backward()
    assert torch.allclose(w.grad, 2 * w.detach())


def test_gradient_penalty_matches_a_hand_computation():
    real, fake = torch.tensor([[3.0, 4.0], [1.0, 0.0]]), torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    alpha = torch.tensor([0.5, 0.25])
    critic = lambda v: 0.5 * v.pow(2).sum(1)  # gradient x: the penalty is (|x| - 1)^2 at the mixed points
    # map 1: x = (1.5, 2), |x| = 2.5 -> 2.25; map 2: x = (1, 1.5), |x| = sqrt(3.25)
    expected = ((2.5 - 1) ** 2 + (3.25 ** 0.5 - 1) ** 2) / 2
    assert gan.gradient_penalty(critic, real, fake, alpha).item() == pytest.approx(expected)


def test_objectives_by_hand():
    d_real, d_fake = torch.tensor([2.0, 0.5]), torch.tensor([-3.0, 0.0])
    assert gan.critic_loss("hinge", d_real, d_fake).item() == pytest.approx((0 + 0.5) / 2 + (0 + 1) / 2)
    assert gan.critic_loss("wgan", d_real, d_fake).item() == pytest.approx(-1.5 - 1.25 + 1e-3 * 2.125)
    assert gan.generator_loss("hinge", d_fake).item() == pytest.approx(1.5)
    with pytest.raises(ValueError, match="GAN loss"):
        gan.critic_loss("lsgan", d_real, d_fake)


def test_diff_augment_moves_and_cuts_maps_differentiably():
    torch.manual_seed(0)
    x = torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).view(2, 3, 16, 16).requires_grad_(True)
    moved = gan.diff_augment(x, "translation")
    assert moved.shape == x.shape and set(moved.unique().tolist()) <= set(x.unique().tolist())
    cut = gan.diff_augment(torch.ones(4, 2, 16, 16), "cutout")
    zeros = (cut == 0).all(1).flatten(1).sum(1)
    assert ((zeros > 0) & (zeros <= 25)).all()  # one square of side 16/4 (+1), clipped at the border
    gan.diff_augment(x, "translation,cutout").sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert torch.equal(gan.diff_augment(x, ""), x)
    with pytest.raises(ValueError, match="augmentation"):
        gan.diff_augment(x, "colour")


def test_minibatch_std_sees_the_spread_of_a_batch():
    same = torch.ones(4, 3, 2, 2)
    varied = torch.randn(4, 3, 2, 2)
    assert MinibatchStd()(same)[:, -1].max() < 1e-3 < MinibatchStd()(varied)[:, -1].min()


def test_ema_average_and_warm_up():
    a, b = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    expected = 0.75 * a.weight.detach() + 0.25 * b.weight.detach()
    gan.update_ema(a, b, 0.75)
    assert torch.allclose(a.weight, expected)
    assert gan.ema_decay(0.995, 0) == pytest.approx(0.1) and gan.ema_decay(0.995, 10 ** 6) == 0.995
    assert gan.ema_decay(0.0, 50) == 0.0  # ema off: the sampling copy is the latest generator


def test_recipes_change_objective_not_sizes():
    quick = preset("quick").gan
    report = gan_recipe("report", quick)
    assert (report.loss, report.head, report.critic_norm, report.r1_gamma) == ("bce", "snap", "batch", 0.0)
    assert (report.g_width, report.epochs, report.batch_size) == (quick.g_width, quick.epochs, quick.batch_size)
    back = gan_recipe(DEFAULT_GAN_RECIPE, report)
    assert all(getattr(back, k) == getattr(GANConfig(), k) for k in RECIPE_FIELDS)  # the default recipe
    codes = gan_recipe("wgan-gp", quick)
    assert (codes.loss, codes.head, codes.target, codes.gp_weight) == ("wgan", "logits", "codes", 10.0)
    assert gan_recipe("hinge-r1", quick).r1_gamma == 10.0 and gan_recipe("hinge-r1", quick).gp_weight == 0.0
    with pytest.raises(ValueError, match="unknown GAN recipe"):
        gan_recipe("stylegan", quick)
