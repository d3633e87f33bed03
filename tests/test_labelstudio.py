"""The review queue through Label Studio, started for real from its own virtual environment, as teams run it.

Set-up (once): ``python3 -m venv .venv-labelstudio && .venv-labelstudio/bin/pip install -c constraints-labelstudio.txt label-studio==1.23.2``
(or point ``$SIAMESE_LABEL_STUDIO`` at a ``label-studio`` executable). Without it the test skips. Slow: Label
Studio's first start migrates its database (about a minute).
"""

from __future__ import annotations

import json

import pytest

from support.labelstudio import TOKEN, running_label_studio
from support.messy import noise, write


@pytest.fixture
def label_studio(tmp_path):
    """A Label Studio server on a loopback port, its data in a temporary folder, with a user and an API token."""
    with running_label_studio(tmp_path) as url:
        yield url


@pytest.mark.slow
def test_review_tasks_go_to_label_studio_pre_annotated_and_labels_come_back(label_studio, tmp_path, monkeypatch):
    """Pending answers become tasks whose pre-annotation is the model's class; a person's labels (a class from the
    list, or a new one typed in) move the images to labelled/<class>/, which the feedback import reads."""
    from pipelines.labelstudio import LabelStudio, pull_labels, push_review

    review = tmp_path / "review"
    answers = [("digit 1", "a"), ("digit 2", "b"), ("digit 1", "c")]
    for row, (suggested, image) in enumerate(answers):
        folder = review / "pending" / suggested
        folder.mkdir(parents=True, exist_ok=True)
        write(folder / f"req{row}-0.png", noise(seed=row))
        (folder / f"req{row}-0.json").write_text(json.dumps({
            "request_id": f"req{row}", "sha256": f"{image * 64}", "model_version": "3", "decision": "unknown",
            "unknown_score": 0.8, "top_k": [{"label": suggested, "distance": 0.7}, {"label": "digit 0", "distance": 0.9}]}))
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", TOKEN)
    studio = LabelStudio(label_studio)
    sent = push_review(review, studio)
    assert (sent["sent"], sent["classes"]) == (3, ["digit 0", "digit 1", "digit 2"])
    assert push_review(review, studio)["sent"] == 0, "a task is sent once"
    tasks = studio.call("GET", f"/api/projects/{sent['project']}/tasks?page_size=100")
    tasks = tasks.get("tasks", tasks) if isinstance(tasks, dict) else tasks
    assert len(tasks) == 3
    for task in tasks:
        detail = studio.call("GET", f"/api/tasks/{task['id']}")
        [prediction] = detail["predictions"]
        row = int(detail["data"]["file"].removeprefix("req").split("-")[0])
        assert prediction["result"][0]["value"]["choices"] == [answers[row][0]]  # the model's class, pre-annotated
        sha = detail["data"]["sha256"]
        result = ([{"from_name": "new_class", "to_name": "image", "type": "textarea", "value": {"text": ["letter a"]}}]
                  if sha.startswith("a") else
                  [{"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": ["digit 2"]}}]
                  if sha.startswith("b") else None)
        if result is not None:  # the third task stays unlabelled
            studio.call("POST", f"/api/tasks/{task['id']}/annotations", {"result": result})
    pulled = pull_labels(review, studio)
    assert pulled["labelled"] == {"letter a": 1, "digit 2": 1}
    assert sorted(p.name for p in (review / "labelled").rglob("*")) == [
        "digit 2", "letter a", "req0-0.json", "req0-0.png", "req1-0.json", "req1-0.png"]
    assert sorted(p.name for p in (review / "pending").rglob("*.png")) == ["req2-0.png"]
