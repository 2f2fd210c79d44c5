import json

import pytest

from config import PRESETS, Config, preset


@pytest.mark.parametrize("name", PRESETS)
def test_presets_round_trip_through_json(name):
    cfg = preset(name)
    assert Config.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_missing_fields_take_their_defaults_and_an_int_fits_a_float():
    cfg = Config.from_dict({"train": {"lr": 1}, "data_dir": "/data"})
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.data_dir == "/data" and cfg.model == Config().model
    assert Config.from_dict({"data_dir": None}).data_dir is None


@pytest.mark.parametrize("d, message", [
    ({"sed": 1}, "unknown config field 'sed'; did you mean 'seed'?"),
    ({"train": {"lrr": 1e-3}}, "unknown config field 'train.lrr'; did you mean 'train.lr'?"),
    ({"model": {"colour": "red"}}, "unknown config field 'model.colour'"),
    ({"train": {"lr": "abc"}}, "config field 'train.lr' must be a number, not 'abc'"),
    ({"train": {"lr": None}}, "config field 'train.lr' must be a number, not None"),
    ({"model": {"num_codes": 1.5}}, "config field 'model.num_codes' must be an integer, not 1.5"),
    ({"train": {"epochs": True}}, "config field 'train.epochs' must be an integer, not True"),
    ({"gan": {"minibatch_std": "yes"}}, "config field 'gan.minibatch_std' must be true or false, not 'yes'"),
    ({"data_dir": 3}, "config field 'data_dir' must be a string or null, not 3"),
    ({"train": 5}, "config field 'train' must be a mapping of field names to values, not 5"),
    (None, "a config must be a mapping of field names to values, not None"),
    ([], "a config must be a mapping of field names to values, not []"),
    ({"prior": "pixelcn"}, "config field 'prior' must be one of gan, pixelcnn, maskgit, not 'pixelcn'"),
    ({"maskgit": {"head": "seqential"}},
     "config field 'maskgit.head' must be one of independent, sequential, not 'seqential'"),
    ({"maskgit": {"order": "greedy"}}, "config field 'maskgit.order' must be one of confidence, random, not 'greedy'"),
    ({"runtime": {"amp": "fp16"}}, "config field 'runtime.amp' must be one of auto, bf16, off, not 'fp16'"),
    ({"gan": {"augment": "translation,flip"}},
     "config field 'gan.augment' must be one of translation, cutout, not 'flip'"),
    ({"gan": {"head": "logits", "target": "encoder"}}, "a GAN on the encoder's outputs needs the snap head, not "
     "'logits': use --gan-recipe wgan-gp or hinge-r1 for a 'logits' head"),
])
def test_hand_edited_config_is_refused_in_one_line_naming_the_key(d, message):
    with pytest.raises(ValueError) as err:
        Config.from_dict(d)
    assert str(err.value) == message


def test_config_from_before_the_gan_recipes_reads_as_the_report_recipe():
    old = preset("quick").to_dict()
    old["gan"] = {"head": "snap", "noise_dim": 128, "g_width": 128, "d_width": 32, "epochs": 30, "batch_size": 64,
                  "lr": 2e-4, "beta1": 0.5, "beta2": 0.999, "tau": 1.0, "spectral_norm": False, "real_label": 1.0}
    gan = Config.from_dict(old).gan
    assert (gan.loss, gan.head, gan.critic_norm, gan.r1_gamma, gan.ema, gan.g_width) == ("bce", "snap", "batch", 0.0,
                                                                                         0.0, 128)


def test_config_from_before_the_latent_gan_reads_as_a_gan_of_code_maps():
    old = preset("quick").to_dict()
    old["gan"] = {**old["gan"], "head": "logits"}
    del old["gan"]["target"]  # the previous version's wgan-gp: logits over codes
    assert (Config.from_dict(old).gan.head, Config.from_dict(old).gan.target) == ("logits", "codes")
    assert Config.from_dict(preset("quick").to_dict()).gan.target == "encoder"
