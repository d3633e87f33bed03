"""The README's walk-throughs run as pasted, in a fresh clone: the blocks are read from the README itself."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.doc_figures import outside_tolerance

from support.http import stop_group
from support.project import REPO

WALK_THROUGHS = ("Set-up on a fresh machine", "After the demo run", "Using your own data", "Serving")
TEST_COMMAND = "python -m pytest"
DEMO_OUTPUTS = {"dvc.lock", "metrics.json", "plots/confusion.csv", "plots/loss.csv", "plots/per_class.csv"}
# What `git status` may list after each walk-through, as the README says: the demo's outputs (metrics and plots
# only on another CPU type) until the own-data section commits them.
MAY_CHANGE = {"Set-up on a fresh machine": DEMO_OUTPUTS, "After the demo run": DEMO_OUTPUTS,
              "Using your own data": set(), "Serving": set()}  # the block CI runs itself (.ci/run), not run again here


def readme_blocks(text: str) -> list[tuple[str, str, bool]]:
    """Each ```bash block as (section, code, runs in a second terminal)."""
    blocks, section = [], ""
    for match in re.finditer(r"^## (?P<section>[^\n]+)$|^```bash\n(?P<code>.*?)^```$", text, re.M | re.S):
        if match["section"]:
            section = match["section"]
            continue
        paragraph = text[:match.start()].rstrip().rsplit("\n\n", 1)[-1]
        blocks.append((section, match["code"], "second terminal" in paragraph))
    return blocks


def _commands(shell: str) -> list[str]:
    """The commands of a shell text, one per `&&` step, without comments or line continuations."""
    lines = [line.split("  #")[0] for line in shell.replace("\\\n", " ").splitlines()]
    return [" ".join(step.split()) for line in lines for step in line.split("&&") if step.strip()]


def test_the_readme_test_command_is_what_ci_runs():
    """CI runs the README's install-and-test block, each command in its order (installing what only the slow tests
    need beside them); a README that drifts from .ci/run fails here."""
    blocks = [code for section, code, _ in readme_blocks((REPO / "README.md").read_text()) if TEST_COMMAND in code]
    assert len(blocks) == 1
    ci_text = (REPO / ".ci" / "run").read_text().split("set -euo pipefail", 1)[1].split("\n", 2)[2]
    ci = iter(_commands(ci_text.split("\n# Then the slow tests", 1)[0]))  # then CI runs the slow tests too
    assert all(command in ci for command in _commands(blocks[0]))  # `in` walks on: the README's order


@pytest.mark.slow
def test_the_readme_walk_throughs_run_as_pasted(tmp_path):
    """Set-up, after the demo run and own data, in a clone of this commit: each block as a user pastes it into
    one terminal (the venv the set-up made stays active); a second-terminal block runs beside, answers, and stops."""
    blocks = [block for block in readme_blocks((REPO / "README.md").read_text())
              if block[0] in WALK_THROUGHS and TEST_COMMAND not in block[1]]
    assert {section for section, _, _ in blocks} == set(WALK_THROUGHS)
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("MLFLOW_", "PREFECT_", "VIRTUAL_ENV", "DVC_"))}
    env |= {"HOME": str(tmp_path / "home"), "PREFECT_HOME": str(tmp_path / "prefect"),
            "PIP_CACHE_DIR": os.environ.get("PIP_CACHE_DIR", str(Path.home() / ".cache" / "pip")),
            "GIT_AUTHOR_NAME": "reader", "GIT_AUTHOR_EMAIL": "reader@example.com",
            "GIT_COMMITTER_NAME": "reader", "GIT_COMMITTER_EMAIL": "reader@example.com"}
    beside: list[subprocess.Popen] = []  # second-terminal blocks, running until their section ends
    try:
        for index, (section, code, second_terminal) in enumerate(blocks):
            if section == "Using your own data" and not (clone / "my-data").exists():
                shutil.copytree(clone / "data" / "demo", clone / "my-data")  # the user's images, in the layout asked for
            script = f"[ -f .venv/bin/activate ] && . .venv/bin/activate\nset -e\n{code}"
            if second_terminal:
                beside.append(_start_beside(script, clone, env, tmp_path / f"second-terminal-{index}.log"))
            else:
                done = _run_block(section, code, script, clone, env)
                if section == WALK_THROUGHS[0]:
                    assert "champion" in done.stdout + done.stderr
                    fresh, committed = (json.loads((root / "metrics.json").read_text()) for root in (clone, REPO))
                    assert not outside_tolerance(fresh, committed), outside_tolerance(fresh, committed)
                if section == "Serving":
                    assert '"predictions"' in done.stdout and '"label"' in done.stdout, done.stdout[-2000:]
                    photo = tmp_path / "photo.jpg"  # 300 KB and more of base64 than a command line takes
                    Image.fromarray(np.random.default_rng(0).integers(0, 256, (700, 900, 3), np.uint8)).save(photo)
                    asked = _run_block(section, code, script.replace("data/demo/test/Korean__character01/14.png",
                                                                     shlex.quote(str(photo))), clone, env)
                    assert photo.stat().st_size > 300_000 and '"predictions"' in asked.stdout, asked.stdout[-2000:]
            if index + 1 == len(blocks) or blocks[index + 1][0] != section:
                while beside:
                    stop_group(beside.pop())
                changed = set(_git_status(clone)) - MAY_CHANGE[section]
                assert not changed, f"after {section}, git status shows what the README does not say: {changed}"
    finally:
        for server in beside:
            stop_group(server)
    predicted = subprocess.run(["bash", "-c", ". .venv/bin/activate && siamese predict --json "
                                + shlex.quote(str(next((clone / "my-data" / "test").glob("*/*"))))
                                + " --model models:/siamese-recognizer@champion"],
                               cwd=clone, env=env, capture_output=True, text=True, check=False)
    assert predicted.returncode == 0 and '"label"' in predicted.stdout, predicted.stderr[-3000:]


def _git_status(repo: Path) -> list[str]:
    """The paths `git status` lists (modified, added or untracked)."""
    lines = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=repo, capture_output=True,
                           text=True, check=True).stdout.splitlines()
    return [line[3:] for line in lines]


def _run_block(section: str, code: str, script: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    done = subprocess.run(["bash", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=900,
                          check=False)
    assert done.returncode == 0, f"{section}:\n{code}\n{(done.stdout + done.stderr)[-5000:]}"
    return done


def _start_beside(script: str, cwd: Path, env: dict, log_path: Path) -> subprocess.Popen:
    """Start a long-running block and wait until the address it prints answers 200 (itself, or its /ping)."""
    with log_path.open("w") as log:
        server = subprocess.Popen(["bash", "-c", script], cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"the second-terminal block stopped:\n{log_path.read_text()[-3000:]}")
        address = re.search(r"http://127\.0\.0\.1:\d+/", log_path.read_text())
        for url in (address[0], address[0] + "ping") if address else ():
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        return server
            except OSError:
                pass
        time.sleep(1)
    stop_group(server)
    pytest.fail(f"the second-terminal block never answered:\n{log_path.read_text()[-3000:]}")
