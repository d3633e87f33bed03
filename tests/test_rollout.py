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

import numpy as np
import pytest
import yaml

from pipelines import registry, rollout, scoring
from pipelines.errors import RegistryError
from pipelines.monitoring import read_window
from pipelines.pyfunc_model import encode_image
from siamese_core.config import apply_overrides
from siamese_core.data import scan_folder
from siamese_core.recognizer import SiameseRecognizer, build_gallery, store_threshold

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
    """`siamese serve --model models:/NAME@champion` following its aliases every second, behind a proxy it trusts to
    set ``key_header`` (the client key of a canary)."""

    def __init__(self, tmp_path: Path, uri: str, name: str, log_dir: Path | None = None,
                 key_header: str = "X-Client-Key"):
        self.port, self.log_path = free_port(), tmp_path / f"serve-{uuid.uuid4().hex[:6]}.log"
        self.base = f"http://{HOST}:{self.port}"
        params = tmp_path / f"serve-{self.port}.yaml"
        params.write_text(yaml.safe_dump({"serving": {"client_key_header": key_header}}))
        command = [SIAMESE, "serve", "--model", f"models:/{name}@champion", "--reload-seconds", "1", "--params",
                   str(params), "--host", HOST, "--port", str(self.port), *(() if log_dir else ("--no-log",))]
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "TF_CPP_MIN_LOG_LEVEL": "3",
               **({"SIAMESE_INFERENCE_LOG": str(log_dir)} if log_dir else {})}
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        wait_until_ready(self.base, self.process, self.log_path)
        self.connection = http.client.HTTPConnection(HOST, self.port, timeout=60)

    def ask(self, image: str | list[str], client_key: str | None = None, request_id: str | None = None,
            header: str = "X-Client-Key") -> tuple[int, str, dict]:
        """(status, answering version, first prediction) over a keep-alive connection; ``client_key`` in ``header``."""
        headers = {"Content-Type": "application/json", **({header: client_key} if client_key else {}),
                   **({"X-Request-Id": request_id} if request_id else {})}
        body = json.dumps({"inputs": image if isinstance(image, list) else [image]})
        try:
            self.connection.request("POST", "/invocations", body, headers)
            response = self.connection.getresponse()
        except (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected):  # idle past keep-alive
            self.connection.close()
            self.connection.request("POST", "/invocations", body, headers)
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
            counts = registry.rollout_status("shadowed").get("counts")
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
        server.wait_for(_live(server, None), "the finished rollout still live")  # asked before, v2 would shadow v1
        server.wait_for(lambda: server.ask(bundles["images"][0])[1] == "2", "the promoted version not answering")
    finally:
        server.stop()
    now = datetime.now(UTC)
    shadow = read_window(str(tmp_path / "log"), now - timedelta(hours=1), now + timedelta(hours=1)).table.to_pylist()
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
    _publish("gated", "4", "host-1-1", _report(_role(250, keys=30), _role(250, keys=30), 250, 240), rollout.signing_key())
    done = registry.set_champion("gated", "4", "a week of shadow traffic", rollout_mode="shadow")
    assert done["champion"] == "4" and not done["evidence"]["forced"] and done["evidence"]["missing"] == []
    recorded = json.loads(registry.client().get_model_version("gated", "4").tags["promote.evidence"])
    assert recorded["counts"]["agreement"] == pytest.approx(0.96) and recorded["mode"] == "shadow"
    assert registry.alias_version("gated", "challenger") is None
    assert _register(bundles, "gated", "tiny", 0.3)["decision"] == "challenger"  # direct mode: as before


def test_a_version_retrained_on_feedback_with_a_new_class_goes_through_the_gate_and_the_shadow(bundles, tmp_path,
                                                                                              monkeypatch):
    """Feedback adds 'digit 3' to the training data; the retrained version serves four classes, the champion three.
    It is compared with the champion on the champion's three classes (both networks scored on those queries), wins,
    and under a shadow rollout becomes the challenger: the champion stays until promotion on live evidence."""
    from support.images import make_digits_dataset

    use_sqlite_store(monkeypatch, tmp_path)
    train_dir, test_dir = make_digits_dataset(tmp_path / "data", classes=3)
    make_digits_dataset(tmp_path / "data", classes=1, first=3)  # the reviewed class `siamese feedback import` adds
    trained = SiameseRecognizer.load(bundles["tiny"])
    known = scan_folder(train_dir)
    new_version = trained.with_gallery(known).save(tmp_path / "retrained")
    blind = SiameseRecognizer.load(bundles["tiny"])  # a champion whose network tells nothing apart
    blind.embedding.set_weights([np.zeros_like(w) for w in blind.embedding.get_weights()])
    old_classes = scoring.only(known, {"digit 0", "digit 1", "digit 2"})
    SiameseRecognizer(blind.embedding, build_gallery(blind.embedding, old_classes), blind.config).save(tmp_path / "old")
    params = pipeline_params("fed", rollout="shadow")
    passed = {"passed": True, "sentence": "beats both"}
    first = register_bundle(params, tmp_path / "old", {"top1": 0.34}, bundles["history"], [], {},
                            score_champion=logged_scorer(), baselines=passed)
    assert first["decision"] == "champion"
    retrained = register_bundle(
        params, new_version, {"top1": 1.0}, bundles["history"], [], {}, baselines=passed,
        score_champion=scoring.same_queries_scorer(new_version, train_dir, test_dir, "top1"))
    assert retrained["decision"] == "challenger", retrained["reason"]
    assert "classes both serve (it adds digit 3)" in retrained["reason"]
    assert retrained["previous_champion_value"] == pytest.approx(1 / 3)  # every query answered by one class
    assert registry.alias_version("fed", "champion").version == 1  # unchanged
    assert rollout.live_plan(registry.alias_version("fed", "challenger")).mode == "shadow"
    with pytest.raises(RegistryError, match="not promoted: 0 challenger requests"):
        registry.set_champion("fed", "2", "too early", rollout_mode="shadow")
    _publish("fed", "2", "host-1-1", _report(_role(250, keys=30), _role(250, keys=30), 250, 240), rollout.signing_key())
    assert registry.set_champion("fed", "2", "a week of shadow traffic", rollout_mode="shadow")["champion"] == "2"
    assert registry.alias_version("fed", "challenger") is None and registry.alias_version("fed", "previous").version == 1

    other_train, other_test = make_digits_dataset(tmp_path / "other", classes=2, first=6)  # another data set
    other = trained.with_gallery(other_train).save(tmp_path / "other-bundle")
    unrelated = register_bundle(
        params, other, {"top1": 0.9}, bundles["history"], [], {}, baselines=passed,
        score_champion=scoring.same_queries_scorer(other, other_train, other_test, "top1"))
    assert unrelated["decision"] == "challenger" and "another data set" in unrelated["reason"]
    assert registry.alias_version("fed", "champion").version == 2  # not compared, and still not champion at once


def _role(requests: int, errors: int = 0, keys: int = 0, first_key: int = 0) -> dict:
    """One version's counts in a replica's tally: one-image requests from ``keys`` client keys."""
    return {"requests": requests, "images": requests, "errors": errors, "unknown": 0, "latency_ms_sum": 3.0 * requests,
            "p95_ms": 5.0, "keys": keys,
            "key_sample": [f"{n:016x}" for n in range(first_key, first_key + min(keys, rollout.KEY_SAMPLE))]}


def _report(champion: dict, challenger: dict, compared: int, agreed: int) -> dict:
    return {"champion_version": "1", "compared": compared, "agreed": agreed, "skipped": 0, "capped": 0,
            "champion": champion, "challenger": challenger}


def _publish(name: str, version: str, replica: str, report: dict, key: bytes | None) -> None:
    """Write ``report`` as replica ``replica``'s tally on ``version``, signed with ``key`` (None: unsigned)."""
    signed = report if key is None else rollout.sign(report, key, name, version, replica)
    registry.client().set_model_version_tag(name, version, rollout.REPLICA_PREFIX + replica, json.dumps(signed))


def test_the_rollback_rule_and_the_promotion_evidence_read_every_replicas_signed_counts():
    from types import SimpleNamespace

    plan = rollout.Plan("7", "canary", 0.2, rollback_margin=0.05, rollback_min_requests=40, promote_min_requests=100,
                        promote_min_agreement=0.9)
    key = b"the stack's key"

    def report(replica, challenger_requests, compared, agreed, first_key):
        found = _report(_role(80, keys=12, first_key=first_key), _role(challenger_requests, 2, 12, first_key),
                        compared, agreed)
        return json.dumps(rollout.sign(found, key, "m", "7", replica))

    tags = {**plan.tags(), "rollout.replica.a-1-1": report("a-1-1", 20, 20, 19, 0),
            "rollout.replica.b-1-2": report("b-1-2", 25, 25, 24, 6)}
    version = SimpleNamespace(name="m", version="7", tags=tags)
    counts = rollout.pooled(version, key)
    assert counts["replicas"] == 2 and counts["challenger"]["requests"] == 45 and counts["champion"]["requests"] == 160
    assert counts["challenger"]["error_rate"] == pytest.approx(4 / 45) and counts["agreement"] == pytest.approx(43 / 45)
    assert counts["challenger"]["mean_ms"] == 3.0 and counts["challenger"]["p95_ms"] == 5.0
    assert counts["challenger"]["keys"] == 18 and counts["unverified"] == []  # 6 keys reached both replicas
    assert rollout.live_plan(version) == plan
    reason = rollout.worse_by(plan, counts)  # 45 >= 40 requests, 8.9 % errors against 0 % + 5 %
    assert reason is not None and "error rate 0.089" in reason and "2 replica(s)" in reason
    missing = rollout.evidence(plan, counts)
    assert len(missing) == 3 and "45 challenger requests, under the 100" in missing[0] and missing[2] == reason
    assert "18 distinct client keys answered by the challenger, under the 20 required" in missing[1]
    one = SimpleNamespace(name="m", version="7", tags={**plan.tags(), "rollout.replica.a-1-1": tags["rollout.replica.a-1-1"]})
    assert rollout.worse_by(plan, rollout.pooled(one, key)) is None  # 20 requests: too few for the rule yet
    assert sum(rollout.to_challenger(plan, f"key-{n}") for n in range(5000)) == pytest.approx(1000, abs=4 * 28.3)

    moved = {**plan.tags(), "rollout.replica.c-1-3": tags["rollout.replica.a-1-1"],  # a valid tally under another name
             "rollout.replica.forged-host-1-1": json.dumps(_report(_role(5000, keys=500), _role(5000, keys=500), 5000,
                                                                   5000))}
    for written, with_key in ((moved, key), (tags, b"another key"), (tags, None)):
        counts = rollout.pooled(SimpleNamespace(name="m", version="7", tags=written), with_key)
        assert counts["replicas"] == 0 and counts["challenger"]["requests"] == 0 and len(counts["unverified"]) == 2
        assert rollout.worse_by(plan, counts) is None and counts["agreement"] is None


def test_a_tally_counts_each_client_key_up_to_its_cap():
    plan = rollout.Plan("7", "canary", 0.2, 0.05, 40, 100, 0.9, key_cap=10)
    tally = rollout.Tally(plan, "6", b"salt")
    first, second = tally.admit("10.0.0.1", 6), tally.admit("10.0.0.1", 6)
    assert first is not None and second is not None and (first.images, second.images) == (6, 4)
    assert tally.admit("10.0.0.1", 1) is None and tally.admit("10.0.0.1", 0) is None  # images used up
    assert [tally.admit("10.0.0.2", 0) is not None for _ in range(11)] == [True] * 10 + [False]  # requests too
    for admitted, unknown in ((first, 6), (second, 4)):
        tally.add(rollout.CHALLENGER, admitted, unknown, False, 1.0)
    assert tally.agree(["a"] * 6, ["a"] * 3 + ["b"] * 3, second) == [True] * 3 + [False] * 3
    published = tally.published()
    assert published["challenger"]["requests"] == 2 and published["challenger"]["images"] == 10
    assert published["challenger"]["keys"] == 1 and published["capped"] == 3
    assert (published["compared"], published["agreed"]) == (4, 3)  # the first 4 images of the second request
    assert "10.0.0.1" not in json.dumps(published)  # keys are kept as salted digests


def test_a_client_picks_no_version_and_one_key_makes_neither_the_rollback_nor_the_evidence(bundles, tmp_path,
                                                                                           monkeypatch):
    """Only the header a trusted proxy sets (`serving.client_key_header`) is a client key: one the client names is not.
    Through the proxy, one key's 70 noise images do not roll the canary back for everyone, and its 210 images do
    not make the evidence: each key counts for `register.evidence_key_cap` (10) at most."""
    uri = use_sqlite_store(monkeypatch, tmp_path)
    monkeypatch.delenv(rollout.SIGNING_KEY_VARIABLE, raising=False)
    canary = {"rollout": "canary", "canary_share": 0.5, "rollback_min_requests": 50}
    _register(bundles, "keyed", "tiny", 0.5, **canary)
    server = Server(tmp_path, uri, "keyed", key_header="X-Proxy-Client")
    try:
        assert _register(bundles, "keyed", "unknown", 0.9, **canary)["decision"] == "challenger"
        server.wait_for(_live(server, "2"), "version 2 not live as canary")
        plan = rollout.live_plan(registry.alias_version("keyed", "challenger"))
        address = "2" if rollout.to_challenger(plan, HOST) else "1"
        assert {server.ask(bundles["images"][0], f"pick-{n}")[1] for n in range(30)} == {address}  # X-Client-Key

        noisy = next(f"proxy-{n}" for n in range(100) if rollout.to_challenger(plan, f"proxy-{n}"))
        noise = [server.ask(bundles["images"][n % 6], noisy, header="X-Proxy-Client") for n in range(70)]
        assert {(version, answer["label"]) for _, version, answer in noise} == {("2", "unknown")}
        counted = 10 + (10 if address == "2" else 0)  # each key's first 10 requests
        server.wait_for(lambda: (registry.rollout_status("keyed").get("counts") or {}).get("capped", 0) >= 60 + counted - 10,
                        "the capped tally not in the registry")
        time.sleep(2.5)  # the rollback rule has run on those counts on every check since
        counts = registry.rollout_status("keyed")["counts"]
        assert counts["challenger"]["requests"] == counted and counts["challenger"]["unknown_rate"] == 1.0
        assert registry.alias_version("keyed", "challenger").version == 2
        assert registry.client().get_model_version("keyed", "2").tags["rollout.state"] == "live"

        assert _register(bundles, "keyed", "tiny", 0.95, **canary)["decision"] == "challenger"
        server.wait_for(_live(server, "3"), "version 3 not live as canary")
        plan = rollout.live_plan(registry.alias_version("keyed", "challenger"))
        one = next(f"proxy-{n}" for n in range(100) if rollout.to_challenger(plan, f"proxy-{n}"))
        answered = [server.ask(bundles["images"][n % 6], one, header="X-Proxy-Client")[1] for n in range(210)]
        assert set(answered) == {"3"}
        server.wait_for(lambda: (registry.rollout_status("keyed").get("counts") or {}).get("capped") == 200,
                        "the capped tally not in the registry")
        shown = subprocess.run([SIAMESE, "rollout", "status", "keyed"], capture_output=True, text=True,
                               env={**os.environ, "MLFLOW_TRACKING_URI": uri})
        assert shown.returncode == 0 and "the evidence is there" not in shown.stdout, shown.stdout
        assert "needs 10 challenger requests, under the 200 required" in shown.stdout
        assert "1 distinct client keys answered by the challenger, under the 20 required" in shown.stdout
        assert "agreement: 100.0% of 10 images" in shown.stdout
        with pytest.raises(RegistryError, match="not promoted: 10 challenger requests"):
            registry.set_champion("keyed", "3", "one client's traffic", rollout_mode="canary")
        assert registry.alias_version("keyed", "champion").version == 1
    finally:
        server.stop()


def test_a_forged_tally_is_shown_unverified_and_is_no_evidence(bundles, tmp_path, monkeypatch):
    """Tally tags written without the stack's key (none, or a guessed one), claiming 5,000 requests from 500 keys
    that agree on every image: `siamese rollout status` shows them unverified and leaves them out, `siamese promote`
    refuses them. A tally signed with the key (kept beside the SQLite store, owner-only) is evidence."""
    from typer.testing import CliRunner

    from pipelines.cli import app

    use_sqlite_store(monkeypatch, tmp_path)
    monkeypatch.delenv(rollout.SIGNING_KEY_VARIABLE, raising=False)
    _register(bundles, "forged", "tiny", 0.5, rollout="canary")
    assert _register(bundles, "forged", "tiny", 0.9, rollout="canary")["decision"] == "challenger"
    huge = _report(_role(5000, keys=500), _role(5000, keys=500), 5000, 5000)
    _publish("forged", "2", "forged-host-1-1", huge, None)
    _publish("forged", "2", "forged-host-1-2", huge, b"a guessed key")
    promote = ["promote", "forged", "2", "--reason", "forged evidence"]
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"register": {"model_name": "forged", "rollout": "canary"}}))
    refused = CliRunner().invoke(app, [*promote, "--params", str(params)])
    assert refused.exit_code == 1 and len(refused.output.strip().splitlines()) == 1, refused.output
    assert "not promoted: 0 challenger requests" in refused.output
    assert "left out, no valid signature: the tallies of forged-host-1-1, forged-host-1-2" in refused.output
    assert registry.alias_version("forged", "champion").version == 1
    shown = CliRunner().invoke(app, ["rollout", "status", "forged"])
    assert shown.exit_code == 0 and "0 replica(s) reporting" in shown.output, shown.output
    assert "unverified (no valid signature, left out of the counts): forged-host-1-1, forged-host-1-2" in shown.output
    assert "the evidence is there" not in shown.output

    key_file = tmp_path / "mlflow.rollout.key"
    assert key_file.stat().st_mode & 0o777 == 0o600 and rollout.signing_key() == key_file.read_bytes()
    _publish("forged", "2", "real-host-1-1", huge, rollout.signing_key())  # what a replica of this store writes
    done = registry.set_champion("forged", "2", "signed evidence", rollout_mode="canary")
    assert not done["evidence"]["forced"] and done["evidence"]["counts"]["replicas"] == 1
    assert done["evidence"]["counts"]["unverified"] == ["forged-host-1-1", "forged-host-1-2"]
    key_file.chmod(0o644)  # others could read it, and forge
    with pytest.raises(RegistryError, match="must be yours and readable by you only"):
        rollout.signing_key()
    monkeypatch.setenv(rollout.SIGNING_KEY_VARIABLE, "the stack's key")  # the stack's environment: it wins
    assert rollout.signing_key() == b"the stack's key"
