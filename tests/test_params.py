"""params.yaml: it validates, names bad keys, and takes --set and dvc-style dotted overrides."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from pipelines.params import PRESETS, PipelineParams, load_params, with_preset
from pipelines.pipeline import STAGES, param_value
from siamese_core.config import apply_overrides, parse_set_options
from siamese_core.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def _with(tmp_path: Path, edit) -> Path:
    data = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    edit(data)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_params_yaml_validates_and_is_the_cpu_demo():
    params = load_params(REPO / "params.yaml")
    assert params.model.backbone == "small_cnn" and params.model.weights is None
    assert (params.data.train_dir, params.data.heldout_dir) == ("data/demo/train", "data/demo/heldout")
    assert params.triplets.max_pairs_per_class is not None
    assert set(yaml.safe_load((REPO / "params.yaml").read_text())) == set(PipelineParams.model_fields)


@pytest.mark.parametrize(
    "edit, named",
    [
        (lambda d: d["train"].update(epochz=3), "train.epochz"),
        (lambda d: d.update(modle={"backbone": "small_cnn"}), "modle"),
        (lambda d: d["data"].update(train_dri="x"), "data.train_dri"),
        (lambda d: d["train"].update(epochs=0), "train.epochs"),
    ],
)
def test_bad_key_or_value_is_an_error_that_names_it(tmp_path, edit, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_params(_with(tmp_path, edit))


def test_siamese_params_env_names_the_file(tmp_path, monkeypatch):
    path = _with(tmp_path, lambda d: d["train"].update(epochs=7))
    monkeypatch.setenv("SIAMESE_PARAMS", str(path))
    assert load_params().train.epochs == 7


def test_set_style_overrides():
    overrides = parse_set_options(["train.epochs=3", "weights=null", "model.head_units=[8, 4]", "register.metric=top5"])
    params = load_params(REPO / "params.yaml", overrides)
    assert params.train.epochs == 3
    assert params.model.weights is None
    assert params.model.head_units == [8, 4]
    assert params.register.metric == "top5"
    with pytest.raises(ConfigError, match=r"train\.epochz"):
        load_params(REPO / "params.yaml", parse_set_options(["train.epochz=3"]))
    with pytest.raises(ConfigError, match="key=value"):
        parse_set_options(["epochs"])


def test_dvc_style_dotted_keys():
    """Every params key the stage table declares exists; `dvc exp run -S section.key=value` keys apply."""
    params = load_params(REPO / "params.yaml")
    declared = {key for stage in STAGES.values() for key in stage.params}
    assert {"train", "data.heldout_dir", "register"} <= declared
    for key in declared:
        param_value(params, key)
    changed = apply_overrides(params, {"train.epochs": 3, "data.heldout_dir": None, "schedule.cron": "0 4 * * *"})
    assert (changed.train.epochs, changed.data.heldout_dir, changed.schedule.cron) == (3, None, "0 4 * * *")
    assert param_value(changed, "train")["epochs"] == 3


def test_presets_replace_the_keys_they_name_and_set_wins(tmp_path):
    seed = load_params(REPO / "params.yaml", {"preset": "seed"})
    assert seed.preset == "seed"
    assert (seed.model.backbone, seed.model.input_size, seed.model.head_units) == ("resnet50", 200, [512, 256])
    assert seed.train.learning_rate == 1e-4 and seed.triplets.max_pairs_per_class is None
    assert seed.data.train_dir == "data/demo/train"  # sections a preset does not name stay

    fast = load_params(_with(tmp_path, lambda d: d.update(preset="fast-cpu")), {"train.epochs": 2})
    assert fast.train.mining == "batch_all" and fast.train.augment.rotations_as_classes
    assert fast.train.epochs == 2  # --set beats the preset

    fewshot = load_params(REPO / "params.yaml", {"preset": "fewshot-cpu", "evaluate.test_time_views": 3})
    assert fewshot.model.input_size == 56 and fewshot.train.mining == "batch_all"  # fast-cpu's, which it extends
    assert fewshot.evaluate.match == "class_mean" and fewshot.evaluate.test_time_views == 3  # its own; --set wins
    assert fewshot.evaluate.top_k == 5  # keys neither preset names stay

    with pytest.raises(ConfigError, match=r"unknown preset 'fastest', expected one of \['fast-cpu', 'fewshot-cpu', 'seed'\]"):
        load_params(REPO / "params.yaml", {"preset": "fastest"})


def test_cli_preset_starts_from_the_preset(tmp_path):
    from pipelines.params import library_config

    config = library_config(None, "fast-cpu", ["epochs=1"])
    assert config.model.backbone == "small_cnn" and config.train.mining == "batch_all" and config.train.epochs == 1
    assert library_config(None, None, []).model.backbone == "resnet50"  # without a preset: the seed's defaults


def test_a_preset_is_a_name_never_a_path(tmp_path):
    outside = tmp_path / "x.yaml"
    outside.write_text("model:\n  backbone: resnet50\n", encoding="utf-8")
    relative = os.path.relpath(outside.with_suffix(""), PRESETS)
    with pytest.raises(ConfigError, match="unknown preset"):
        with_preset({}, relative)
    assert with_preset({"model": {}}, "fast-cpu")["model"]["backbone"] == "small_cnn"
