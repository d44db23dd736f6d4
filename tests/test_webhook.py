"""The webhook sink against a real HTTP receiver on loopback that fails, hangs and recovers: order,
at-least-once delivery, signatures, the bounded queue, close() — and the activity log's listeners."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from controller_asg.activity import Activity, ActivityLog
from controller_asg.events import WebhookSink, activity_listener, event_from_activity, make_sink
from shared.config import load_config
from tests.procs import serve_in_thread, wait_for

SECRET = "webhook-secret-0123456789"
FAST = dict(retry_first=0.01, retry_max=0.05)  # back-off short enough for a test


@dataclass
class Seen:
    body: bytes
    signature: str
    content_type: str
    answer: str  # "ok" | "500" | "close" | "hang"

    @property
    def event(self) -> dict[str, Any]:
        return json.loads(self.body)


class Receiver:
    """A webhook receiver on 127.0.0.1 (a free port): each request takes the next answer of
    `script` ("500", "close": the connection closed without an answer, "hang": no answer until
    `release` is set, "ok"), then `default`."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.script: list[str] = []
        self.default = "ok"
        self.seen: list[Seen] = []
        self.hanging = 0
        self.release = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver.cond:
                    answer = receiver.script.pop(0) if receiver.script else receiver.default
                    receiver.seen.append(
                        Seen(
                            body,
                            self.headers.get("X-Helix-Signature", ""),
                            self.headers.get("Content-Type", ""),
                            answer,
                        )
                    )
                    receiver.cond.notify_all()
                if answer == "close":
                    self.close_connection = True
                    return
                if answer == "hang":
                    with receiver.cond:
                        receiver.hanging += 1
                    receiver.release.wait(60)
                    with receiver.cond:
                        receiver.hanging -= 1
                status = 500 if answer == "500" else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a client that gave up on a hung answer: expected here

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = serve_in_thread(self.server, "receiver")

    def delivered(self) -> list[dict[str, Any]]:
        """The events answered 200, deduplicated by id, in the order they first arrived."""
        out: dict[str, dict[str, Any]] = {}
        with self.cond:
            for seen in self.seen:
                if seen.answer in ("ok", "hang"):
                    out.setdefault(seen.event["id"], seen.event)
        return list(out.values())

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def matching(self, text: str) -> list[str]:
        return [m for r in self.records if text in (m := r.getMessage())]


@contextlib.contextmanager
def captured(logger: logging.Logger) -> Iterator[Lines]:
    """The records `logger` emits (at any level), whatever other tests did to its level or propagation."""
    lines, level = Lines(), logger.level
    logger.addHandler(lines)
    logger.setLevel(logging.DEBUG)
    try:
        yield lines
    finally:
        logger.removeHandler(lines)
        logger.setLevel(level)


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    for key in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(key, raising=False)


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def sinks(receiver):
    """Makes sinks posting to the receiver; after the test, closes them, lets the receiver go and
    waits for their threads to end."""
    made: list[WebhookSink] = []
    log = logging.getLogger("tests.webhook")

    def make(**kwargs: Any) -> WebhookSink:
        kwargs.setdefault("secret", SECRET)
        kwargs.setdefault("logger", log)
        sink = WebhookSink(receiver.url, **kwargs)
        made.append(sink)
        return sink

    yield make
    for sink in made:
        sink.close(1.0)
    receiver.release.set()
    for sink in made:
        wait_for(lambda s=sink: not s.running, 30, "the sender thread to end")


def signed(seen: Seen) -> bool:
    expected = "sha256=" + hmac.new(SECRET.encode(), seen.body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(seen.signature, expected)


def test_failing_receiver_then_recovery_delivers_every_event_in_order(receiver, sinks):
    receiver.script = ["500", "500", "close", "hang"]  # the hang is a timeout: the sink gives up at 0.5 s
    sink = sinks(timeout=0.5, **FAST)
    with captured(sink.log) as lines:
        sink.start()
        for n in range(1, 6):
            sink.emit({"type": "test", "n": n})
        wait_for(lambda: receiver.hanging == 1, 30, "the receiver to hold a POST")
        for n in range(6, 31):
            sink.emit({"type": "test", "n": n})
        wait_for(lambda: sink.sent == 30, 60, "every event delivered")

        events = receiver.delivered()
        assert [e["n"] for e in events] == list(range(1, 31))
        assert [e["sequence"] for e in events] == list(range(1, 31))  # no gap: nothing dropped
        assert all(e["group"] == "helix" and e["type"] == "test" for e in events)
        # Every failure was the first event again: nothing overtook it.
        assert [s.answer for s in receiver.seen[:4]] == ["500", "500", "close", "hang"]
        assert {s.event["id"] for s in receiver.seen[:5]} == {events[0]["id"]}
        assert all(signed(s) for s in receiver.seen)
        assert all(s.content_type == "application/json" for s in receiver.seen)
        assert (sink.sent, sink.dropped, sink.queued, sink.failed_attempts) == (30, 0, 0, 4)

        # One line when delivery started failing, with the reason; one when it recovered.
        failing = lines.matching("delivery failing")
        assert len(failing) == 1 and "HTTP 500" in failing[0], failing
        recovered = lines.matching("delivering again")
        assert len(recovered) == 1 and "delivered late, 0 dropped meanwhile" in recovered[0], recovered
        assert len(lines.records) == 2, [r.getMessage() for r in lines.records]


def test_emit_never_waits_for_a_hanging_receiver(receiver, sinks):
    receiver.default = "hang"
    sink = sinks(timeout=60, **FAST)
    sink.start()
    sink.emit({"type": "test", "n": 1})
    wait_for(lambda: receiver.hanging == 1, 30, "the receiver to hold the first POST")
    for n in range(2, 202):
        sink.emit({"type": "test", "n": n})
    # Every emit returned while the receiver still held the first POST, unanswered.
    assert receiver.hanging == 1 and not receiver.release.is_set() and len(receiver.seen) == 1
    assert sink.queued == 201 and sink.sent == 0

    receiver.release.set()
    wait_for(lambda: sink.sent == 201, 60, "every event delivered")
    assert [e["n"] for e in receiver.delivered()] == list(range(1, 202))


def test_a_full_queue_drops_the_oldest_and_counts_them(receiver, sinks):
    sink = sinks(queue_size=4, **FAST)
    for n in range(1, 11):  # not started yet: everything waits in the queue
        sink.emit({"type": "test", "n": n})
    assert (sink.queued, sink.dropped) == (4, 6)
    sink.start()
    wait_for(lambda: sink.sent == 4, 30, "the queue delivered")
    assert [e["sequence"] for e in receiver.delivered()] == [7, 8, 9, 10]  # the gap says 6 were lost
    assert (sink.sent, sink.dropped, sink.queued) == (4, 6, 0)


def test_an_event_pushed_out_while_in_flight_counts_as_what_became_of_it(receiver, sinks):
    receiver.default = "hang"
    sink = sinks(queue_size=2, timeout=60, **FAST)
    sink.start()
    sink.emit({"type": "test", "n": 1})
    wait_for(lambda: receiver.hanging == 1, 30, "the receiver to hold the first POST")
    for n in range(2, 6):
        sink.emit({"type": "test", "n": n})
    # 1 (in flight), 2 and 3 were pushed out; 2 and 3 are lost, 1 is whatever its POST turns out.
    assert (sink.queued, sink.dropped) == (2, 2)
    receiver.release.set()
    wait_for(lambda: sink.sent == 3, 30, "the rest delivered")
    assert [e["n"] for e in receiver.delivered()] == [1, 4, 5]
    assert (sink.sent, sink.dropped, sink.queued) == (3, 2, 0)  # every event counted exactly once


def test_close_returns_within_its_timeout_while_the_receiver_hangs(receiver, sinks):
    receiver.default = "hang"
    sink = sinks(timeout=60)
    with captured(sink.log) as lines:
        sink.start()
        sink.emit({"type": "test"})
        wait_for(lambda: receiver.hanging == 1, 30, "the receiver to hold the POST")
        started = time.monotonic()
        assert sink.close(0.5) is False
        assert time.monotonic() - started < 10  # far below the POST's own 60 s timeout
        assert receiver.hanging == 1  # it did return while the POST was still unanswered
        assert lines.matching("closing with 1 events undelivered")
    sink.emit({"type": "after close"})  # dropped, never raises
    assert sink.dropped == 1


def test_close_cuts_a_long_back_off_short_and_flushes(receiver, sinks):
    receiver.script = ["500"]
    sink = sinks(retry_first=60, retry_max=60)  # the first retry would come 30 to 60 s later
    sink.start()
    for n in range(1, 4):
        sink.emit({"type": "test", "n": n})
    wait_for(lambda: sink.failed_attempts == 1, 30, "the first POST to fail")
    started = time.monotonic()
    assert sink.close(20) is True
    assert time.monotonic() - started < 20
    assert [e["n"] for e in receiver.delivered()] == [1, 2, 3]
    assert (sink.sent, sink.dropped, sink.queued) == (3, 0, 0)


def test_emit_never_raises(receiver, sinks):
    sink = sinks()
    with captured(sink.log) as lines:
        sink.emit({"type": "test", "odd": {1}, "when": object()})  # not JSON: shown as text
        sink.emit(None)  # not an event at all: dropped, logged once
        sink.emit(None)
    assert (sink.queued, sink.dropped) == (1, 2)
    assert len(lines.matching("could not be queued")) == 1
    sink.start()
    wait_for(lambda: sink.sent == 1, 30, "the event delivered")
    assert receiver.delivered()[0]["odd"] == "{1}"


def test_a_redirect_is_a_failure(receiver, sinks):
    """urllib would follow a 302 with a GET without the body: the event would be lost as 'sent'."""
    sink = sinks(**FAST)
    # A second server that redirects every POST to the receiver.
    target = receiver.url

    class Redirect(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.send_response(302)
            self.send_header("Location", target)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    thread = serve_in_thread(server)
    try:
        sink.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
        sink.start()
        sink.emit({"type": "test"})
        wait_for(lambda: sink.failed_attempts >= 2, 30, "the redirect to count as failures")
        assert sink.sent == 0 and sink.queued == 1 and not receiver.seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


# ---------------------------------------------------------------------------------------------
# Activities: the event, the listeners, make_sink.


def activity(**kwargs: Any) -> Activity:
    fields: dict[str, Any] = dict(
        time=1_700_000_000.5,
        action="launch",
        count=2,
        reason="cpu 0.91 above 0.75",
        instance_ids=["i-1", "i-2"],
        desired=4,
        capacity=2,
    )
    fields.update(kwargs)
    return Activity(**fields)


def test_event_from_activity():
    assert event_from_activity(activity()) == {
        "type": "launch",
        "time": "2023-11-14T22:13:20.500Z",
        "epoch": 1_700_000_000.5,
        "count": 2,
        "reason": "cpu 0.91 above 0.75",
        "instance_ids": ["i-1", "i-2"],
        "desired": 4,
        "capacity": 2,
        "dry_run": False,
    }


def test_listeners_hear_every_record_and_a_failing_one_breaks_nothing(tmp_path):
    heard: list[Activity] = []

    def broken(_: Activity) -> None:
        raise RuntimeError("listener bug")

    path = tmp_path / "activity.jsonl"
    activities = ActivityLog(str(path), listeners=[broken])
    activities.add_listener(heard.append)
    with captured(logging.getLogger("controller_asg")) as lines:
        activities.record(activity())
        activities.record(activity(action="terminate", instance_ids=["i-1"]))
    assert [a.action for a in heard] == ["launch", "terminate"]
    assert len(path.read_text().splitlines()) == 2
    assert len(lines.matching("activity listener")) == 1  # logged once, not once per activity


def test_activities_reach_the_webhook(receiver, tmp_path):
    environ = {
        "HELIX_ENV_FILE": "",
        "HELIX_STATE_DIR": str(tmp_path),
        "HELIX_TOKEN": "s3cret-token-0123",
        "HELIX_MONITOR_ADDR": "127.0.0.1:5999",
        "HELIX_GROUP": "tg",
    }
    assert make_sink(load_config(environ)) is None  # no HELIX_WEBHOOK_URL: no sink
    cfg = load_config({**environ, "HELIX_WEBHOOK_URL": receiver.url, "HELIX_WEBHOOK_SECRET": SECRET})
    sink = make_sink(cfg)
    assert sink is not None
    try:
        activities = ActivityLog("")
        activities.add_listener(activity_listener(sink))
        activities.record(activity())
        activities.record(activity(action="freeze", count=0, instance_ids=[], dry_run=True))
        wait_for(lambda: sink.sent == 2, 30, "both events delivered")
    finally:
        assert sink.close(5)
    first, second = receiver.delivered()
    assert all(signed(s) for s in receiver.seen)
    assert first == {**event_from_activity(activity()), "group": "tg", "sequence": 1, "id": first["id"]}
    assert (second["type"], second["sequence"], second["dry_run"]) == ("freeze", 2, True)
