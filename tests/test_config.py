"""The typed config: overrides, validation errors, --set parsing."""

import pytest

from siamese_core.config import (
    Config,
    ConfigError,
    TrainConfig,
    apply_overrides,
    parse_set_options,
)


def test_defaults_are_the_seed_architecture():
    config = Config()
    assert config.model.backbone == "resnet50"
    assert config.model.input_size == 200
    assert config.model.head_units == [512, 256] and config.model.embedding_dim == 256
    assert config.model.margin == 0.5 and config.model.weights == "imagenet"


def test_bare_and_dotted_keys_override_the_same_field():
    bare = apply_overrides(Config(), {"epochs": 3, "margin": 0.2, "weights": None})
    dotted = apply_overrides(Config(), {"train.epochs": 3, "model.margin": 0.2, "model.weights": None})
    assert bare == dotted
    assert bare.train.epochs == 3 and bare.model.margin == 0.2 and bare.model.weights is None


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match="unknown config key 'epoch'"):
        apply_overrides(Config(), {"epoch": 3})
    with pytest.raises(ConfigError, match="model.bogus"):
        apply_overrides(Config(), {"model.bogus": 1})


def test_ambiguous_bare_key_lists_the_choices():
    class Extended(Config):
        other: TrainConfig = TrainConfig()

    with pytest.raises(ConfigError, match=r"ambiguous config key 'epochs'.*'train.epochs', 'other.epochs'"):
        apply_overrides(Extended(), {"epochs": 8})


def test_bad_value_names_the_key():
    with pytest.raises(ConfigError, match="train.learning_rate"):
        apply_overrides(Config(), {"learning_rate": -1})
    with pytest.raises(ConfigError, match="model.backbone"):
        apply_overrides(Config(), {"backbone": "vgg"})


def test_set_options_are_read_as_yaml():
    assert parse_set_options(["weights=null", "margin=0.2", "head_units=[64, 32]", "backbone=small_cnn"]) == {
        "weights": None,
        "margin": 0.2,
        "head_units": [64, 32],
        "backbone": "small_cnn",
    }
    with pytest.raises(ConfigError, match="key=value"):
        parse_set_options(["epochs"])


@pytest.mark.parametrize("key", ["learning_rate", "margin", "weight_decay", "collapse_min_gap"])
@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_infinite_and_nan_values_are_refused_in_one_line(key, value):
    from siamese_core.config import parse_set_options

    with pytest.raises(ConfigError, match=key) as caught:
        apply_overrides(Config(), parse_set_options([f"{key}={value}"]))
    assert str(caught.value).endswith("Input should be a finite number") and "\n" not in str(caught.value)


@pytest.mark.parametrize("setting", ["head_units=[0]", "seed=-1", "embedding_dim=1e9", "steps_per_epoch=1e9",
                                     "head_units=[100000000]"])
def test_out_of_range_values_are_refused_in_one_line(setting):
    from siamese_core.config import parse_set_options

    with pytest.raises(ConfigError) as caught:
        apply_overrides(Config(), parse_set_options([setting]))
    assert setting.split("=")[0] in str(caught.value) and "\n" not in str(caught.value)
