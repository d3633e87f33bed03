"""The review queue in Label Studio: pending images go out as tasks with the model's answer as a pre-annotation,
and the labels people give come back as ``labelled/<class>/`` folders for ``siamese feedback import``.

Label Studio runs as its own service (its own virtual environment or container); this module only speaks its
REST API with a personal access or legacy token (``$LABEL_STUDIO_API_KEY``). A task carries the image itself
(a data URI), the request id, the sha256 and the model's top-k; its pre-annotation is the model's first class.
People pick a class, or type a new one in the text box. :func:`pull_labels` moves each labelled image (and its
``.json``) from ``pending/`` to ``labelled/<class>/``; an image nobody labelled yet stays where it is, and so does
one whose label is refused (no fit class name, or another spelling of a known class), in one line naming the task.
An erasure (:mod:`pipelines.erasure`) lists a project's tasks, deletes those that show or name what it erases, and
takes the class out of the project's choices.
"""

from __future__ import annotations

import base64
import hashlib
import json
import mimetypes
import os
import urllib.error
import urllib.request
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from xml.sax.saxutils import quoteattr

from siamese_core.data import printable
from siamese_core.errors import ConfigError
from siamese_core.io import atomic_path

from .feedback import case_clash, class_folders, class_key, inside, name_problem, shown

PROJECT_TITLE = "siamese review"
TOKEN_VARIABLE = "LABEL_STUDIO_API_KEY"


class LabelStudio:
    """A Label Studio server at ``url``, called with ``token``."""

    def __init__(self, url: str, token: str | None = None):
        self.url = url.rstrip("/")
        self.token = token or os.environ.get(TOKEN_VARIABLE, "")
        if not self.token:
            raise ConfigError(f"Label Studio at {self.url}: set ${TOKEN_VARIABLE} to an API token "
                              "(Account & Settings in its UI)")

    def call(self, method: str, path: str, body=None):
        """One JSON request; a refusal is a ConfigError naming the server, the path and its answer."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.url}{path}", data=data, method=method, headers={
            "Authorization": f"Token {self.token}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                text = response.read()
        except urllib.error.HTTPError as error:
            raise ConfigError(f"Label Studio {method} {path}: HTTP {error.code} {error.read()[:300]!r}") from None
        except OSError as error:
            raise ConfigError(f"Label Studio at {self.url} does not answer ({error})") from None
        return json.loads(text) if text else None

    def find_project(self, title: str) -> int | None:
        """The id of the project ``title``, or None."""
        projects = self.call("GET", "/api/projects?page_size=1000")
        for project in projects.get("results", projects) if isinstance(projects, dict) else projects:
            if project["title"] == title:
                return int(project["id"])
        return None

    def project(self, title: str, classes: list[str]) -> int:
        """The id of the project ``title``, created with a single-choice config over ``classes`` if missing."""
        found = self.find_project(title)
        if found is not None:
            return found
        choices = "".join(f"<Choice value={quoteattr(name)}/>" for name in classes)
        config = ("<View><Image name='image' value='$image'/><Text name='answer' value='$answer'/>"
                  f"<Choices name='label' toName='image' choice='single' showInline='true'>{choices}</Choices>"
                  "<TextArea name='new_class' toName='image' placeholder='or a class not in the list' "
                  "maxSubmissions='1'/></View>")
        return int(self.call("POST", "/api/projects", {"title": title, "label_config": config})["id"])

    def tasks(self, project: int) -> list[dict]:
        """Every task of ``project``, with its data, predictions, annotations and drafts."""
        tasks: list[dict] = []
        while True:
            page = self.call("GET", f"/api/tasks?project={project}&fields=all&page_size=100&page={len(tasks) // 100 + 1}")
            tasks += page["tasks"]
            if not page["tasks"] or len(tasks) >= page["total"]:
                return tasks

    def delete_tasks(self, ids: list[int]) -> None:
        """Delete tasks, with their predictions, annotations and drafts."""
        for task in ids:
            self.call("DELETE", f"/api/tasks/{task}/")

    def drop_choice(self, project: int, name: str) -> None:
        """Take the class ``name`` out of the project's choices (once no task is labelled with it)."""
        config = ElementTree.fromstring(self.call("GET", f"/api/projects/{project}")["label_config"])
        found = [(parent, choice) for parent in config.iter() for choice in parent
                 if choice.tag == "Choice" and choice.get("value") == name]
        for parent, choice in found:
            parent.remove(choice)
        if found:
            self.call("PATCH", f"/api/projects/{project}", {"label_config": ElementTree.tostring(config, "unicode")})


def task_image_digest(task: dict) -> str | None:
    """The sha256 of the image a task shows when the task holds it (a data URI), else None."""
    image = (task.get("data") or {}).get("image")
    if not isinstance(image, str) or not image.startswith("data:") or ";base64," not in image:
        return None
    try:
        return hashlib.sha256(base64.b64decode(image.partition(";base64,")[2], validate=True)).hexdigest()
    except ValueError:
        return None


def _pending(review_dir: Path) -> tuple[list[tuple[Path, dict]], list[str]]:
    """The pending images with what the model answered, and a line for each sidecar that cannot be used (a link, not
    the JSON the review queue writes, no image beside it)."""
    found, problems = [], []
    entries = sorted((review_dir / "pending").glob("*/*"))
    images: dict[Path, Path] = {}
    for entry in entries:
        if entry.suffix != ".json":
            images.setdefault(entry.with_suffix(""), entry)
    for sidecar in (entry for entry in entries if entry.suffix == ".json"):
        image = images.get(sidecar.with_suffix(""))
        if image is None:
            problems.append(f"{printable(sidecar)}: no image beside it")
            continue
        if sidecar.parent.is_symlink() or any(p.is_symlink() or not p.is_file() for p in (sidecar, image)):
            problems.append(f"{printable(sidecar)}: it, its image or its folder is a link or not a regular file; "
                            "left as it is")
            continue
        try:
            answer = json.loads(sidecar.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            problems.append(f"{printable(sidecar)}: unreadable ({exc})")
            continue
        if not isinstance(answer, dict) or not isinstance(answer.get("sha256"), str):
            problems.append(f"{printable(sidecar)}: not the JSON the review queue writes")
        else:
            found.append((image, answer))
    return found, problems


def _keep(sidecar: Path, answer: dict) -> None:
    """Rewrite a sidecar whole, readable by its owner only."""
    with atomic_path(sidecar) as tmp:
        tmp.write_text(json.dumps(answer, indent=1), encoding="utf-8")
        tmp.chmod(0o600)


def push_review(review_dir: str | os.PathLike, studio: LabelStudio, title: str = PROJECT_TITLE) -> dict:
    """Send every pending image not sent before as a task with the model's answer pre-annotated; ``skipped`` lists
    the sidecars that could not be used, one line each."""
    review_dir = Path(review_dir)
    everything, skipped = _pending(review_dir)
    pending = [(image, answer) for image, answer in everything if "label_studio_task" not in answer]
    classes = sorted({entry["label"] for _, answer in everything for entry in answer.get("top_k", [])})
    project = studio.project(title, classes)
    tasks = []
    for image, answer in pending:
        mime = mimetypes.guess_type(image.name)[0] or "image/png"
        top_k = ", ".join(f"{e['label']} {e['distance']:.3f}" for e in answer.get("top_k", []))
        suggested = answer["top_k"][0]["label"] if answer.get("top_k") else None
        tasks.append({
            "data": {"image": f"data:{mime};base64,{base64.b64encode(image.read_bytes()).decode()}",
                     "request_id": answer.get("request_id"), "sha256": answer["sha256"], "file": image.name,
                     "answer": f"model v{answer.get('model_version')}: {answer.get('decision')} "
                               f"(score {answer.get('unknown_score')}); nearest: {top_k}"},
            "predictions": [] if suggested is None else [{
                "model_version": str(answer.get("model_version")), "score": 1.0 - float(answer.get("unknown_score") or 0),
                "result": [{"from_name": "label", "to_name": "image", "type": "choices",
                            "value": {"choices": [suggested]}}]}]})
    if tasks:
        studio.call("POST", f"/api/projects/{project}/import", tasks)
    for image, answer in pending:  # sent: never sent twice
        _keep(image.with_suffix(".json"), {**answer, "label_studio_task": project})
    return {"project": project, "sent": len(tasks), "classes": classes, "skipped": skipped}


def _given(values: dict, name: str, key: str) -> list:
    """What an annotation's result holds for the control ``name`` (``key``: its kind of value), [] if nothing."""
    value = values.get(name)
    given = value.get(key) if isinstance(value, dict) else None
    return given if isinstance(given, list) else []


def _label_of(task: dict) -> object:
    """The label people gave a task (a class typed in wins over one chosen), as the server sent it; None if none."""
    for annotation in task.get("annotations") or []:
        if not isinstance(annotation, dict) or annotation.get("was_cancelled"):
            continue
        values = {item.get("from_name"): item.get("value") for item in annotation.get("result") or []
                  if isinstance(item, dict)}
        typed = [t for t in _given(values, "new_class", "text") if not isinstance(t, str) or t.strip()]
        chosen = _given(values, "label", "choices")
        label = typed[0] if typed else (chosen[0] if chosen else None)
        return label.strip() if isinstance(label, str) else label
    return None


def _label_problem(label: object, known: dict[str, str], labelled: Path) -> str | None:
    """What is wrong with ``label`` as the class of ``labelled/<label>/``, beside the ``known`` classes."""
    if not isinstance(label, str):
        return "not text"
    return name_problem(label) or case_clash(label, known) or (
        None if inside(labelled / label, labelled) else "its folder in labelled/ is a link leaving it")


def pull_labels(review_dir: str | os.PathLike, studio: LabelStudio, title: str = PROJECT_TITLE,
                train_dir: str | os.PathLike | None = None) -> dict:
    """Move each pending image people labelled in Label Studio to ``labelled/<class>/`` (with its ``.json``).

    A label that is no fit class name (:func:`~pipelines.feedback.name_problem`), or another spelling of a class of
    ``train_dir`` or of ``labelled/``, is refused: one line in ``refused`` naming the task and the problem, and its
    image stays pending. ``waiting`` counts the pending images nobody labelled yet.
    """
    review_dir = Path(review_dir)
    labelled = review_dir / "labelled"
    project = studio.project(title, [])
    labels: dict[str, tuple[object, object]] = {}
    for task in studio.call("GET", f"/api/projects/{project}/export?exportType=JSON") or []:
        data = task.get("data") if isinstance(task, dict) else None
        if isinstance(data, dict) and isinstance(data.get("sha256"), str):
            labels[data["sha256"]] = (task.get("id"), _label_of(task))
    known = {class_key(name): name for folder in (train_dir, labelled) if folder is not None
             for name in class_folders(folder)}
    pending, refused = _pending(review_dir)
    moved: dict[str, int] = {}
    waiting = 0
    for image, answer in pending:
        task, label = labels.get(answer["sha256"], (None, None))
        if label is None:
            waiting += 1
            continue
        problem = _label_problem(label, known, labelled)
        if problem:
            refused.append(f"task {shown(task)}: label '{shown(label)}': {problem}; {image.name} stays pending")
            continue
        label = str(label)
        known.setdefault(class_key(label), label)
        try:
            for level in (labelled, labelled / label):
                level.mkdir(mode=0o700, exist_ok=True)
            for item in (image, image.with_suffix(".json")):
                os.replace(item, labelled / label / item.name)
        except OSError as exc:
            refused.append(f"task {shown(task)}: {image.name} cannot move to {printable(labelled / label)} "
                           f"({exc.strerror or exc})")
            continue
        moved[label] = moved.get(label, 0) + 1
    return {"project": project, "labelled": moved, "refused": refused, "waiting": waiting}
