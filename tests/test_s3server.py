"""The stack's S3 server (pipelines.s3server): its journal (checksummed records; a torn last record dropped, damage
elsewhere refused in one line and never cut off; nothing applied that is not in the journal; kill -9 at random
moments), SigV4 freshness and payload hashes, and an access log without signatures. Real servers on loopback."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from pipelines import supervisor
from pipelines.s3server import Journal, JournalDamaged, Journaled, call

from support.http import HOST, free_port

for _module in ("moto.server", "flask_cors", "boto3"):
    pytest.importorskip(_module, reason="the stack's S3 server needs moto[server] and boto3")

KEYS = {"AWS_ACCESS_KEY_ID": "s3-test", "AWS_SECRET_ACCESS_KEY": "s3-test-secret"}
BUCKET = "bucket"


class S3Server:
    """``python -m pipelines.s3server`` on a free port; each start's output in ``log``."""

    def __init__(self, folder: Path):
        self.journal, self.log, self.port = folder / "journal", folder / "s3.log", free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> int | None:
        """Start it and wait until it answers; None then, or its exit status if it exits first."""
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "pipelines.s3server", HOST, str(self.port), str(self.journal)],
                env={**os.environ, **KEYS}, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return self.process.returncode
            if supervisor.http(self.url + "/", timeout=1)[0]:
                return None
            time.sleep(0.05)
        pytest.fail(f"the S3 server did not answer within 60 s:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.url, aws_access_key_id=KEYS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=KEYS["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1",
                            config=Config(signature_version="s3v4", retries={"total_max_attempts": 1}))


@pytest.fixture
def started(tmp_path):
    """A server on a fresh journal, with the bucket made; killed at the end."""
    server = S3Server(tmp_path)
    assert server.start() is None, server.output()
    server.client().create_bucket(Bucket=BUCKET)
    yield server
    server.kill()


def _objects(client) -> dict[str, bytes]:
    listed = client.list_objects_v2(Bucket=BUCKET).get("Contents", [])
    return {item["Key"]: client.get_object(Bucket=BUCKET, Key=item["Key"])["Body"].read() for item in listed}


def _records(journal: Path) -> list:
    with open(journal, "rb") as file:
        return list(Journal(journal).records(file))


def _error(attempt) -> tuple[int, str]:
    import botocore.exceptions

    with pytest.raises(botocore.exceptions.ClientError) as refused:
        attempt()
    return refused.value.response["ResponseMetadata"]["HTTPStatusCode"], refused.value.response["Error"]["Code"]


# ---------------------------------------------------------------- the journal, with a stand-in for moto


def _stand_in(applied: list):
    def app(environ, start_response):  # /bucket/missing is refused, everything else accepted
        applied.append((environ["REQUEST_METHOD"], environ["PATH_INFO"], environ["wsgi.input"].read()))
        start_response("404 Not Found" if environ["PATH_INFO"].endswith("missing") else "200 OK", [])
        return [b""]

    return app


def _journal_of(tmp_path, changes) -> Journal:
    applied: list = []
    journal = Journal(tmp_path / "journal")
    for method, path, body in changes:
        call(Journaled(_stand_in(applied), journal), {"REQUEST_METHOD": method, "PATH_INFO": path}, body)
    return journal


CHANGES = [("PUT", "/bucket/a", b"one"), ("GET", "/bucket/a", b""), ("DELETE", "/bucket/missing", b""),
           ("PUT", "/bucket/a", b"two" * 100)]


def test_the_journal_replays_accepted_changes_in_order_skipping_refused_ones(tmp_path):
    journal = _journal_of(tmp_path, CHANGES)
    assert [r.header.get("refused") is None for r in _records(journal.path)] == [True, True, False, True]
    applied: list = []
    assert journal.replay(_stand_in(applied)) == 2
    assert applied == [("PUT", "/bucket/a", b"one"), ("PUT", "/bucket/a", b"two" * 100)]
    assert oct(journal.path.stat().st_mode & 0o777) == "0o600"


def test_a_change_the_app_fails_on_is_marked_refused_and_not_replayed(tmp_path):
    def failing(environ, start_response):
        raise RuntimeError("moto failed")

    journal = Journal(tmp_path / "journal")
    with pytest.raises(RuntimeError):
        call(Journaled(failing, journal), {"REQUEST_METHOD": "PUT", "PATH_INFO": "/bucket/a"}, b"one")
    applied: list = []
    assert journal.replay(_stand_in(applied)) == 0 and applied == []


@pytest.mark.parametrize("cut", [1, 3, 40, 120, 300, -1])  # in the frame line, the header, the body
def test_a_last_record_cut_short_is_dropped_with_a_warning_and_nothing_else(tmp_path, capsys, cut):
    journal = _journal_of(tmp_path, CHANGES)
    last = _records(journal.path)[-1]
    whole = journal.path.read_bytes()
    journal.path.write_bytes(whole[:last.start + cut] if cut > 0 else whole[:-1])
    applied: list = []
    assert journal.replay(_stand_in(applied)) == 1
    assert applied == [("PUT", "/bucket/a", b"one")]
    assert journal.path.read_bytes() == whole[:last.start]
    assert f"dropped a last record cut short at byte {last.start}" in capsys.readouterr().err


def _one_line(problem: pytest.ExceptionInfo, journal: Path, byte: int) -> str:
    message = str(problem.value)
    assert "\n" not in message and message.startswith(f"journal {journal}: the record at byte {byte} is damaged")
    assert f"python -m pipelines.s3server repair {journal}" in message
    return message


@pytest.mark.parametrize("where", ["frame", "header", "body"])
def test_damage_before_the_last_record_stops_the_replay_in_one_line_and_leaves_the_file(tmp_path, where):
    journal = _journal_of(tmp_path, CHANGES)
    first = _records(journal.path)[0]
    whole = bytearray(journal.path.read_bytes())
    whole[{"frame": 5, "header": 120, "body": first.end - 2}[where]] ^= 0x01  # a digit stays a digit
    journal.path.write_bytes(whole)
    applied: list = []
    with pytest.raises(JournalDamaged) as damaged:
        journal.replay(_stand_in(applied))
    assert "fails its checksum" in _one_line(damaged, journal.path, 0)
    assert applied == [] and journal.path.read_bytes() == whole


def test_a_record_of_the_wrong_shape_is_one_line_naming_the_file_and_byte(tmp_path):
    journal = _journal_of(tmp_path, CHANGES[:1])
    size = journal.path.stat().st_size
    with open(journal.path, "ab") as out:
        out.write(b"[1]\n")  # valid JSON, in the form of the records written before checksums
    with pytest.raises(JournalDamaged) as damaged:
        journal.replay(_stand_in([]))
    assert "not a journal record: a JSON list, not an object" in _one_line(damaged, journal.path, size)

    journal.path.write_bytes(journal.path.read_bytes()[:size])
    journal._append({"fields": {"REQUEST_METHOD": "GET"}}, b"")  # checksums right, contents wrong
    with pytest.raises(JournalDamaged) as damaged:
        journal.replay(_stand_in([]))
    assert "its fields name no change" in _one_line(damaged, journal.path, size)


def test_a_journal_written_before_the_checksums_still_replays(tmp_path):
    journal = Journal(tmp_path / "journal")
    with open(journal.path, "wb") as out:  # the earlier format: a JSON line, then the body
        for path, body in (("/bucket/a", b"one"), ("/bucket/b", b"two\n")):
            out.write(json.dumps({"fields": {"REQUEST_METHOD": "PUT", "PATH_INFO": path}, "body": len(body)}).encode()
                      + b"\n" + body)
    call(Journaled(_stand_in([]), journal), {"REQUEST_METHOD": "PUT", "PATH_INFO": "/bucket/c"}, b"three")
    applied: list = []
    assert journal.replay(_stand_in(applied)) == 3
    assert [body for _, _, body in applied] == [b"one", b"two\n", b"three"]


def test_repair_keeps_every_intact_record_and_sets_the_journal_aside(tmp_path):
    journal = _journal_of(tmp_path, [("PUT", f"/bucket/{n}", b"x" * n) for n in range(5)])
    records = _records(journal.path)
    whole = bytearray(journal.path.read_bytes())
    whole[records[1].start + 150] ^= 0x01
    journal.path.write_bytes(whole + b"S3J2 12")  # and a last record cut short
    done = subprocess.run([sys.executable, "-m", "pipelines.s3server", "repair", str(journal.path)],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (f"kept 4 intact records in {journal.path}, left out bytes {records[1].start}-"
                                   f"{records[2].start}, {len(whole)}-{len(whole) + 7}; the journal as it was is "
                                   f"{journal.path}.damaged")
    assert (tmp_path / "journal.damaged").read_bytes() == whole + b"S3J2 12"
    applied: list = []
    assert journal.replay(_stand_in(applied)) == 4
    assert [path for _, path, _ in applied] == ["/bucket/0", "/bucket/2", "/bucket/3", "/bucket/4"]
    again = subprocess.run([sys.executable, "-m", "pipelines.s3server", "repair", str(journal.path)],
                           capture_output=True, text=True, check=False)
    assert again.returncode == 1 and again.stderr.count("\n") == 1 and "move it away first" in again.stderr


# ---------------------------------------------------------------- the journal of a real server


def test_one_flipped_character_in_the_second_of_ten_records_stops_the_server_and_loses_nothing(started):
    client = started.client()
    for n in range(9):
        client.put_object(Bucket=BUCKET, Key=f"object-{n}", Body=f"content {n}".encode() * 100)
    started.kill()
    second = _records(started.journal)[1]
    whole = bytearray(started.journal.read_bytes())
    whole[second.start + 500] ^= 0x02
    started.journal.write_bytes(whole)

    assert started.start() == 1
    output = started.output()
    assert output.count("\n") == 1 and "Traceback" not in output, output
    assert output.startswith(f"error: journal {started.journal}: the record at byte {second.start} is damaged")
    assert started.journal.read_bytes() == whole, "the journal is left as it was"

    repaired = subprocess.run([sys.executable, "-m", "pipelines.s3server", "repair", str(started.journal)],
                              capture_output=True, text=True, check=True)
    assert "kept 9 intact records" in repaired.stdout
    assert started.start() is None, started.output()
    assert sorted(_objects(client)) == [f"object-{n}" for n in range(1, 9)]


def test_a_change_the_journal_cannot_keep_is_refused_and_never_applied(started):
    """A full disk, made by a file-size limit on the running server: the journal write stops part-way."""
    import psutil

    client = started.client()
    client.put_object(Bucket=BUCKET, Key="kept", Body=b"old")
    size = started.journal.stat().st_size
    server = psutil.Process(started.process.pid)
    server.rlimit(psutil.RLIMIT_FSIZE, (size + 200, psutil.RLIM_INFINITY))
    full = (507, "InsufficientStorage")
    assert _error(lambda: client.put_object(Bucket=BUCKET, Key="kept", Body=b"new" * 1000)) == full
    assert _error(lambda: client.put_object(Bucket=BUCKET, Key="new", Body=b"x")) == full
    assert _error(lambda: client.delete_object(Bucket=BUCKET, Key="kept")) == full
    assert _error(lambda: client.create_multipart_upload(Bucket=BUCKET, Key="big")) == full
    assert _objects(client) == {"kept": b"old"}
    assert not client.list_multipart_uploads(Bucket=BUCKET).get("Uploads")
    assert started.journal.stat().st_size == size, "no half record left behind"

    server.rlimit(psutil.RLIMIT_FSIZE, (psutil.RLIM_INFINITY, psutil.RLIM_INFINITY))  # space again
    client.put_object(Bucket=BUCKET, Key="after", Body=b"later")
    started.kill()
    assert started.start() is None, started.output()
    assert _objects(client) == {"kept": b"old", "after": b"later"}
    assert "dropped" not in started.output() and "answered" not in started.output()


def _workload(client, name: str, seed: float, stored: dict, in_doubt: dict) -> None:
    """PUTs and DELETEs on keys of its own until the server stops answering. ``stored``: what each
    acknowledged request left; ``in_doubt``: for a request cut off, the outcomes either way."""
    rng = random.Random(seed)
    while True:
        key = f"{name}-{rng.randrange(6)}"
        content = rng.randbytes(rng.randrange(2000)) if rng.random() < 0.7 else None
        in_doubt[key] = {stored.get(key), content}
        try:
            if content is None:
                client.delete_object(Bucket=BUCKET, Key=key)
            else:
                client.put_object(Bucket=BUCKET, Key=key, Body=content)
        except Exception:  # the server was killed: this request's outcome is in doubt
            return
        del in_doubt[key]
        if content is None:
            stored.pop(key, None)
        else:
            stored[key] = content


def _check_nothing_acknowledged_is_lost(server: S3Server, stored: dict, in_doubt: dict) -> None:
    found = _objects(server.client())
    for key in sorted(set(found) | set(stored) | set(in_doubt)):
        if key in in_doubt:
            assert found.get(key) in in_doubt.pop(key), key
            if key in found:
                stored[key] = found[key]
            else:
                stored.pop(key, None)
        else:
            assert found.get(key) == stored.get(key), f"{key}: acknowledged, then lost or changed"


def _flip_and_check_it_is_refused(server: S3Server, rng: random.Random) -> None:
    """Flip one bit before the last record (a record is under 6 kB here): the server refuses to start, in one
    line naming the damaged record, and leaves the file as it was; then put the bit back."""
    whole = server.journal.read_bytes()
    offset = rng.randrange(max(1, len(whole) - 8000))
    damaged = bytearray(whole)
    damaged[offset] ^= 1 << rng.randrange(8)
    server.journal.write_bytes(damaged)
    assert server.start() == 1
    found = re.fullmatch(rf"error: journal {re.escape(str(server.journal))}: the record at byte (\d+) is damaged "
                         r"\([^)]+\); .*repair.*\n", server.output())
    assert found, server.output()
    assert 0 <= offset - int(found[1]) < 6000, "the message names the record holding the flipped bit"
    assert server.journal.read_bytes() == damaged, "damage is never cut off"
    server.journal.write_bytes(whole)


@pytest.mark.parametrize("kills", [10, pytest.param(50, marks=pytest.mark.slow)])
def test_kill_9_at_random_moments_never_loses_an_acknowledged_object(tmp_path, kills):
    rng = random.Random(kills)
    server = S3Server(tmp_path)
    assert server.start() is None, server.output()
    server.client().create_bucket(Bucket=BUCKET)
    stored: dict[str, bytes] = {}
    in_doubt: dict[str, set] = {}
    try:
        for run in range(kills):
            workers = [threading.Thread(target=_workload, args=(server.client(), f"w{n}", rng.random(), stored,
                                                                in_doubt)) for n in range(2)]
            for worker in workers:
                worker.start()
            time.sleep(rng.uniform(0.05, 0.3))
            server.kill()
            for worker in workers:
                worker.join(30)
            if run % 3 == 2:
                _flip_and_check_it_is_refused(server, rng)
            assert server.start() is None, server.output()
            _check_nothing_acknowledged_is_lost(server, stored, in_doubt)
        assert stored, "the workload wrote nothing"
    finally:
        server.kill()


# ---------------------------------------------------------------- signatures: fresh, and for this body


def _send(url: str, method: str, headers: dict, body: bytes = b"") -> tuple[int, str]:
    """One raw request, exactly these headers (a captured request sent again); (status, S3 error code)."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        connection.request(method, parts.path + (f"?{parts.query}" if parts.query else ""), body=body,
                           headers=headers)
        answer = connection.getresponse()
        code = re.search(rb"<Code>([^<]+)</Code>", answer.read())
        return answer.status, code.group(1).decode() if code else ""
    finally:
        connection.close()


def _signed_headers(monkeypatch, method: str, url: str, body: bytes, when: datetime) -> dict:
    """The headers of a request signed with the test key as at ``when`` (UTC)."""
    import botocore.auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    request = AWSRequest(method=method, url=url, data=body)
    with monkeypatch.context() as clock:
        clock.setattr(botocore.auth, "get_current_datetime", lambda **_: when.replace(tzinfo=None))
        botocore.auth.S3SigV4Auth(Credentials(KEYS["AWS_ACCESS_KEY_ID"], KEYS["AWS_SECRET_ACCESS_KEY"]), "s3",
                                  "us-east-1").add_auth(request)
    return dict(request.headers)


def test_a_request_signed_more_than_15_minutes_away_is_refused(started, monkeypatch):
    client = started.client()
    client.put_object(Bucket=BUCKET, Key="kept", Body=b"kept")
    url, now = f"{started.url}/{BUCKET}/kept", datetime.now(UTC)
    for when in (now - timedelta(days=2), now - timedelta(minutes=16), now + timedelta(minutes=16)):
        assert _send(url, "DELETE", _signed_headers(monkeypatch, "DELETE", url, b"", when)) == (
            403, "RequestTimeTooSkewed"), when
    assert _objects(client) == {"kept": b"kept"}

    import botocore.auth

    with monkeypatch.context() as clock:  # a presigned URL dated ahead, and one that would live too long
        ahead_of_now = (now + timedelta(hours=1)).replace(tzinfo=None)
        clock.setattr(botocore.auth, "get_current_datetime", lambda **_: ahead_of_now)
        ahead = client.generate_presigned_url("get_object", Params={"Bucket": BUCKET, "Key": "kept"})
    assert _send(ahead, "GET", {}) == (403, "RequestTimeTooSkewed")
    too_long = client.generate_presigned_url("get_object", Params={"Bucket": BUCKET, "Key": "kept"},
                                             ExpiresIn=8 * 24 * 3600)
    assert _send(too_long, "GET", {}) == (400, "AuthorizationQueryParametersError")

    assert _send(url, "DELETE", _signed_headers(monkeypatch, "DELETE", url, b"", now - timedelta(minutes=14)))[0] == 204
    assert _objects(client) == {}


def test_a_captured_signed_put_sent_again_with_another_body_is_refused(started):
    client = started.client()
    captured: dict = {}

    def capture(request, **_):
        captured.update(url=request.url, headers=dict(request.headers))

    client.meta.events.register("before-send.s3.PutObject", capture)
    client.put_object(Bucket=BUCKET, Key="signed", Body=b"the signed body")
    declared = {name.lower(): value for name, value in captured["headers"].items()}["x-amz-content-sha256"]
    assert declared == hashlib.sha256(b"the signed body").hexdigest().encode()
    for other in (b"another body!!!", b"a much longer, different body"):
        assert _send(captured["url"], "PUT", captured["headers"], other) == (400, "XAmzContentSHA256Mismatch")
    assert _objects(client) == {"signed": b"the signed body"}
    assert _send(captured["url"], "PUT", captured["headers"], b"the signed body")[0] == 200  # the same, fresh


def test_the_access_log_names_query_parameters_without_their_values(started):
    import urllib.request

    client = started.client()
    client.put_object(Bucket=BUCKET, Key="shared", Body=b"shared")
    url = client.generate_presigned_url("get_object", Params={"Bucket": BUCKET, "Key": "shared"})
    assert urllib.request.urlopen(url).read() == b"shared"
    query = dict(part.split("=", 1) for part in urlsplit(url).query.split("&"))
    log = started.output()
    assert f"GET /{BUCKET}/shared?X-Amz-Algorithm&X-Amz-Credential&X-Amz-Date" in log, log
    for secret in (query["X-Amz-Signature"], query["X-Amz-Credential"], "X-Amz-Signature="):
        assert secret not in log
