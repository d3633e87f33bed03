"""The siamese command line, end to end on tiny digits."""

import json
import re
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from pipelines.cli import app

from support.images import make_digits_dataset
from support.tiny import tiny_set_options

runner = CliRunner()
TINY = tiny_set_options(learning_rate=0.003)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    train_dir, test_dir = make_digits_dataset(root, classes=3)
    bundle = root / "bundle"
    result = runner.invoke(app, ["train", "--train", str(train_dir), "--test", str(test_dir), "--out", str(bundle),
                                 "--epochs", "2", *TINY])
    assert result.exit_code == 0, result.output
    return train_dir, test_dir, bundle


def test_train_writes_a_bundle(trained):
    bundle = trained[2]
    assert (bundle / "model.keras").is_file()
    metadata = json.loads((bundle / "metadata.json").read_text())
    assert len(metadata["history"]["loss"]) == 2 and metadata["backbone"] == "small_cnn"


def test_predict_json_names_the_class_and_distance(trained):
    train_dir, _, bundle = trained
    image = sorted((train_dir / "digit 2").iterdir())[0]
    result = runner.invoke(app, ["predict", str(image), "--model", str(bundle), "--json", "--top-k", "2"])
    assert result.exit_code == 0, result.output
    [answer] = json.loads(result.stdout)
    assert answer["label"] == "digit 2" and answer["distance"] < 1e-3 and len(answer["top_k"]) == 2


def test_predict_against_another_gallery(trained):
    train_dir, test_dir, bundle = trained
    image = sorted((test_dir / "digit 0").iterdir())[0]
    result = runner.invoke(app, ["predict", str(image), "--model", str(bundle), "--gallery", str(test_dir), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)[0]["distance"] < 1e-3  # the query is itself in that gallery


def test_evaluate_reports_what_the_pipeline_reports(trained):
    from siamese_core.data import scan_folder
    from siamese_core.evaluation import assess
    from siamese_core.recognizer import SiameseRecognizer

    train_dir, test_dir, bundle = trained
    heldout, _ = make_digits_dataset(bundle.parent / "heldout", classes=3, first=3, test_per_class=0)
    result = runner.invoke(app, ["evaluate", "--model", str(bundle), "--test", str(test_dir), "--heldout", str(heldout),
                                 "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    recognizer = SiameseRecognizer.load(bundle)
    stage = assess(recognizer, scan_folder(test_dir), scan_folder(train_dir), scan_folder(heldout),
                   seed=recognizer.config.train.seed).report
    assert report == json.loads(json.dumps(stage.to_dict()))  # the evaluate stage's figures: baselines, open set, few-shot
    assert {"open_set", "fewshot"} <= set(report) and "fewshot" in report["baseline_raw_pixels"]
    assert report["baseline_raw_pixels"]["size"] == 32 and "top1" in report["baseline_untrained"]
    assert "leaving a fold of the gallery's classes out" in report["calibration"]["method"]
    assert report["baseline_check"]["sentence"] in runner.invoke(
        app, ["evaluate", "--model", str(bundle), "--test", str(test_dir)]).output

    text = runner.invoke(app, ["evaluate", "--model", str(bundle), "--test", str(test_dir)])
    assert text.exit_code == 0, text.output
    lines = text.stdout.splitlines()
    assert lines[0].startswith(f"model                top1 {report['top1']:.4f}  top5 {report['top5']:.4f}")
    assert lines[1].startswith(f"raw pixels           top1 {report['baseline_raw_pixels']['top1']:.4f}")
    assert lines[2].startswith(f"untrained            top1 {report['baseline_untrained']['top1']:.4f}")
    assert re.fullmatch(r"query time           [0-9.]+ ms per image on this machine, with no test-time views and match "
                        r"nearest_image", lines[-1])
    bare = runner.invoke(app, ["evaluate", "--model", str(bundle), "--test", str(test_dir), "--no-baselines", "--json"])
    assert bare.exit_code == 0 and not {"baseline_raw_pixels", "baseline_untrained"} & set(json.loads(bare.stdout))


def test_enroll_adds_classes(trained, tmp_path):
    _, test_dir, bundle = trained
    new_dir, _ = make_digits_dataset(tmp_path, classes=5)
    out = tmp_path / "bigger"
    result = runner.invoke(app, ["enroll", str(new_dir), "--model", str(bundle), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "5 classes" in result.output
    assert re.search(r"enrolling took [0-9.]+ ms per image with no test-time views", result.output)
    assert json.loads((out / "metadata.json").read_text())["class_names"][-2:] == ["digit 3", "digit 4"]


def test_bad_input_is_one_line_and_nonzero(tmp_path, trained):
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "predict", str(tmp_path / "x.png"), "--model", str(tmp_path / "nope")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'nope'}: no model bundle here "
                                                  "(expected a folder written by 'siamese train')"]
    unknown = runner.invoke(app, ["train", "--train", "a", "--test", "b", "--out", "c", "--set", "epoch=3"])
    assert unknown.exit_code == 1 and "unknown config key 'epoch'" in unknown.output
    image = tmp_path / "broken.jpg"
    image.write_text("not a jpeg")
    unreadable = runner.invoke(app, ["predict", str(image), "--model", str(trained[2])])
    assert unreadable.exit_code == 1 and f"{image}: not a readable image" in unreadable.output


def test_help_does_not_import_tensorflow():
    code = "import sys; from pipelines.cli import app; assert 'tensorflow' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_sigterm_leaves_the_old_bundle_and_resume_finishes(trained, tmp_path):
    import os
    import shutil
    import signal
    import time

    train_dir, test_dir, bundle = trained
    out = tmp_path / "bundle"
    shutil.copytree(bundle, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    command = [sys.executable, "-m", "pipelines.cli", "train", "--train", str(train_dir), "--test", str(test_dir),
               "--out", str(out), "--epochs", "200", *TINY]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    checkpoint = tmp_path / ".bundle.checkpoint" / "state.json"
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and "interrupted" in stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the previous bundle is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == [".bundle.checkpoint", "bundle"]  # no half-written files
    done = json.loads(checkpoint.read_text())["epoch"]
    assert 1 <= done < 200

    result = runner.invoke(app, ["train", "--train", str(train_dir), "--test", str(test_dir), "--out", str(out),
                                 "--epochs", str(done + 1), "--resume", *TINY])
    assert result.exit_code == 0, result.output
    history = json.loads((out / "metadata.json").read_text())["history"]
    assert len(history["loss"]) == done + 1  # earlier epochs kept, one more trained
    assert not (tmp_path / ".bundle.checkpoint").exists()
    assert os.listdir(tmp_path) == ["bundle"]


def test_resume_without_a_checkpoint_is_a_clear_error(trained, tmp_path):
    train_dir, test_dir, _ = trained
    result = runner.invoke(app, ["train", "--train", str(train_dir), "--test", str(test_dir),
                                 "--out", str(tmp_path / "b"), "--resume", *TINY])
    assert result.exit_code == 1 and "no checkpoint to resume from" in result.output


def test_train_checks_the_whole_dataset_first_and_lists_every_problem(tmp_path):
    import shutil

    train_dir, test_dir = make_digits_dataset(tmp_path, classes=3)
    photo = sorted((train_dir / "digit 0").iterdir())[0]
    truncated = train_dir / "digit 0" / "truncated.jpg"
    from PIL import Image

    Image.open(photo).convert("RGB").save(truncated, format="JPEG")
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    (train_dir / "digit 1" / "notes.jpg").write_text("not an image, whatever the name says")
    for extra in sorted((train_dir / "digit 2").iterdir())[1:]:
        extra.unlink()
    shutil.copytree(test_dir / "digit 0", test_dir / "digit 9")
    result = runner.invoke(app, ["train", "--train", str(train_dir), "--test", str(test_dir),
                                 "--out", str(tmp_path / "never"), "--epochs", "1", *TINY])
    assert result.exit_code == 1
    for named in ("truncated.jpg", "notes.jpg", "digit 2", "digit 9"):
        assert named in result.output, named
    assert "dataset validation failed" in result.output and not (tmp_path / "never").exists()


def test_predict_into_a_pipe_closed_early_is_not_an_error(trained):
    train_dir, _, bundle = trained
    images = [str(p) for p in sorted(train_dir.rglob("*.png"))]
    command = f"{sys.executable} -m pipelines.cli predict {' '.join(map(repr, images))} --model {bundle} | head -1"
    done = subprocess.run(["bash", "-o", "pipefail", "-c", command], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(done.stdout.splitlines()) == 1 and "Traceback" not in done.stderr


def test_set_preset_selects_a_preset_by_name_only(tmp_path):
    """`--set preset=NAME` is the README's form; a path is not a preset name."""
    train = ["train", "--train", str(tmp_path), "--test", str(tmp_path), "--out", str(tmp_path / "b")]
    accepted = runner.invoke(app, [*train, "--set", "preset=fast-cpu", "--set", "model.input_size=0"])
    assert accepted.exit_code == 1 and "input_size" in accepted.output and "preset" not in accepted.output
    out = CliRunner().invoke(app, ["train", "--train", str(tmp_path), "--test", str(tmp_path), "--out",
                                   str(tmp_path / "b"), "--set", "preset=../../../tmp/x"])
    assert out.exit_code == 1 and "unknown preset '../../../tmp/x'" in out.output and "Traceback" not in out.output


def test_a_bad_argument_is_answered_before_tensorflow_loads(tmp_path):
    """Paths, the model folder and the port are checked first: one line naming the argument, and TensorFlow
    is never imported (its import is what made every error take seconds)."""
    import socket

    folder = tmp_path / "folder"
    folder.mkdir()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = (
            "import sys\n"
            "from typer.testing import CliRunner\n"
            "from pipelines.cli import app\n"
            f"cases = [(['predict', '{tmp_path}/no.png', '--model', '{folder}'], 'IMAGES: {tmp_path}/no.png: does not exist'),\n"
            f"         (['train', '--train', '{folder}', '--test', '{tmp_path}/t', '--out', 'o'], '--test: {tmp_path}/t: does not exist'),\n"
            f"         (['evaluate', '--model', '{folder}', '--test', '{folder}', '--heldout', '{tmp_path}/h'], '--heldout: '),\n"
            f"         (['enroll', '{tmp_path}/new', '--model', '{folder}'], 'FOLDER: {tmp_path}/new: does not exist'),\n"
            f"         (['serve', '--port', '{port}'], '--port {port}: cannot listen on 127.0.0.1:{port}')]\n"
            "for args, expected in cases:\n"
            "    result = CliRunner().invoke(app, args)\n"
            "    assert result.exit_code == 1 and expected in result.output, (args, result.output)\n"
            "    assert len(result.output.strip().splitlines()) == 1, result.output\n"
            "assert 'tensorflow' not in sys.modules, 'an argument error loaded TensorFlow'\n"
        )
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
