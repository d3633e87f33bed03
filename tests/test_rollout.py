"""Shadow and canary rollouts on real `siamese serve` processes over one SQLite registry: a shadow changes no
client's answer and is logged with its agreement, the canary's share holds and sticks per client key on every
replica, and a challenger that fails its clients is rolled back by itself, from the counts of all replicas."""

from __future__ import annotations

import http.client
import json
import math
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from pipelines import registry, rollout
from pipelines.errors import RegistryError
from pipelines.monitoring import read_window
from pipelines.pyfunc_model import encode_image
from siamese_core.config import apply_overrides
from siamese_core.recognizer import SiameseRecognizer, store_threshold

from support.http import HOST, free_port, stop_group, wait_until_ready
from support.models import logged_scorer, make_tiny_bundle, pipeline_params, register_bundle, use_sqlite_store

SIAMESE = os.path.join(os.path.dirname(sys.executable), "siamese")


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """Three bundles of one network: the tiny trained one, one whose class names are rotated (every answer differs,
    nothing fails) and one that answers 'unknown' to everything (it fails its clients)."""
    root = tmp_path_factory.mktemp("bundles")
    tiny = make_tiny_bundle(root / "tiny")
    recognizer = SiameseRecognizer.load(tiny.path)
    names = recognizer.gallery.class_names
    rotated = replace(recognizer.gallery, class_names=names[1:] + names[:1])
    SiameseRecognizer(recognizer.embedding, rotated, recognizer.config).save(root / "rotated")
    strict = apply_overrides(recognizer.config, {"evaluate.reject_unknown": True})
    SiameseRecognizer(recognizer.embedding, recognizer.gallery, strict).save(root / "unknown")
    store_threshold(root / "unknown", -1.0, {"score": "nearest", "target_met": True})
    images = [paths[0] for paths in tiny.gallery_images.values()] + [paths[1] for paths in tiny.gallery_images.values()]
    return {"tiny": tiny.path, "rotated": root / "rotated", "unknown": root / "unknown", "history": tiny.history,
            "images": [encode_image(path) for path in images]}


def _register(bundles, name: str, which: str, top1: float, **register) -> dict:
    return register_bundle(pipeline_params(name, **register), bundles[which], {"top1": top1}, bundles["history"], [], {},
                           score_champion=logged_scorer())


class Server:
    """`siamese serve --model models:/NAME@champion` following its aliases every second."""

    def __init__(self, tmp_path: Path, uri: str, name: str, log_dir: Path | None = None):
        self.port, self.log_path = free_port(), tmp_path / f"serve-{uuid.uuid4().hex[:6]}.log"
        self.base = f"http://{HOST}:{self.port}"
        command = [SIAMESE, "serve", "--model", f"models:/{name}@champion", "--reload-seconds", "1",
                   "--host", HOST, "--port", str(self.port), *(() if log_dir else ("--no-log",))]
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "TF_CPP_MIN_LOG_LEVEL": "3",
               **({"SIAMESE_INFERENCE_LOG": str(log_dir)} if log_dir else {})}
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        wait_until_ready(self.base, self.process, self.log_path)
        self.connection = http.client.HTTPConnection(HOST, self.port, timeout=60)

    def ask(self, image: str, client_key: str | None = None, request_id: str | None = None) -> tuple[int, str, dict]:
        """(status, answering version, first prediction) over a keep-alive connection."""
        headers = {"Content-Type": "application/json", **({"X-Client-Key": client_key} if client_key else {}),
                   **({"X-Request-Id": request_id} if request_id else {})}
        try:
            self.connection.request("POST", "/invocations", json.dumps({"inputs": [image]}), headers)
            response = self.connection.getresponse()
        except (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected):  # idle past keep-alive
            self.connection.close()
            self.connection.request("POST", "/invocations", json.dumps({"inputs": [image]}), headers)
            response = self.connection.getresponse()
        body = json.loads(response.read())
        return response.status, response.headers["X-Model-Version"], body.get("predictions", [body])[0]

    def stats(self) -> dict:
        with urllib.request.urlopen(f"{self.base}/stats", timeout=10) as response:
            return json.loads(response.read())

    def wait_for(self, check, what: str, seconds: float = 60):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            found = check()
            if found:
                return found
            time.sleep(0.3)
        pytest.fail(f"{what} after {seconds} s; /stats: {self.stats()}\n{self.log_path.read_text()[-2000:]}")

    def stop(self) -> None:
        self.connection.close()
        stop_group(self.process)


def _live(server: Server, version: str | None):
    return lambda: (server.stats()["rollout"] or {}).get("version") == version


def test_a_shadow_changes_no_answer_is_logged_with_its_agreement_and_promotes_only_on_evidence(bundles, tmp_path,
                                                                                                  monkeypatch):
    uri = use_sqlite_store(monkeypatch, tmp_path)
    assert _register(bundles, "shadowed", "tiny", 0.5, rollout="shadow")["decision"] == "champion"
    server = Server(tmp_path, uri, "shadowed", log_dir=tmp_path / "log")
    try:
        alone = [server.ask(image) for image in bundles["images"]]
        staged = _register(bundles, "shadowed", "rotated", 0.9, rollout="shadow", promote_min_requests=1000)
        assert staged["decision"] == "challenger" and "shadow rollout" in staged["reason"]
        assert registry.alias_version("shadowed", "champion").version == 1
        server.wait_for(_live(server, "2"), "version 2 not live in shadow")
        sent = [f"shadow-{n}" for n in range(len(bundles["images"]))]
        shadowed = [server.ask(image, request_id=rid) for image, rid in zip(bundles["images"], sent)]
        assert shadowed == alone  # same status, version 1, same label, distance and top-k for every image
        assert {version for _, version, _ in shadowed} == {"1"}

        def published():
            counts = rollout.status("shadowed").get("counts")
            return counts if counts and counts["compared"] == len(sent) else None

        counts = server.wait_for(published, "the shadow's tally not in the registry")
        assert counts["challenger"]["requests"] == counts["champion"]["requests"] == len(sent)
        assert counts["agreement"] == 0.0  # every rotated answer differs, and was counted so
        assert counts["replicas"] == 1 and counts["challenger"]["error_rate"] == 0.0

        shown = subprocess.run([SIAMESE, "rollout", "status", "shadowed"], capture_output=True, text=True,
                               env={**os.environ, "MLFLOW_TRACKING_URI": uri})
        assert shown.returncode == 0, shown.stderr
        assert "in shadow rollout" in shown.stdout and f"agreement: 0.0% of {len(sent)} images" in shown.stdout, shown.stdout
        assert f"needs {len(sent)} challenger requests, under the 1000 required" in shown.stdout

        params = tmp_path / "params.yaml"
        params.write_text(yaml.safe_dump({"register": {"model_name": "shadowed", "rollout": "shadow"}}))
        promote = [SIAMESE, "promote", "shadowed", "2", "--reason", "shadow test", "--params", str(params)]
        refused = subprocess.run(promote, capture_output=True, text=True, env={**os.environ, "MLFLOW_TRACKING_URI": uri})
        assert refused.returncode != 0 and f"not promoted: {len(sent)} challenger requests" in refused.stderr
        assert registry.alias_version("shadowed", "champion").version == 1
        forced = subprocess.run([*promote, "--force"], capture_output=True, text=True,
                                env={**os.environ, "MLFLOW_TRACKING_URI": uri})
        assert forced.returncode == 0 and "without the live evidence (--force)" in forced.stdout, forced.stderr
        version = registry.client().get_model_version("shadowed", "2")
        evidence = json.loads(version.tags["promote.evidence"])
        assert evidence["forced"] and evidence["counts"]["challenger"]["requests"] == len(sent)
        assert version.tags["rollout.state"] == "promoted" and registry.alias_version("shadowed", "challenger") is None
        server.wait_for(lambda: server.ask(bundles["images"][0])[1] == "2", "the promoted version not answering")
        server.wait_for(_live(server, None), "the finished rollout still live")
    finally:
        server.stop()
    now = datetime.now(UTC)
    shadow = read_window(str(tmp_path / "log"), now - timedelta(hours=1), now + timedelta(hours=1)).to_pylist()
    records = [r for r in shadow if r["source"] == "shadow"]
    assert sorted(r["request_id"] for r in records) == sorted(sent)
    assert {r["model_version"] for r in records} == {"2"} and {r["agrees"] for r in records} == {False}
    assert all(r["agrees"] is None for r in shadow if r["source"] == "http")


def test_the_canary_share_holds_sticks_per_client_and_a_failing_canary_is_rolled_back(bundles, tmp_path, monkeypatch):
    uri = use_sqlite_store(monkeypatch, tmp_path)
    canary = {"rollout": "canary", "canary_share": 0.3, "rollback_min_requests": 30}
    _register(bundles, "canaried", "tiny", 0.5, **canary)
    server = Server(tmp_path, uri, "canaried")
    try:
        assert _register(bundles, "canaried", "rotated", 0.9, **canary)["decision"] == "challenger"
        server.wait_for(_live(server, "2"), "version 2 not live as canary")
        plan = rollout.live_plan(registry.alias_version("canaried", "challenger"))
        keys = [f"client-{n}" for n in range(400)]
        versions = {key: server.ask(bundles["images"][n % 6], key)[1] for n, key in enumerate(keys)}
        assert all((versions[key] == "2") == rollout.to_challenger(plan, key) for key in keys)
        canaried, bound = sum(v == "2" for v in versions.values()), 4 * math.sqrt(400 * 0.3 * 0.7)
        assert abs(canaried - 120) <= bound, f"{canaried} of 400 clients on the canary, expected 120 +- {bound:.0f}"
        assert all(server.ask(bundles["images"][0], key)[1] == versions[key] for key in keys[:40] for _ in range(2))

        failing = _register(bundles, "canaried", "unknown", 0.95, **canary)
        assert failing["decision"] == "challenger"
        assert registry.client().get_model_version("canaried", "2").tags["rollout.state"] == "replaced"
        server.wait_for(_live(server, "3"), "version 3 not live as canary")
        answers = [server.ask(bundles["images"][n % 6], f"later-{n}") for n in range(200)]
        canaried = [prediction["label"] for _, version, prediction in answers if version == "3"]
        assert len(canaried) >= 30 and set(canaried) == {"unknown"}  # what the rule counts before it acts
        server.wait_for(lambda: registry.alias_version("canaried", "challenger") is None, "no automatic rollback")
        tags = registry.client().get_model_version("canaried", "3").tags
        assert tags["rollout.state"] == "rolled_back" and "unknown rate 1.000" in tags["rollout.rolled_back.reason"]
        server.wait_for(_live(server, None), "the rolled-back canary still live")
        assert {server.ask(bundles["images"][0], f"after-{n}")[1] for n in range(30)} == {"1"}
        assert registry.alias_version("canaried", "champion").version == 1
    finally:
        server.stop()


def test_a_challenger_that_fails_the_example_request_on_a_replica_is_rolled_back(bundles, tmp_path, monkeypatch):
    """Registration refuses a version that fails the example request, so only a replica's own environment can make
    a challenger fail it there (a missing library, a different CPU); that failure is made here, in the replica's
    load. The replica rolls the challenger back for every replica and goes on serving the champion."""
    from pipelines import serving

    use_sqlite_store(monkeypatch, tmp_path)
    _register(bundles, "failing", "tiny", 0.5, rollout="canary")
    assert _register(bundles, "failing", "tiny", 0.9, rollout="canary")["decision"] == "challenger"
    served = serving.Served("models:/failing@champion", reload_seconds=0, replica="replica-a")
    loaded = served._load

    def load(named, alias=None, source="http"):
        if alias == "challenger":
            raise serving.TrialFailed(f"version {named[1]} failed on the example request (no such op here)")
        return loaded(named, alias, source)

    monkeypatch.setattr(served, "_load", load)
    with pytest.raises(serving.TrialFailed):
        served._follow_challenger("failing")
    assert served.rollout is None and served.current.version == "1"
    assert registry.alias_version("failing", "challenger") is None
    tags = registry.client().get_model_version("failing", "2").tags
    assert tags["rollout.state"] == "rolled_back" and tags["rollout.rolled_back.by"] == "replica-a"
    assert "failed on the example request (no such op here) on replica replica-a" in tags["rollout.rolled_back.reason"]


def test_two_replicas_route_each_client_alike_and_roll_back_on_their_pooled_counts(bundles, tmp_path, monkeypatch):
    """Two replicas behind a round-robin balancer (the client alternates): a client key meets the same version on
    both, and neither replica alone sees the 40 canary requests the rollback rule needs; together they do."""
    uri = use_sqlite_store(monkeypatch, tmp_path)
    canary = {"rollout": "canary", "canary_share": 0.5, "rollback_min_requests": 60}
    _register(bundles, "replicated", "tiny", 0.5, **canary)
    replicas = [Server(tmp_path, uri, "replicated"), Server(tmp_path, uri, "replicated")]
    try:
        assert _register(bundles, "replicated", "unknown", 0.9, **canary)["decision"] == "challenger"
        for replica in replicas:
            replica.wait_for(_live(replica, "2"), "version 2 not live as canary")
        for n in range(20):
            key = f"shared-{n}"
            assert len({replica.ask(bundles["images"][0], key)[1] for replica in replicas}) == 1, key
        local = [replica.stats()["rollout"]["challenger"]["requests"] for replica in replicas]
        for n in range(2000):  # round robin, each replica until it has answered 30 canary requests
            which = n % 2
            if local[which] < 30:
                local[which] += replicas[which].ask(bundles["images"][n % 6], f"balanced-{n}")[1] == "2"
            if min(local) >= 30:
                break
        assert local == [30, 30], local  # neither replica alone has the 60 the rule needs; together they have
        replicas[0].wait_for(lambda: registry.alias_version("replicated", "challenger") is None, "no pooled rollback")
        tags = registry.client().get_model_version("replicated", "2").tags
        names = {replica.stats()["replica"] for replica in replicas}
        assert tags["rollout.state"] == "rolled_back" and tags["rollout.rolled_back.by"] in names
        assert [json.loads(tags[f"rollout.replica.{name}"])["challenger"]["requests"] for name in names] == [30, 30]
        for replica in replicas:
            replica.wait_for(_live(replica, None), "the rolled-back canary still live on a replica")
            assert {replica.ask(bundles["images"][0], f"after-{n}")[1] for n in range(20)} == {"1"}
    finally:
        for replica in replicas:
            replica.stop()


def test_in_shadow_mode_a_losing_version_takes_no_alias_and_a_newer_winner_replaces_the_challenger(bundles, tmp_path,
                                                                                                   monkeypatch):
    use_sqlite_store(monkeypatch, tmp_path)
    assert _register(bundles, "gated", "tiny", 0.5, rollout="shadow")["decision"] == "champion"
    assert _register(bundles, "gated", "tiny", 0.8, rollout="shadow")["decision"] == "challenger"
    loser = _register(bundles, "gated", "tiny", 0.4, rollout="shadow")
    assert loser["decision"] == "rejected" and registry.alias_version("gated", "challenger").version == 2
    assert _register(bundles, "gated", "tiny", 0.9, rollout="shadow")["decision"] == "challenger"
    tags = {v: registry.client().get_model_version("gated", v).tags for v in ("2", "3", "4")}
    assert tags["2"]["rollout.state"] == "replaced" and "rollout.state" not in tags["3"]
    assert tags["4"]["rollout.state"] == "live" and tags["4"]["rollout.mode"] == "shadow"
    assert registry.alias_version("gated", "champion").version == 1
    with pytest.raises(RegistryError, match="not promoted: 0 challenger requests, under the 200 required"):
        registry.set_champion("gated", "4", "too early", rollout_mode="shadow")
    role = {"requests": 250, "images": 250, "errors": 0, "unknown": 5, "latency_ms_sum": 750.0, "p95_ms": 4.0}
    registry.client().set_model_version_tag("gated", "4", "rollout.replica.host-1-1", json.dumps(
        {"champion_version": "1", "compared": 250, "agreed": 240, "skipped": 0, "champion": role, "challenger": role}))
    done = registry.set_champion("gated", "4", "a week of shadow traffic", rollout_mode="shadow")
    assert done["champion"] == "4" and not done["evidence"]["forced"] and done["evidence"]["missing"] == []
    recorded = json.loads(registry.client().get_model_version("gated", "4").tags["promote.evidence"])
    assert recorded["counts"]["agreement"] == pytest.approx(0.96) and recorded["mode"] == "shadow"
    assert registry.alias_version("gated", "challenger") is None
    assert _register(bundles, "gated", "tiny", 0.3)["decision"] == "challenger"  # direct mode: as before


def test_the_rollback_rule_and_the_promotion_evidence_read_every_replicas_counts():
    from types import SimpleNamespace

    plan = rollout.Plan("7", "canary", 0.2, rollback_margin=0.05, rollback_min_requests=40, promote_min_requests=100,
                        promote_min_agreement=0.9)

    def report(champion_requests, challenger_requests, challenger_errors, compared, agreed):
        role = lambda requests, errors: {"requests": requests, "images": requests, "errors": errors, "unknown": 0,
                                         "latency_ms_sum": 3.0 * requests, "p95_ms": 5.0}
        return json.dumps({"champion_version": "6", "compared": compared, "agreed": agreed, "skipped": 0,
                           "champion": role(champion_requests, 0), "challenger": role(challenger_requests,
                                                                                      challenger_errors)})

    version = SimpleNamespace(version="7", tags={**plan.tags(), "rollout.replica.a-1-1": report(80, 20, 2, 20, 19),
                                                 "rollout.replica.b-1-2": report(80, 25, 2, 25, 24)})
    counts = rollout.pooled(version)
    assert counts["replicas"] == 2 and counts["challenger"]["requests"] == 45 and counts["champion"]["requests"] == 160
    assert counts["challenger"]["error_rate"] == pytest.approx(4 / 45) and counts["agreement"] == pytest.approx(43 / 45)
    assert counts["challenger"]["mean_ms"] == 3.0 and counts["challenger"]["p95_ms"] == 5.0
    assert rollout.live_plan(version) == plan
    reason = rollout.worse_by(plan, counts)  # 45 >= 40 requests, 8.9 % errors against 0 % + 5 %
    assert reason is not None and "error rate 0.089" in reason and "2 replica(s)" in reason
    missing = rollout.evidence(plan, counts)
    assert len(missing) == 2 and "45 challenger requests, under the 100" in missing[0] and missing[1] == reason
    one = SimpleNamespace(version="7", tags={**plan.tags(), "rollout.replica.a-1-1": report(80, 20, 2, 20, 19)})
    assert rollout.worse_by(plan, rollout.pooled(one)) is None  # 20 requests: too few for the rule yet
    assert sum(rollout.to_challenger(plan, f"key-{n}") for n in range(5000)) == pytest.approx(1000, abs=4 * 28.3)
