"""The review queue and the feedback import against hostile names and files, a full disk and an interrupt.

A client's request id, a served class, a reviewer's label and the folders of the review queue are outside
input: none of them decides where a file goes, every name is checked by one rule, and nothing is copied into
the training data before every check passed.
"""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pipelines.feedback import class_key, import_feedback, name_problem
from pipelines.inference_log import InferenceLog, ModelIdentity
from pipelines.params import MonitoringConfig
from siamese_core.data import IMAGE_SUFFIXES
from siamese_core.errors import DatasetError
from siamese_core.gallery import Match

from support.disks import tmpfs
from support.http import HOST
from support.messy import noise

HOSTILE_NAMES = {"NUL": "a\x00b", "300 characters": "x" * 300, "dot dot": "..", "dot": ".", "escape": "../escape",
                 "right-to-left override": "gpj.\u202eexe", "backslash": "a\\b", "not UTF-8": os.fsdecode(b"caf\xe9"),
                 "Windows device": "NUL", "empty": " "}


def _png(seed: int) -> bytes:
    buffer = io.BytesIO()
    noise(seed).save(buffer, format="PNG")
    return buffer.getvalue()


def _tree(root: Path) -> list[str]:
    return sorted(os.fsdecode(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("name", HOSTILE_NAMES.values(), ids=HOSTILE_NAMES.keys())
def test_the_name_rule_refuses_each_hostile_name(name):
    assert name_problem(name)


@pytest.mark.parametrize("name", ["digit 5", "Korean__character01", "猫", "Ärger mit Leerzeichen", "x" * 100])
def test_the_name_rule_takes_ordinary_class_names(name):
    assert name_problem(name) is None


def test_a_case_variant_shares_its_class_key():
    assert class_key("korean__character01") == class_key("Korean__character01")
    assert class_key("e\u0301") == class_key("\u00e9")  # the same letter, decomposed or not
    assert class_key("digit 1") != class_key("digit 2")


# The review queue's writer ------------------------------------------------------------------------------------------

def _log(tmp_path: Path, review_dir: Path) -> InferenceLog:
    settings = MonitoringConfig(log_uri=str(tmp_path / "log"), log_images=True, review_dir=str(review_dir),
                                flush_seconds=0.05, flush_records=1)
    return InferenceLog(settings.log_uri or "", settings, ModelIdentity("watched", "1"), "http")


def _unknown(image: bytes, inference_log: InferenceLog, request_id: str, suggested: str = "digit 1") -> None:
    match = Match(label="unknown", distance=0.9, top_k=[(suggested, 0.9), ("digit 2", 1.0)], unknown_score=0.9)
    inference_log.submit([image], [match], [("unknown", 0.9, True)], None, 1.0, request_id)


def test_a_request_id_or_a_served_class_never_steers_where_a_review_image_goes(tmp_path):
    """Row 1: request ids and a class name that climb out of the queue land as plain data in pending/."""
    review = tmp_path / "project" / "review"
    inference_log = _log(tmp_path, review)
    for n, request_id in enumerate(["../../../escaped/evil", "/etc/evil", "..", "a\x00b", "x" * 128]):
        _unknown(_png(n), inference_log, request_id)
    _unknown(_png(9), inference_log, "fine", suggested="../../train/Korean__character01")
    inference_log.close()
    assert inference_log.stats()["review"] == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log", "project"]
    assert [p.name for p in (tmp_path / "project").iterdir()] == ["review"]
    files = [p for p in review.rglob("*") if not p.is_dir()]
    assert len(files) == 12 and {p.parent.relative_to(review) for p in files} == {
        Path("pending/digit 1"), Path("pending/unknown")}
    sidecars = [p for p in files if p.suffix == ".json"]
    assert {json.loads(p.read_text())["request_id"] for p in sidecars} == {
        "../../../escaped/evil", "/etc/evil", "..", "a\x00b", "x" * 128, "fine"}  # kept as data, not a path
    [moved] = list((review / "pending" / "unknown").glob("*.json"))
    assert json.loads(moved.read_text())["top_k"][0]["label"] == "../../train/Korean__character01"


def test_review_images_and_sidecars_are_private(tmp_path):
    """Row 14 (the review queue): images and sidecars 0600, the folders the queue makes 0700."""
    review = tmp_path / "review"
    inference_log = _log(tmp_path, review)
    _unknown(_png(1), inference_log, "r1")
    inference_log.close()
    files = sorted((review / "pending").rglob("*.*"))
    assert [p.suffix for p in files] == [".json", ".png"]
    assert {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o600}
    assert {stat.S_IMODE(p.stat().st_mode) for p in (review, review / "pending", files[0].parent)} == {0o700}


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs: a real full disk (mounting needs root; the test skips without it)."""
    with tmpfs(tmp_path / "small", "size=256k") as path:
        yield path


def test_a_full_review_disk_leaves_no_part_of_an_item_and_warns_once_per_outage(tmp_path, small_disk, caplog):
    """Row 13: every item is whole or absent, lost items are counted, one warning when the outage starts and one
    when it ends."""
    review = small_disk / "review"
    inference_log = _log(tmp_path, review)
    _unknown(_png(0), inference_log, "before")
    deadline = time.monotonic() + 10
    while inference_log.stats()["review"] < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    filler = small_disk / "filler"
    with open(filler, "wb", buffering=0) as file, pytest.raises(OSError, match="No space left"):  # the disk, full
        while True:
            file.write(os.urandom(4096))
    with caplog.at_level(logging.WARNING, logger="pipelines.inference_log"):
        images = [_png(100 + n) for n in range(40)]
        for n, image in enumerate(images):
            _unknown(image, inference_log, f"full-{n}")
        deadline = time.monotonic() + 20
        while inference_log.stats()["review_lost"] < len(images) and time.monotonic() < deadline:
            time.sleep(0.05)
        filler.unlink()
        for n in range(3):
            _unknown(_png(200 + n), inference_log, f"after-{n}")
        inference_log.close()
    stats = inference_log.stats()
    assert (stats["written"], stats["review"], stats["review_lost"]) == (44, 4, 40), stats
    left = sorted((review / "pending").rglob("*"))
    items = [p for p in left if p.is_file()]
    assert len(items) == 8 and not [p for p in items if p.name.startswith(".")]
    for sidecar in (p for p in items if p.suffix == ".json"):
        assert json.loads(sidecar.read_text())["request_id"] in {"before", "after-0", "after-1", "after-2"}
    for image in (p for p in items if p.suffix == ".png"):
        assert image.read_bytes() in {_png(0), *(_png(200 + n) for n in range(3))}  # never truncated
    warnings = [r.getMessage() for r in caplog.records if "review queue" in r.getMessage()]
    assert len(warnings) == 2, warnings
    assert "cannot keep images" in warnings[0] and "No space left" in warnings[0]
    assert "keeping images again (40 lost in all)" in warnings[1]


# The feedback import ------------------------------------------------------------------------------------------------

@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project folder with data/train (two classes) and an empty review/labelled/, as the working directory."""
    monkeypatch.chdir(tmp_path)
    for n, label in enumerate(["Korean__character01", "digit 1"]):
        (tmp_path / "data" / "train" / label).mkdir(parents=True)
        (tmp_path / "data" / "train" / label / "00.png").write_bytes(_png(1000 + n))
    (tmp_path / "review" / "labelled").mkdir(parents=True)
    return tmp_path


def _labelled(project: Path, label: str | bytes, *seeds: int) -> Path:
    folder = project / "review" / "labelled"
    folder = Path(os.fsdecode(os.path.join(os.fsencode(folder), os.fsencode(label))))
    folder.mkdir(exist_ok=True)
    for seed in seeds:
        (folder / f"{seed}.png").write_bytes(_png(seed))
        (folder / f"{seed}.json").write_text(json.dumps({"request_id": f"r{seed}", "sha256": "", "label": "unknown"}))
    return folder


def _refused(project: Path) -> list[str]:
    before = _tree(project)
    with pytest.raises(DatasetError) as refused:
        import_feedback(project / "review" / "labelled", project / "data" / "train", by="alice", dvc=False)
    assert _tree(project) == before, "nothing copied, moved or written"
    first, *lines = str(refused.value).splitlines()
    assert first.endswith(f"nothing was imported, {len(lines)} problem(s) to fix first:")
    return [line.strip() for line in lines]


def test_a_linked_class_folder_or_image_is_refused_and_nothing_moves(project, tmp_path):
    """Row 10: a class folder that links outside the queue, or an image that links anywhere, is refused; the
    folder it points to keeps its files."""
    outside = tmp_path / "outside"
    outside.mkdir()
    for seed in range(6):
        (outside / f"{seed}.png").write_bytes(_png(seed))
    (project / "review" / "labelled" / "evil").symlink_to(outside)
    good = _labelled(project, "digit 7", 10, 11)
    (good / "linked.png").symlink_to(outside / "0.png")
    (outside / "secret.json").write_text("{}")
    (good / "11.json").unlink()
    (good / "11.json").symlink_to(outside / "secret.json")
    lines = _refused(project)
    assert lines == [f"{project}/review/labelled/digit 7/11.json: a link, not a regular file",
                     f"{project}/review/labelled/digit 7/linked.png: a link, not a regular file",
                     f"{project}/review/labelled/evil: a link, not a <class>/ folder"]
    assert len(list(outside.iterdir())) == 7


def test_a_name_that_is_not_utf8_is_refused_before_anything_is_copied(project):
    """Row 11: a class folder whose name is not UTF-8 is one line (its bytes shown as \\xNN), not a traceback."""
    _labelled(project, b"caf\xe9", 1, 2, 3)
    _labelled(project, "digit 7", 4)
    assert _refused(project) == [f"{project}/review/labelled/caf\\xe9: class not valid UTF-8"]


def test_the_command_line_names_each_problem_in_one_line_without_a_traceback(project):
    """Rows 10-12 through ``siamese feedback import``: exit status 1, a line per problem, nothing imported."""
    _labelled(project, b"caf\xe9", 1)
    _labelled(project, "korean__character01", 2)
    os.mkfifo(_labelled(project, "digit 7", 3) / "pipe.png")
    result = subprocess.run([sys.executable, "-m", "pipelines.cli", "feedback", "import", "review/labelled", "--into",
                             "data/train", "--by", "alice", "--no-dvc"], capture_output=True, text=True, timeout=120,
                            cwd=project)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.splitlines() == [
        "error: review/labelled: nothing was imported, 3 problem(s) to fix first:",
        "  review/labelled/caf\\xe9: class not valid UTF-8",
        "  review/labelled/digit 7/pipe.png: a FIFO, not a regular file",
        "  review/labelled/korean__character01: class differs only in case or Unicode form from the class "
        "'Korean__character01'"]
    assert not list((project / "data" / "train").rglob("feedback-*")) and not (project / "feedback").exists()


def test_text_that_is_not_utf8_in_a_sidecar_never_stops_the_manifest(project):
    """Row 11: the manifest is written whatever the review queue's sidecar holds."""
    folder = _labelled(project, "digit 7", 4)
    (folder / "4.json").write_text('{"request_id": "bad \\udce9 \\ud800", "model_version": 3}')
    done = import_feedback(project / "review" / "labelled", "data/train", by="alice", dvc=False)
    manifest = json.loads(Path(done["manifest"]).read_text(encoding="utf-8"))
    assert manifest["images"][0]["request_id"] == "bad \\udce9 \\ud800" and manifest["images"][0]["model_version"] == "3"


@pytest.mark.timeout(60)
def test_hostile_names_case_variants_an_image_in_two_classes_and_a_fifo_each_one_line(project):
    """Rows 10-12: every problem is found before anything is copied, one line each; a FIFO is never opened."""
    labelled = project / "review" / "labelled"
    _labelled(project, "korean__character01", 1)  # another spelling of a class in train
    _labelled(project, "letter a", 2)
    _labelled(project, "Letter A", 4)  # two spellings side by side: both refused
    _labelled(project, "letter b", 3)
    _labelled(project, "letter c", 3, 5)  # 3.png: the same image as letter b/3.png
    os.mkfifo(labelled / "letter c" / "pipe.png")
    (labelled / "letter c" / "notes.txt").write_text("hello")
    (labelled / "letter c" / "broken.png").write_bytes(b"\x89PNG not really")
    _labelled(project, "\u202eevil", 6)
    _labelled(project, "x" * 101, 7)
    (labelled / "loose.png").write_bytes(_png(8))
    (labelled / ".DS_Store").write_bytes(b"hidden: passed over")
    root = f"{project}/review/labelled"
    assert _refused(project) == [
        f"{root}/Letter A: class differs only in case or Unicode form from the class 'letter a' beside it",
        f"{root}/korean__character01: class differs only in case or Unicode form from the class 'Korean__character01'",
        f"{root}/letter a: class differs only in case or Unicode form from the class 'Letter A' beside it",
        f"{root}/letter c/3.png: the same image as {root}/letter b/3.png, in the class 'letter b'; keep it in one class",
        f"{root}/letter c/broken.png: not a readable image",
        f"{root}/letter c/notes.txt: not an image ({', '.join(sorted(IMAGE_SUFFIXES))})",
        f"{root}/letter c/pipe.png: a FIFO, not a regular file",
        f"{root}/loose.png: a file, not a <class>/ folder",
        f"{root}/{'x' * 60}...: class too long (101 characters; at most 100, and 255 bytes in UTF-8)",
        f"{root}/\\u202eevil: class holds the control or invisible character U+202E",
    ]


def test_an_import_adds_each_image_once_with_a_manifest_and_keeps_the_queue_private(project):
    _labelled(project, "Korean__character01", 1, 2)
    _labelled(project, "letter a", 3)
    done = import_feedback(project / "review" / "labelled", "data/train", by="alice", dvc=False)
    assert (len(done["images"]), done["classes"]) == (3, ["Korean__character01", "letter a"])
    assert len(list((project / "data" / "train" / "Korean__character01").glob("feedback-*.png"))) == 2
    imported = project / "review" / "imported" / done["batch"]
    assert sorted(p.name for p in imported.rglob("*")) == ["1.json", "1.png", "2.json", "2.png", "3.json", "3.png",
                                                          "Korean__character01", "letter a"]
    assert {stat.S_IMODE(p.stat().st_mode) for p in (imported.parent, imported, imported / "letter a")} == {0o700}
    assert not [p for p in (project / "data").iterdir() if p.name.startswith(".")], "no staging folder left"


def test_an_interrupt_while_copying_leaves_nothing_half_imported(project, monkeypatch):
    """Ctrl-C during the copies: the training data, the queue and feedback/ are as they were."""
    _labelled(project, "letter a", 1, 2, 3)
    before = _tree(project)
    write_bytes, copies = Path.write_bytes, []

    def interrupted(path, data):
        copies.append(path)
        if len(copies) == 2:
            raise KeyboardInterrupt
        return write_bytes(path, data)

    monkeypatch.setattr(Path, "write_bytes", interrupted)
    with pytest.raises(KeyboardInterrupt):
        import_feedback(project / "review" / "labelled", "data/train", by="alice", dvc=False)
    assert len(copies) == 2 and _tree(project) == before


def test_an_interrupt_while_placing_waits_until_the_import_is_whole(project, monkeypatch):
    """SIGINT between the renames that place the images: it takes effect once manifest, images and moves are done."""
    _labelled(project, "letter a", 1, 2, 3)
    replace, calls = os.replace, []

    def signalled(source, target):
        calls.append(target)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return replace(source, target)

    monkeypatch.setattr(os, "replace", signalled)
    with pytest.raises(KeyboardInterrupt):
        import_feedback(project / "review" / "labelled", "data/train", by="alice", dvc=False)
    assert len(list((project / "data" / "train" / "letter a").glob("feedback-*.png"))) == 3
    assert len(list(Path("feedback").glob("*.json"))) == 1
    assert not list((project / "review" / "labelled" / "letter a").iterdir())


# Review pull against a Label Studio that answers as the real one does --------------------------------------------

class _FakeLabelStudio(BaseHTTPRequestHandler):
    """The two calls a pull makes: the project list and the project's JSON export."""

    tasks: list[dict] = []
    imported: list[dict] = []

    def do_GET(self):  # noqa: N802 (http.server's name)
        self._answer({"count": 1, "results": [{"id": 4, "title": "siamese review"}]} if self.path.startswith("/api/projects?")
                     else self.tasks if self.path == "/api/projects/4/export?exportType=JSON" else None)

    def do_POST(self):  # noqa: N802
        tasks = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/api/projects/4/import":
            self.imported.extend(tasks)
        self._answer({"task_count": len(tasks)} if self.path == "/api/projects/4/import" else None)

    def _answer(self, body):
        if self.headers.get("Authorization") != "Token test-token" or body is None:
            self.send_error(404 if body is None else 401)
            return
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def label_studio():
    server = ThreadingHTTPServer((HOST, 0), _FakeLabelStudio)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://{HOST}:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _task(task_id: int, sha256: str, label: str | None, typed: bool = True) -> dict:
    result = ([] if label is None else
              [{"from_name": "new_class", "to_name": "image", "type": "textarea", "value": {"text": [label]}}] if typed
              else [{"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": [label]}}])
    return {"id": task_id, "data": {"sha256": sha256, "request_id": f"r{task_id}"},
            "annotations": [{"id": 100 + task_id, "was_cancelled": False, "result": result}] if result else []}


def test_review_pull_refuses_each_hostile_label_in_one_line_and_pulls_the_rest(project, label_studio, write_params):
    """Row 18: NUL, 300 characters, .., ../escape, U+202E, a\\b and a case variant of a training class are refused,
    one line per task naming it and the problem, with no traceback; the good labels are pulled; the refused and the
    unlabelled images stay pending, and the counts say so."""
    labels = {11: "a\x00b", 12: "x" * 300, 13: "..", 14: "../escape", 15: "gpj.\u202eexe", 16: "a\\b",
              17: "korean__character01", 18: "Korean__character01", 19: "letter a", 20: None}
    pending = project / "review" / "pending" / "unknown"
    pending.mkdir(parents=True)
    tasks = []
    for task_id, label in labels.items():
        sha = f"{task_id:064x}"
        (pending / f"{task_id}.png").write_bytes(_png(task_id))
        (pending / f"{task_id}.json").write_text(json.dumps({"request_id": f"r{task_id}", "sha256": sha}))
        tasks.append(_task(task_id, sha, label, typed=task_id != 18))
    _FakeLabelStudio.tasks = tasks
    params = write_params(project / "params.yaml", {"monitoring.review_dir": str(project / "review"),
                                                    "data.train_dir": str(project / "data" / "train")})
    result = subprocess.run([sys.executable, "-m", "pipelines.cli", "review", "pull", "--label-studio", label_studio,
                             "--params", str(params)], capture_output=True, text=True, timeout=120, cwd=project,
                            env={**os.environ, "LABEL_STUDIO_API_KEY": "test-token"})
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    refused = [line for line in result.stderr.splitlines() if line.startswith("refused: ")]
    stays = "stays pending"
    assert refused == [
        f"refused: task 11: label 'a\\u0000b': holds the control or invisible character U+0000; 11.png {stays}",
        f"refused: task 12: label '{'x' * 60}...': too long (300 characters; at most 100, and 255 bytes in UTF-8); "
        f"12.png {stays}",
        f"refused: task 13: label '..': starts with a dot (hidden, or . and ..); 13.png {stays}",
        f"refused: task 14: label '../escape': holds a path separator; 14.png {stays}",
        f"refused: task 15: label 'gpj.\\u202eexe': holds the control or invisible character U+202E; 15.png {stays}",
        f"refused: task 16: label 'a\\b': holds a path separator; 16.png {stays}",
        f"refused: task 17: label 'korean__character01': differs only in case or Unicode form from the class "
        f"'Korean__character01'; 17.png {stays}",
    ]
    assert result.stderr.strip().splitlines()[-1] == (
        "error: 7 refused (above): fix those labels in Label Studio, then pull again")
    assert result.stdout.splitlines() == ["labelled: Korean__character01 1, letter a 1",
                                          "pulled 2, refused 7, not labelled yet 1"]
    assert sorted(p.name for p in pending.glob("*.png")) == [f"{n}.png" for n in (11, 12, 13, 14, 15, 16, 17, 20)]
    assert _tree(project / "review" / "labelled") == ["Korean__character01", "Korean__character01/18.json",
                                                      "Korean__character01/18.png", "letter a", "letter a/19.json",
                                                      "letter a/19.png"]
    assert sorted(p.name for p in project.iterdir()) == ["data", "params.yaml", "review"]


def test_review_push_skips_a_broken_sidecar_in_one_line_and_keeps_the_queue_private(tmp_path, label_studio,
                                                                                    monkeypatch):
    """An empty .json (left by a full disk before the writer was atomic) is named and passed over; the sidecar of a
    sent image is rewritten whole, 0600."""
    from pipelines.labelstudio import LabelStudio, push_review

    pending = tmp_path / "review" / "pending" / "unknown"
    pending.mkdir(parents=True)
    (pending / "good.png").write_bytes(_png(1))
    (pending / "good.json").write_text(json.dumps({"request_id": "r1", "sha256": "a" * 64, "top_k": []}))
    (pending / "empty.png").write_bytes(_png(2))
    (pending / "empty.json").write_text("")
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "test-token")
    _FakeLabelStudio.imported = []
    done = push_review(tmp_path / "review", LabelStudio(label_studio))
    assert done["sent"] == 1 and [task["data"]["sha256"] for task in _FakeLabelStudio.imported] == ["a" * 64]
    [skipped] = done["skipped"]
    assert skipped.startswith(f"{pending}/empty.json: unreadable (")
    assert json.loads((pending / "good.json").read_text())["label_studio_task"] == 4
    assert stat.S_IMODE((pending / "good.json").stat().st_mode) == 0o600
