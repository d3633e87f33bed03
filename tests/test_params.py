"""params.yaml: it validates, names bad keys, and takes --set and dvc-style dotted overrides."""

from __future__ import annotations

import json
import os
import shutil
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

    with pytest.raises(ConfigError, match=r"unknown preset 'fastest', expected one of \['fast-cpu', 'fewshot-cpu', 'photos-cpu', 'seed'\]"):
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


def test_params_yaml_is_in_the_form_dvc_writes_so_exp_run_set_changes_one_line(tmp_path):
    """`dvc exp run -S key=value` rewrites params.yaml through DVC's YAML writer; the committed file is already in
    that writer's form, so the only line that changes is the one set."""
    from dvc.utils.serialize import modify_yaml

    copy = tmp_path / "params.yaml"
    copy.write_text((REPO / "params.yaml").read_text(encoding="utf-8"), encoding="utf-8")
    with modify_yaml(str(copy)):
        pass
    assert copy.read_text(encoding="utf-8") == (REPO / "params.yaml").read_text(encoding="utf-8")
    with modify_yaml(str(copy)) as data:
        data["train"]["epochs"] = 3
    changed = [(old, new) for old, new in zip((REPO / "params.yaml").read_text(encoding="utf-8").splitlines(),
                                              copy.read_text(encoding="utf-8").splitlines()) if old != new]
    assert len(changed) == 1 and changed[0][1].split("#")[0].strip() == "epochs: 3", changed


def test_keys_the_user_changed_win_over_the_preset_and_one_line_names_the_rest(tmp_path, caplog):
    """A preset replaces the keys params.yaml holds at their shipped values; a key changed from it stays, --set wins
    over both, and one logged line names every key replaced and every key kept."""
    from pipelines.params import library_config

    def edit(data):
        data.update(preset="fast-cpu")
        data["train"]["augment"]["rotations_as_classes"] = False  # changed from the shipped true: the user's
        data["model"]["margin"] = 0.3  # changed, and the preset's 0.2 differs: the user's
        data["train"]["epochs"] = 24  # the shipped value: cannot be told from a key left alone

    with caplog.at_level("WARNING", logger="pipelines.params"):
        params = load_params(_with(tmp_path, edit), {"train.warmup_epochs": 2})
    assert params.train.augment.rotations_as_classes is False and params.model.margin == 0.3  # the user's
    assert params.model.input_size == 56 and params.train.epochs == 18  # the preset's, over shipped values
    assert params.train.warmup_epochs == 2  # --set
    [note] = [record.getMessage() for record in caplog.records]
    assert "\n" not in note and note.startswith("preset fast-cpu set 2 key(s)")
    assert "model.input_size 32 -> 56, train.epochs 24 -> 18" in note
    assert "train.augment.rotations_as_classes false (preset: true)" in note and "model.margin 0.3 (preset: 0.2)" in note

    config = library_config(tmp_path / "params.yaml", "photos-cpu", ["epochs=3"])  # siamese train --params --preset
    assert (config.model.backbone, config.model.margin, config.train.epochs) == ("efficientnet_lite0", 0.3, 3)


def test_the_shipped_values_are_those_of_params_yaml_for_every_key_a_preset_sets():
    from pipelines.params import preset_keys, preset_names, shipped_keys
    from siamese_core.metrics import flatten

    shipped, params = shipped_keys(), flatten(yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8")))
    named = {key for name in preset_names() for key in preset_keys(name)}
    assert named <= set(shipped), f"add {sorted(named - set(shipped))} to pipelines/presets/shipped/params.yaml"
    assert {key: params[key] for key in shipped} == shipped
    plain = load_params(REPO / "params.yaml")
    assert load_params(REPO / "params.yaml", {"preset": "photos-cpu"}).model.backbone == "efficientnet_lite0"
    assert plain.preset is None and plain.model.backbone == "small_cnn"


def test_dvc_exp_run_set_keys_win_over_the_preset(tmp_path):
    """Through a real `dvc exp run -S`, which writes params.yaml: the issue's case, a key the preset also sets."""
    import subprocess
    import sys

    from support.project import dvc_env

    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(REPO / "params.yaml", repo)
    (repo / "resolve.py").write_text(
        "import json\nfrom pipelines.params import load_params\n"
        "p = load_params()\n"
        "json.dump({'rotations': p.train.augment.rotations_as_classes, 'size': p.model.input_size,"
        " 'epochs': p.train.epochs}, open('resolved.json', 'w'))\n", encoding="utf-8")
    (repo / "dvc.yaml").write_text("stages:\n  resolve:\n    cmd: python resolve.py\n    deps: [resolve.py]\n"
                                   "    params: [preset, model, train]\n    outs: [resolved.json]\n", encoding="utf-8")
    env = dvc_env(tmp_path)

    def run(*args: str) -> str:
        done = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, timeout=300, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout + done.stderr

    dvc = (sys.executable, "-m", "dvc")
    run("git", "init", "-q")
    run(*dvc, "init", "-q")
    run("git", "add", "-A")
    run("git", "commit", "-qm", "params")
    output = run(*dvc, "exp", "run", "-S", "preset=fast-cpu", "-S", "train.augment.rotations_as_classes=false",
                 "-S", "train.epochs=24")
    assert json.loads((repo / "resolved.json").read_text()) == {"rotations": False, "size": 56, "epochs": 18}
    assert "train.augment.rotations_as_classes false (preset: true)" in output and "train.epochs 24 -> 18" in output


def test_a_failed_dvc_exp_run_says_in_one_line_how_to_get_params_yaml_back(tmp_path):
    """`dvc exp run -S` writes params.yaml before the stage runs; when the stage fails on the user's input, its one
    line says how to go back, since running the same line again fails the same way."""
    import subprocess
    import sys

    from support.project import dvc_env

    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(REPO / "params.yaml", repo)
    siamese = Path(sys.executable).parent / "siamese"
    (repo / "dvc.yaml").write_text(f"stages:\n  fit:\n    cmd: {siamese} train --train nowhere --test nowhere --out m\n"
                                   "    params: [model]\n", encoding="utf-8")
    env = dvc_env(tmp_path)
    for command in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"], ["git", "add", "-A"],
                    ["git", "commit", "-qm", "params"]):
        subprocess.run(command, cwd=repo, env=env, check=True, capture_output=True, timeout=120)
    done = subprocess.run([sys.executable, "-m", "dvc", "exp", "run", "-S", "model.input_size=48"], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    [line] = [line for line in done.stderr.splitlines() if line.startswith("error: --train")]
    assert "nowhere: does not exist" in line and "`git checkout params.yaml` goes back" in line, done.stderr
    assert "input_size: 48" in (repo / "params.yaml").read_text()
