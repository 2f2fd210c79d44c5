"""The MaskGIT prior: what it may see, that it learns, deterministic sampling, exact resume."""
import dataclasses

import pytest
import torch
from test_pixelcnn import tiny_data

import config
import train
from modules import VQVAE, build_prior
from priors import unsmoothed
from train import train_prior


@pytest.fixture
def cfg():
    return config.preset("tiny")


@pytest.mark.parametrize("head", ["sequential", "independent"])
def test_a_code_is_predicted_from_visible_tokens_and_its_own_tokens_earlier_codes_only(cfg, head):
    cfg = dataclasses.replace(cfg, maskgit=dataclasses.replace(cfg.maskgit, head=head))
    prior = build_prior("maskgit", cfg).eval()
    idx = torch.randint(0, cfg.model.num_codes, (2, 8, 8))
    tok = prior.to_tokens(idx)
    mask = torch.zeros(2, tok.shape[1], dtype=torch.bool)
    mask[:, ::3] = True
    logits = prior(tok, mask)
    changed = torch.where(mask[..., None], torch.randint_like(tok, cfg.model.num_codes), tok)
    # Masked tokens' codes: invisible to every other token, and to their own first code.
    same = prior(changed, mask)
    assert torch.equal(logits[~mask], same[~mask]) and torch.equal(logits[:, :, 0], same[:, :, 0])
    last = tok.clone()
    last[mask, -1] = (last[mask, -1] + 1) % cfg.model.num_codes  # a masked token's last code: seen by none
    assert torch.equal(prior(last, mask), logits)
    first = tok.clone()
    first[mask, 0] = (first[mask, 0] + 1) % cfg.model.num_codes  # seen by the later codes of its own token only
    assert torch.equal(prior(first, mask)[:, :, 0], logits[:, :, 0])
    assert torch.equal(prior(first, mask)[~mask], logits[~mask])
    assert torch.equal(prior(first, mask)[mask], logits[mask]) == (head == "independent")
    visible = tok.clone()
    visible[:, 1] = (visible[:, 1] + 1) % cfg.model.num_codes  # token 1 is visible: it must matter
    assert not torch.equal(prior(visible, mask), logits)


@pytest.mark.parametrize("head", ["sequential", "independent"])
def test_sampling_draws_from_the_distribution_training_teaches(cfg, head):
    # The draw (code by code for the sequential head) must score each drawn code as the training forward does.
    cfg = dataclasses.replace(cfg, maskgit=dataclasses.replace(cfg.maskgit, head=head))
    prior = build_prior("maskgit", cfg).eval()
    if prior.mix is not None:
        torch.nn.init.normal_(prior.mix[-1].weight, std=0.5)  # a non-trivial context path
    x = torch.randn(5, cfg.maskgit.hidden)
    codes, logp = prior.draw_tokens(x, torch.rand(5, prior.patch ** 2), 1.0, 0)
    want = prior.logits(x, codes).log_softmax(-1).gather(-1, codes[..., None])[..., 0].sum(-1)
    assert torch.allclose(logp, want, atol=1e-5)


def test_tokens_round_trip(cfg):
    prior = build_prior("maskgit", cfg)
    idx = torch.randint(0, cfg.model.num_codes, (3, 8, 8))
    assert torch.equal(prior.to_map(prior.to_tokens(idx)), idx)


def test_loss_falls_on_a_tiny_grid(cfg):
    torch.manual_seed(0)
    prior = build_prior("maskgit", dataclasses.replace(cfg, maskgit=dataclasses.replace(cfg.maskgit, hidden=32)))
    pattern = (torch.arange(8)[:, None] + torch.arange(8)[None]) % cfg.model.num_codes  # one fixed map
    opt = torch.optim.Adam(prior.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        loss = prior.loss(pattern.expand(8, 8, 8))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.4 * losses[0]


def test_unsmoothed_recovers_the_distribution_label_smoothing_hid():
    p = torch.tensor([[0.5, 0.3, 0.2, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0, 0.0]])
    smoothed = 0.9 * p + 0.1 / 5  # what cross-entropy with label smoothing 0.1 teaches a model to predict
    out = unsmoothed(smoothed.log() + 3.0, 0.1).exp()  # logits: any shift
    assert torch.allclose(out / out.sum(-1, keepdim=True), p, atol=1e-6)
    assert torch.equal(unsmoothed(smoothed.log(), 0.0), smoothed.log())


def test_random_order_draws_no_code_that_only_the_smoothing_floor_gave(cfg):
    # Every position's output: 0.9 on code 3 and the label-smoothing floor 0.1 / K on each code.
    prior = build_prior("maskgit", cfg).eval()
    k, pp = cfg.model.num_codes, prior.patch ** 2
    smoothed = torch.full((k,), cfg.maskgit.label_smoothing / k)
    smoothed[3] += 1 - cfg.maskgit.label_smoothing
    torch.nn.init.zeros_(prior.head.weight)
    with torch.no_grad():
        prior.head.bias.copy_(smoothed.log().repeat(pp))
    draws = {order: prior.sample(3, torch.Generator().manual_seed(0), order=order)
             for order in ("random", "confidence")}
    assert (draws["random"] == 3).all()
    assert (draws["confidence"] != 3).any()  # the floor's codes are drawn where it is kept


@pytest.mark.parametrize("order", ["confidence", "random"])
def test_sampling_is_deterministic_for_a_seed(cfg, order):
    prior = build_prior("maskgit", cfg)
    settings = {**cfg.maskgit.sampling(), "order": order}
    a = prior.sample(3, torch.Generator().manual_seed(1), **settings)
    b = prior.sample(3, torch.Generator().manual_seed(1), **settings)
    c = prior.sample(3, torch.Generator().manual_seed(2), **settings)
    assert a.shape == (3, 8, 8) and torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("mirror", [False, True])
def test_an_interrupted_run_resumes_to_the_same_weights(cfg, tmp_path, monkeypatch, mirror):
    # Interrupted after its second epoch's checkpoint, not trained for two epochs: the cosine schedule
    # depends on the number of epochs, so a shorter run would be another run.
    torch.manual_seed(0)
    vqvae = VQVAE(cfg.model)
    data = tiny_data(24)
    cfg = dataclasses.replace(cfg, maskgit=dataclasses.replace(cfg.maskgit, epochs=3, mirror=mirror))
    straight, _ = train_prior("maskgit", cfg, vqvae, data, tmp_path / "straight", device="cpu")
    end_epoch = train.end_epoch

    def stop_after_two(stage, cfg, state, *args):
        end_epoch(stage, cfg, state, *args)
        if state["epoch"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(train, "end_epoch", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        train_prior("maskgit", cfg, vqvae, data, tmp_path / "cut", device="cpu")
    monkeypatch.undo()
    resumed, history = train_prior("maskgit", cfg, vqvae, data, tmp_path / "cut", device="cpu", resume=True)
    assert [v["epoch"] for v in history["val"]] == [1, 2, 3] and "val_masked_loss" in history["val"][0]
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_mirror_adds_the_code_maps_of_the_mirrored_training_slices(cfg):
    torch.manual_seed(0)
    vqvae = VQVAE(cfg.model).eval()
    data = tiny_data(24)
    images = data["train"].images
    cfg = dataclasses.replace(cfg, maskgit=dataclasses.replace(cfg.maskgit, mirror=True))
    stage = train.MaskGITStage(cfg, vqvae, data, torch.device("cpu"), False)
    with torch.no_grad():
        plain = vqvae.encode_indices(images.float() / 255)
        mirrored = vqvae.encode_indices(images.flip(-1).float() / 255)
    assert stage.n_items == 48 and not torch.equal(plain, mirrored)
    assert torch.equal(stage.train_idx.long(), torch.cat([plain, mirrored]))


def test_a_checkpoint_trained_without_mirror_is_trained_again_with_it(cfg, tmp_path):
    torch.manual_seed(0)
    vqvae = VQVAE(cfg.model).eval()
    data = tiny_data(24)
    train_prior("maskgit", cfg, vqvae, data, tmp_path, device="cpu")
    cfg = dataclasses.replace(cfg, maskgit=dataclasses.replace(cfg.maskgit, mirror=True))
    _, history = train_prior("maskgit", cfg, vqvae, data, tmp_path, device="cpu", resume=True)
    assert [v["epoch"] for v in history["val"]] == [1, 2]  # trained again, not skipped as finished
