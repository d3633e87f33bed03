"""The review queue in Label Studio: pending images go out as tasks with the model's answer as a pre-annotation,
and the labels people give come back as ``labelled/<class>/`` folders for ``siamese feedback import``.

Label Studio runs as its own service (its own virtual environment or container); this module only speaks its
REST API with a personal access or legacy token (``$LABEL_STUDIO_API_KEY``). A task carries the image itself
(a data URI), the request id, the sha256 and the model's top-k; its pre-annotation is the model's first class.
People pick a class, or type a new one in the text box. :func:`pull_labels` moves each labelled image (and its
``.json``) from ``pending/`` to ``labelled/<class>/``; an image nobody labelled yet stays where it is.
"""

from __future__ import annotations

import base64
import json
import mimetypes
import os
import urllib.error
import urllib.request
from pathlib import Path
from xml.sax.saxutils import quoteattr

from siamese_core.errors import ConfigError

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

    def project(self, title: str, classes: list[str]) -> int:
        """The id of the project ``title``, created with a single-choice config over ``classes`` if missing."""
        projects = self.call("GET", "/api/projects?page_size=1000")
        for project in projects.get("results", projects) if isinstance(projects, dict) else projects:
            if project["title"] == title:
                return int(project["id"])
        choices = "".join(f"<Choice value={quoteattr(name)}/>" for name in classes)
        config = ("<View><Image name='image' value='$image'/><Text name='answer' value='$answer'/>"
                  f"<Choices name='label' toName='image' choice='single' showInline='true'>{choices}</Choices>"
                  "<TextArea name='new_class' toName='image' placeholder='or a class not in the list' "
                  "maxSubmissions='1'/></View>")
        return int(self.call("POST", "/api/projects", {"title": title, "label_config": config})["id"])


def _pending(review_dir: Path) -> list[tuple[Path, dict]]:
    found = []
    for sidecar in sorted((review_dir / "pending").glob("*/*.json")):
        images = [p for p in sidecar.parent.glob(sidecar.stem + ".*") if p.suffix != ".json"]
        if images:
            found.append((images[0], json.loads(sidecar.read_text(encoding="utf-8"))))
    return found


def push_review(review_dir: str | os.PathLike, studio: LabelStudio, title: str = PROJECT_TITLE) -> dict:
    """Send every pending image not sent before as a task with the model's answer pre-annotated."""
    review_dir = Path(review_dir)
    pending = [(image, answer) for image, answer in _pending(review_dir) if "label_studio_task" not in answer]
    classes = sorted({entry["label"] for _, answer in _pending(review_dir) for entry in answer.get("top_k", [])})
    project = studio.project(title, classes)
    tasks = []
    for image, answer in pending:
        mime = mimetypes.guess_type(image.name)[0] or "image/png"
        top_k = ", ".join(f"{e['label']} {e['distance']:.3f}" for e in answer.get("top_k", []))
        suggested = answer["top_k"][0]["label"] if answer.get("top_k") else None
        tasks.append({
            "data": {"image": f"data:{mime};base64,{base64.b64encode(image.read_bytes()).decode()}",
                     "request_id": answer["request_id"], "sha256": answer["sha256"], "file": image.name,
                     "answer": f"model v{answer.get('model_version')}: {answer.get('decision')} "
                               f"(score {answer.get('unknown_score')}); nearest: {top_k}"},
            "predictions": [] if suggested is None else [{
                "model_version": str(answer.get("model_version")), "score": 1.0 - float(answer.get("unknown_score") or 0),
                "result": [{"from_name": "label", "to_name": "image", "type": "choices",
                            "value": {"choices": [suggested]}}]}]})
    if tasks:
        studio.call("POST", f"/api/projects/{project}/import", tasks)
    for image, answer in pending:  # sent: never sent twice
        image.with_suffix(".json").write_text(json.dumps({**answer, "label_studio_task": project}, indent=1))
    return {"project": project, "sent": len(tasks), "classes": classes}


def _label_of(task: dict) -> str | None:
    for annotation in task.get("annotations", []):
        if annotation.get("was_cancelled"):
            continue
        values = {item["from_name"]: item["value"] for item in annotation.get("result", [])}
        typed = [t.strip() for t in values.get("new_class", {}).get("text", []) if t.strip()]
        chosen = values.get("label", {}).get("choices", [])
        return typed[0] if typed else (chosen[0] if chosen else None)
    return None


def pull_labels(review_dir: str | os.PathLike, studio: LabelStudio, title: str = PROJECT_TITLE) -> dict:
    """Move each pending image people labelled in Label Studio to ``labelled/<class>/`` (with its ``.json``)."""
    review_dir = Path(review_dir)
    project = studio.project(title, [])
    labels = {task["data"]["sha256"]: _label_of(task)
              for task in studio.call("GET", f"/api/projects/{project}/export?exportType=JSON")}
    moved: dict[str, int] = {}
    for image, answer in _pending(review_dir):
        label = labels.get(answer["sha256"])
        if not label or "/" in label or label.startswith("."):
            continue
        target = review_dir / "labelled" / label
        target.mkdir(parents=True, exist_ok=True)
        for item in (image, image.with_suffix(".json")):
            os.replace(item, target / item.name)
        moved[label] = moved.get(label, 0) + 1
    return {"project": project, "labelled": moved}
