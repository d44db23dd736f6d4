"""HELIX_EXTERNAL_METRIC (controller_asg/external.py) against real things: moto's SQS server, real
subprocesses, a real HTTP server on loopback, real files and a FIFO. Every read is checked never to
raise, to come back within its timeout, and to fail as one line naming the setting."""

from __future__ import annotations

import dataclasses
import math
import os
import ssl
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import psutil
import pytest

from controller_asg.external import CommandMetric, FileMetric, HttpMetric, Reading, SqsMetric, make_external
from controller_asg.iam import policy_for
from shared.config import ConfigError, load_config
from tests.iam_eval import allowed, denied, sqs_requests
from tests.moto_server import CREDENTIALS, REGION, moto_client, reset_moto  # its fixtures come through conftest.py
from tests.procs import free_port, manager_pki, serve_in_thread, wait_for

MOTO_ACCOUNT = "123456789012"  # the account moto answers as
PY = sys.executable


def config(spec: str, **extra: str):
    return load_config({"HELIX_ENV_FILE": "", "HELIX_EXTERNAL_METRIC": spec, "HELIX_EXTERNAL_TARGET": "10", **extra})


def metric(spec: str, **extra: str):
    made = make_external(config(spec, **extra))
    assert made is not None
    return made


def failed(reading: Reading, spec: str, *parts: str) -> str:
    """Checks `reading` is a failure reported the one way (a line naming the setting and what was
    expected); returns the error."""
    assert reading.value is None, reading
    assert reading.error.startswith(f"HELIX_EXTERNAL_METRIC={spec[:120]}"), reading.error
    assert "\n" not in reading.error and "expected" in reading.error, reading.error
    for part in parts:
        assert part in reading.error, reading.error
    return reading.error


def timed(source, now: float = 1000.0) -> tuple[Reading, float]:
    started = time.monotonic()
    reading = source.read(now)
    return reading, time.monotonic() - started


# --- configuration ------------------------------------------------------------------------------


QUEUE = f"https://sqs.{REGION}.amazonaws.com/{MOTO_ACCOUNT}/jobs"


@pytest.mark.parametrize(
    "env",
    [
        {"HELIX_EXTERNAL_METRIC": f"sqs:{QUEUE}"},
        {"HELIX_EXTERNAL_METRIC": f"sqs:https://sqs.cn-north-1.amazonaws.com.cn/{MOTO_ACCOUNT}/jobs.fifo"},
        {
            "HELIX_EXTERNAL_METRIC": f"sqs:http://[::1]:4566/{MOTO_ACCOUNT}/q",
            "HELIX_SQS_ENDPOINT_URL": "http://[::1]:4566",
        },
        {"HELIX_EXTERNAL_METRIC": "command:sh -c 'echo 3'"},
        {"HELIX_EXTERNAL_METRIC": "http://127.0.0.1:9/metrics?x=1", "HELIX_EXTERNAL_METRIC_NAME": 'q{a="b",c="d\\"e"}'},
        {"HELIX_EXTERNAL_METRIC": "https://queue.internal/backlog"},
        {"HELIX_EXTERNAL_METRIC": "file:/var/lib/app/backlog", "HELIX_EXTERNAL_METRIC_NAME": "jobs_waiting"},
    ],
)
def test_each_kind_of_metric_loads(env):
    cfg = load_config({"HELIX_ENV_FILE": "", "HELIX_EXTERNAL_TARGET": "100", **env})
    assert cfg.external_metric == env["HELIX_EXTERNAL_METRIC"] and cfg.external_target == 100.0
    assert cfg.external_timeout == 5.0  # the default


def test_no_metric_by_default():
    cfg = load_config({"HELIX_ENV_FILE": ""})
    assert (cfg.external_metric, cfg.external_target, cfg.external_metric_name) == ("", 0.0, "")
    assert make_external(cfg) is None


SPEC_EXPECTED = "expected empty, sqs:<queue URL such as https://sqs.REGION.amazonaws.com/ACCOUNT/NAME>"


@pytest.mark.parametrize(
    ("env", "line"),
    [
        ({"HELIX_EXTERNAL_METRIC": "queue:jobs"}, f"HELIX_EXTERNAL_METRIC=queue:jobs: {SPEC_EXPECTED}"),
        ({"HELIX_EXTERNAL_METRIC": "sqs:jobs"}, f"HELIX_EXTERNAL_METRIC=sqs:jobs: {SPEC_EXPECTED}"),
        (
            {"HELIX_EXTERNAL_METRIC": "sqs:https://sqs.eu-west-1.amazonaws.com/1234/jobs"},  # not an account id
            f"HELIX_EXTERNAL_METRIC=sqs:https://sqs.eu-west-1.amazonaws.com/1234/jobs: {SPEC_EXPECTED}",
        ),
        (
            {"HELIX_EXTERNAL_METRIC": f"sqs:https://sqs.eu-west-1.amazonaws.com/{MOTO_ACCOUNT}/j*"},
            f"HELIX_EXTERNAL_METRIC=sqs:https://sqs.eu-west-1.amazonaws.com/{MOTO_ACCOUNT}/j*: {SPEC_EXPECTED}",
        ),
        (
            {"HELIX_EXTERNAL_METRIC": f"sqs:http://127.0.0.1:4566/{MOTO_ACCOUNT}/jobs"},  # no endpoint override
            f"HELIX_EXTERNAL_METRIC=sqs:http://127.0.0.1:4566/{MOTO_ACCOUNT}/jobs: expected an AWS queue URL, "
            "https://sqs.REGION.amazonaws.com/ACCOUNT/NAME (another host only with HELIX_SQS_ENDPOINT_URL)",
        ),
        ({"HELIX_EXTERNAL_METRIC": "command:"}, f"HELIX_EXTERNAL_METRIC=command:: {SPEC_EXPECTED}"),
        ({"HELIX_EXTERNAL_METRIC": "command:echo 'x"}, f"HELIX_EXTERNAL_METRIC=command:echo 'x: {SPEC_EXPECTED}"),
        ({"HELIX_EXTERNAL_METRIC": "file:backlog"}, f"HELIX_EXTERNAL_METRIC=file:backlog: {SPEC_EXPECTED}"),
        (
            {"HELIX_EXTERNAL_METRIC": "http://me:pw@127.0.0.1/x"},
            "HELIX_EXTERNAL_METRIC=http://me:pw@127.0.0.1/x: expected empty or an http(s)://host… URL without "
            "user:password@",
        ),
        ({"HELIX_EXTERNAL_METRIC": "http:///x"}, "HELIX_EXTERNAL_METRIC=http:///x: expected empty or an http(s)"),
        (
            {"HELIX_EXTERNAL_TARGET": "0"},
            "HELIX_EXTERNAL_TARGET=0: expected a number greater than 0 (the metric's value per instance) with "
            "HELIX_EXTERNAL_METRIC set",
        ),
        ({"HELIX_EXTERNAL_TARGET": "-5"}, "HELIX_EXTERNAL_TARGET=-5: expected a number from 0 to 1e+12"),
        ({"HELIX_EXTERNAL_TARGET": "lots"}, "HELIX_EXTERNAL_TARGET=lots: expected a number from 0 to 1e+12"),
        ({"HELIX_EXTERNAL_TIMEOUT": "0"}, "HELIX_EXTERNAL_TIMEOUT=0: expected a number from 0.1 to 300 seconds"),
        ({"HELIX_EXTERNAL_TIMEOUT": "nan"}, "HELIX_EXTERNAL_TIMEOUT=nan: expected a number from 0.1 to 300 seconds"),
        (
            {"HELIX_EXTERNAL_METRIC_NAME": "queue depth"},
            'HELIX_EXTERNAL_METRIC_NAME=queue depth: expected empty, or a Prometheus series: name or name{label="value",…}',
        ),
        (
            {"HELIX_EXTERNAL_METRIC_NAME": "q{a=b}"},
            'HELIX_EXTERNAL_METRIC_NAME=q{a=b}: expected empty, or a Prometheus series: name or name{label="value",…}',
        ),
        (
            {"HELIX_EXTERNAL_METRIC": "", "HELIX_EXTERNAL_METRIC_NAME": "q"},
            "HELIX_EXTERNAL_METRIC_NAME=q: expected HELIX_EXTERNAL_METRIC set too",
        ),
        (
            {"HELIX_EXTERNAL_METRIC": f"sqs:{QUEUE}", "HELIX_EXTERNAL_METRIC_NAME": "q"},
            "HELIX_EXTERNAL_METRIC_NAME=q: expected it empty with an sqs: metric",
        ),
        (
            {"HELIX_SQS_ENDPOINT_URL": "localhost:4566"},
            "HELIX_SQS_ENDPOINT_URL=localhost:4566: expected empty or an http(s)://host… URL",
        ),
    ],
)
def test_bad_settings_are_one_line_each(env, line):
    base = {"HELIX_ENV_FILE": "", "HELIX_EXTERNAL_METRIC": "command:echo 1", "HELIX_EXTERNAL_TARGET": "10"}
    with pytest.raises(ConfigError) as err:
        load_config({**base, **env})
    assert len(err.value.errors) == 1, err.value.errors
    assert err.value.errors[0].startswith(line) and "\n" not in err.value.errors[0], err.value.errors


# --- file ---------------------------------------------------------------------------------------


def test_file_number_and_the_last_good_value_with_its_age(tmp_path):
    path = tmp_path / "backlog"
    spec = f"file:{path}"
    source = metric(spec)
    assert isinstance(source, FileMetric) and source.kind == "file"

    first = source.read(1000.0)
    failed(first, spec, "expected a readable file (No such file or directory)")
    assert (first.age, first.last_good) == (math.inf, None)  # never a good value yet

    path.write_text("120\n")
    assert source.read(1010.0) == Reading(120.0, 0.0, "", 120.0)
    path.write_text("  37.5  \nsecond line is ignored\n")
    assert source.read(1020.0) == Reading(37.5, 0.0, "", 37.5)

    path.write_text("lots\n")
    stale = source.read(1050.0)
    failed(stale, spec, "expected a number on the first line, got 'lots'")
    assert (stale.last_good, stale.age) == (37.5, 30.0)  # kept, and how old it is
    assert source.read(1080.0).age == 60.0
    path.unlink()
    assert source.read(1090.0).last_good == 37.5


@pytest.mark.parametrize(
    ("content", "part"),
    [
        ("-3\n", "expected a finite number ≥ 0, got '-3'"),
        ("nan\n", "expected a finite number ≥ 0, got 'nan'"),
        ("inf\n", "expected a finite number ≥ 0, got 'inf'"),
        ("12 messages\n", "expected a number on the first line, got '12 messages'"),
        ("\n\n", "expected a number on the first line, got nothing"),
        ("\x1b[31m7\n", "got '?[31m7'"),  # a control character never reaches the log
        ("x" * 100, "got '" + "x" * 40 + "…'"),  # a long value is cut
    ],
)
def test_file_values_that_are_not_a_backlog(tmp_path, content, part):
    path = tmp_path / "backlog"
    path.write_text(content)
    failed(metric(f"file:{path}").read(0.0), f"file:{path}", part)


def test_file_that_is_not_a_regular_file_answers_at_once(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # nobody writes to it: a blocking read would wait forever
    for target in (fifo, tmp_path):
        reading, took = timed(metric(f"file:{target}", HELIX_EXTERNAL_TIMEOUT="0.5"))
        failed(reading, f"file:{target}", "expected a regular file")
        assert took < 2, took


def test_file_with_prometheus_text(tmp_path):
    path = tmp_path / "backlog.prom"
    path.write_text('# TYPE jobs_waiting gauge\njobs_waiting{queue="a"} 4\njobs_waiting{queue="b"} 6\n')
    assert metric(f"file:{path}", HELIX_EXTERNAL_METRIC_NAME='jobs_waiting{queue="b"}').read(0.0).value == 6.0


# --- command ------------------------------------------------------------------------------------


def test_command_prints_a_number():
    source = metric(f"command:{PY} -c 'print(42); print(\"ignored\")'")
    assert isinstance(source, CommandMetric) and source.kind == "command"
    assert source.read(5.0) == Reading(42.0, 0.0, "", 42.0)


def test_command_printing_junk_or_failing_is_an_error():
    junk = f"command:{PY} -c 'print(\"queue is busy\")'"
    failed(metric(junk).read(0.0), junk, "expected a number on the first line, got 'queue is busy'")
    exits = f"command:{PY} -c 'import sys; print(5); sys.exit(\"no route to the queue\")'"
    failed(metric(exits).read(0.0), exits, "expected exit status 0, got 1: 'no route to the queue'")
    missing = "command:/nonexistent/helix-queue-depth --queue jobs"
    failed(
        metric(missing).read(0.0), missing, "expected a command that runs (/nonexistent/helix-queue-depth: No such file"
    )


def test_command_gets_no_helix_secrets(monkeypatch):
    monkeypatch.setenv("HELIX_TOKEN", "fleet-token")
    monkeypatch.setenv("AWS_SECRET_KEY", "seed-secret")
    monkeypatch.setenv("HELIX_TEST_VISIBLE", "1")  # not a secret: passed on
    count = "import os; print(sum(k in os.environ for k in ('HELIX_TOKEN', 'AWS_SECRET_KEY')) * 10 + int(os.environ['HELIX_TEST_VISIBLE']))"
    assert metric(f'command:{PY} -c "{count}"').read(0.0).value == 1.0


def pid_gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_command_hanging_past_the_timeout_is_killed_with_what_it_started(tmp_path):
    pids = tmp_path / "pids"
    # The shell records itself and a background child, then waits on it (for a minute).
    script = f"echo $$ > {pids}.tmp; sleep 60 & echo $! >> {pids}.tmp; mv {pids}.tmp {pids}; wait"
    spec = f'command:sh -c "{script}"'
    source = metric(spec, HELIX_EXTERNAL_TIMEOUT="1")
    reading, took = timed(source)
    failed(reading, spec, "expected an answer within HELIX_EXTERNAL_TIMEOUT=1 s (killed its process group)")
    assert 0.9 < took < 5, took
    shell, child = (int(p) for p in wait_for(pids.read_text, 5, "the command's pid file").split())
    wait_for(lambda: pid_gone(shell) and pid_gone(child), 10, "the command and its child to be killed")


def test_command_that_leaves_a_background_process_behind_does_not_pile_up(tmp_path):
    pid_file = tmp_path / "pid"
    # Answers at once, but leaves a sleeper behind (its output closed, so the read does not wait).
    spec = f"command:sh -c 'sleep 60 >/dev/null 2>&1 & echo $! > {pid_file}; echo 3'"
    assert metric(spec).read(0.0).value == 3.0
    left = int(pid_file.read_text())
    wait_for(lambda: pid_gone(left), 10, "the left-behind process to be killed")


# --- http ---------------------------------------------------------------------------------------


PROMETHEUS = """# HELP queue_depth Messages waiting.
# TYPE queue_depth gauge
queue_depth{queue="jobs"} 42
queue_depth{queue="mail",shard="1"} 3
queue_depth{queue="mail",shard="2"} 4
# HELP jobs_done Jobs finished.
# TYPE jobs_done counter
jobs_done_total 1027
jobs_done_created 1.7e+09
# TYPE temperature gauge
temperature -4
"""


class Site:
    """A real HTTP server on loopback: path -> (status, body); /hang never answers, /trickle sends
    its body one byte at a time, until the test ends."""

    def __init__(self):
        self.routes: dict[str, tuple[int, bytes]] = {}
        self.release = threading.Event()
        site = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                if self.path == "/hang":
                    site.release.wait(60)
                    return
                if self.path == "/trickle":
                    self.send_response(200)
                    self.send_header("Content-Length", "1000")
                    self.end_headers()
                    while not site.release.wait(0.1):  # one byte per tenth of a second: 100 s in all
                        self.wfile.write(b"1")
                        self.wfile.flush()
                    return
                status, body = site.routes.get(self.path, (404, b"not found\n"))
                self.send_response(status)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        serve_in_thread(self.server)

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def site() -> Iterator[Site]:
    made = Site()
    try:
        yield made
    finally:
        made.close()


def test_http_plain_number(site):
    site.routes["/backlog"] = (200, b"17\n")
    source = metric(f"{site.url}/backlog")
    assert isinstance(source, HttpMetric) and source.kind == "http"
    assert source.read(0.0) == Reading(17.0, 0.0, "", 17.0)
    site.routes["/backlog"] = (200, b"<html>busy</html>")
    failed(source.read(1.0), f"{site.url}/backlog", "expected a number on the first line, got '<html>busy</html>'")


@pytest.mark.parametrize(
    ("selector", "value", "part"),
    [
        ('queue_depth{queue="jobs"}', 42.0, ""),
        ('queue_depth{shard="2", queue="mail",}', 4.0, ""),  # label order, spaces, a trailing comma
        ("jobs_done_total", 1027.0, ""),  # a counter's sample, by its sample name
        ("queue_depth", None, "expected one series queue_depth in the Prometheus text, found 3 (add labels"),
        ('queue_depth{queue="mail"}', None, "found 2 (add labels"),
        (
            'queue_depth{queue="sms"}',
            None,
            'expected one series queue_depth{queue="sms"} in the Prometheus text, found 0',
        ),
        ("temperature", None, "expected a finite number ≥ 0, got '-4'"),
    ],
)
def test_http_prometheus_text(site, selector, value, part):
    site.routes["/metrics"] = (200, PROMETHEUS.encode())
    reading = metric(f"{site.url}/metrics", HELIX_EXTERNAL_METRIC_NAME=selector).read(0.0)
    if value is not None:
        assert reading == Reading(value, 0.0, "", value)
    else:
        failed(reading, f"{site.url}/metrics", part)


def test_http_failures_are_errors(site):
    site.routes["/down"] = (503, b"try later\n")
    site.routes["/junk"] = (200, b"queue_depth{{{ 1\n")
    failed(metric(f"{site.url}/down").read(0.0), f"{site.url}/down", "expected HTTP 200, got 503")
    failed(metric(f"{site.url}/nowhere").read(0.0), f"{site.url}/nowhere", "expected HTTP 200, got 404")
    junk = metric(f"{site.url}/junk", HELIX_EXTERNAL_METRIC_NAME="queue_depth").read(0.0)
    failed(junk, f"{site.url}/junk", "expected Prometheus text (")
    closed = f"http://127.0.0.1:{free_port()}/backlog"  # nothing listens there
    failed(metric(closed).read(0.0), closed, "expected an HTTP answer from 127.0.0.1 (")


@pytest.mark.parametrize("path", ["/hang", "/trickle"])
def test_http_that_does_not_finish_in_time_is_an_error(site, path):
    reading, took = timed(metric(f"{site.url}{path}", HELIX_EXTERNAL_TIMEOUT="0.5"))
    failed(reading, f"{site.url}{path}", "expected")
    assert "timed out" in reading.error or "within HELIX_EXTERNAL_TIMEOUT=0.5 s" in reading.error, reading.error
    assert took < 3, took  # the timeout, not the minute /hang waits or the 100 s /trickle takes


def test_https_certificates_are_verified(site):
    # The manager CA's MonitorS certificate: nothing the system trusts, so the read must refuse it.
    directory = manager_pki()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(os.path.join(directory, "monitor.crt"), os.path.join(directory, "monitor.key"))
    site.server.socket = context.wrap_socket(site.server.socket, server_side=True)
    site.routes["/backlog"] = (200, b"5\n")
    url = site.url.replace("http://", "https://") + "/backlog"
    failed(metric(url).read(0.0), url, "expected an HTTP answer from 127.0.0.1 (", "CERTIFICATE_VERIFY_FAILED")


# --- sqs, on moto's server ----------------------------------------------------------------------


def sqs_config(moto: str, queue_url: str, **extra: str):
    return config(f"sqs:{queue_url}", HELIX_SQS_ENDPOINT_URL=moto, **{**CREDENTIALS, **extra})


def test_sqs_visible_messages(moto_endpoint):
    reset_moto(moto_endpoint)
    client = moto_client(moto_endpoint, "sqs")
    url = client.create_queue(QueueName="jobs")["QueueUrl"]
    client.create_queue(QueueName="other")
    cfg = sqs_config(moto_endpoint, url)
    source = make_external(cfg)
    assert isinstance(source, SqsMetric) and source.kind == "sqs"
    assert source.read(0.0) == Reading(0.0, 0.0, "", 0.0)
    for n in range(7):
        client.send_message(QueueUrl=url, MessageBody=f"job {n}")
    assert source.read(1.0).value == 7.0
    # Messages taken by a worker are in flight, not visible: the backlog is what nobody works on.
    taken = client.receive_message(QueueUrl=url, MaxNumberOfMessages=2, VisibilityTimeout=300)["Messages"]
    assert len(taken) == 2 and source.read(2.0).value == 5.0

    # Each call went to that queue only, and the policy `python -m controller_asg.iam` prints for
    # this configuration allows it; the same call about another queue it does not.
    assert source.operations_called == {"GetQueueAttributes"}
    policy = policy_for(cfg, MOTO_ACCOUNT)
    assert len(source.calls) == 3
    for call in source.calls:
        assert call.params["QueueUrl"] == url and call.region == REGION
        assert denied(policy, sqs_requests(call)) == [], call
        other = dataclasses.replace(call, params={**call.params, "QueueUrl": url.replace("/jobs", "/other")})
        assert not allowed(policy, sqs_requests(other)[0])
        elsewhere = dataclasses.replace(call, region="eu-west-1")
        assert not allowed(policy, sqs_requests(elsewhere)[0])
    source.close()


def test_sqs_region_is_the_queue_urls(moto_endpoint):
    # The fleet in eu-west-1, the queue in us-east-1: the client asks us-east-1, where the queue is
    # (moto keeps each region's queues apart, so the wrong region would not find it).
    reset_moto(moto_endpoint)
    client = moto_client(moto_endpoint, "sqs", "us-east-1")
    client.send_message(QueueUrl=client.create_queue(QueueName="jobs")["QueueUrl"], MessageBody="x")
    aws_url = f"https://sqs.us-east-1.amazonaws.com/{MOTO_ACCOUNT}/jobs"
    cfg = sqs_config(moto_endpoint, aws_url, HELIX_AWS_REGION="eu-west-1")
    source = make_external(cfg)
    assert source is not None and source.read(0.0).value == 1.0
    assert isinstance(source, SqsMetric) and {c.region for c in source.calls} == {"us-east-1"}
    assert all(denied(policy_for(cfg, MOTO_ACCOUNT), sqs_requests(c)) == [] for c in source.calls)


def test_sqs_missing_queue_or_endpoint_is_an_error_reading(moto_endpoint):
    reset_moto(moto_endpoint)
    missing = f"{moto_endpoint}/{MOTO_ACCOUNT}/no-such-queue"
    source = make_external(sqs_config(moto_endpoint, missing))
    assert source is not None
    reading = source.read(0.0)
    failed(reading, f"sqs:{missing}", "expected the queue's ApproximateNumberOfMessages (GetQueueAttributes: ")
    assert "NonExistentQueue" in reading.error
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    queue = f"{down}/{MOTO_ACCOUNT}/jobs"
    reading, took = timed(make_external(sqs_config(down, queue, HELIX_EXTERNAL_TIMEOUT="1")))
    failed(reading, f"sqs:{queue}", "expected the queue's ApproximateNumberOfMessages (EndpointConnectionError")
    assert took < 5, took


def test_sqs_without_any_region_is_a_one_line_config_error(moto_endpoint, monkeypatch):
    for key in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE", "AWS_DEFAULT_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)  # no profile to take one from either
    queue = f"{moto_endpoint}/{MOTO_ACCOUNT}/jobs"
    with pytest.raises(ConfigError) as err:
        make_external(sqs_config(moto_endpoint, queue, HELIX_AWS_REGION=""))
    assert err.value.errors == [
        f"HELIX_AWS_REGION=: expected the region of the queue in HELIX_EXTERNAL_METRIC=sqs:{queue} (its URL names none)"
    ]


# --- the local path -----------------------------------------------------------------------------


def test_the_local_path_does_not_import_boto3(procs, tmp_path):
    (tmp_path / "backlog").write_text("8\n")
    code = (
        "import sys; from shared.config import load_config; from controller_asg.external import make_external\n"
        "for spec in sys.argv[1:]:\n"
        "    m = make_external(load_config({'HELIX_ENV_FILE': '', 'HELIX_EXTERNAL_METRIC': spec, "
        "'HELIX_EXTERNAL_TARGET': '1'}))\n"
        "    print(m.kind, m.read(0.0).value)\n"
        "print('boto3' in sys.modules, 'botocore' in sys.modules)\n"
    )
    proc = procs.python(
        "import-check",
        ["-c", code, f"file:{tmp_path / 'backlog'}", "command:echo 9", f"http://127.0.0.1:{free_port()}/x"],
    )
    assert proc.wait(60) == 0, proc.output()
    assert proc.output().strip().splitlines()[-4:] == ["file 8.0", "command 9.0", "http None", "False False"]
