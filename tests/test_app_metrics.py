"""The app's request rate (issue 12, requests per second per instance): a real agent reads a
counter from a real HTTP server's Prometheus text endpoint and reports its rate in Metrics.rps, and
MonitorS writes it into the table's `rps` column."""

from __future__ import annotations

import json
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import fields
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import numpy as np
import pytest

from controller_asg.providers.local import LocalProvider
from controller_asg.providers.userdata import render_env_file
from monitor_c.appmetrics import HOLD_MISSES, MetricsError, RateTracker, counter_total
from monitor_s.fleet import Entry, _sample
from protos import helix_pb2, helix_pb2_grpc
from shared.config import ConfigError, load_config
from shared.table import LAYOUT_VERSION, ROW_DTYPE, InstanceRow, MetricsTable, PollSample, State
from tests.procs import free_port, manager_pki, serve_in_thread, wait_for
from tests.test_monitor_e2e import AUTH, agent_env, inspect_json, rows, start_monitor
from tests.test_provider_local import APP_CMD, _kill_recorded, fake_agent, make_cfg
from tests.test_provider_local import agent_env as recorded_agent_env

NAME = "http_requests_total"
RATE = 40.0
TOLERANCE = 0.15  # of the rate: the server's clock and the agent's readings are a few ms apart


class CounterApp:
    """A real HTTP server (a thread of this test process) serving `/metrics`: the counter NAME
    rising at `per_second`, split over two label sets, beside series that must not count."""

    def __init__(self, port: int = 0):
        self.lock = threading.Lock()
        self.base, self.since, self.per_second = 0.0, time.monotonic(), 0.0
        self.scrapes = 0
        app = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # BaseHTTPRequestHandler's name for it
                if self.path != "/metrics":
                    self.send_error(404)
                    return
                body = app.exposition().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/metrics"
        self.thread = serve_in_thread(self.server, "counter-app")

    def value(self) -> float:
        with self.lock:
            return self.base + self.per_second * (time.monotonic() - self.since)

    def set_rate(self, per_second: float) -> None:
        now = self.value()
        with self.lock:
            self.base, self.since, self.per_second = now, time.monotonic(), per_second

    def reset(self) -> None:
        """The app restarted: the counter starts again from 0, at the same rate."""
        with self.lock:
            self.base, self.since = 0.0, time.monotonic()

    def exposition(self) -> str:
        total = self.value()
        with self.lock:
            self.scrapes += 1
        return (
            f"# HELP {NAME} Requests served.\n# TYPE {NAME} counter\n"
            f'{NAME}{{code="200"}} {total * 0.75!r}\n{NAME}{{code="500"}} {total * 0.25!r}\n'
            f'# TYPE http_requests_created gauge\nhttp_requests_created{{code="200"}} 1.7e9\n'
            "# TYPE http_requests_in_flight gauge\nhttp_requests_in_flight 3\n"
        )

    def stop(self) -> None:
        """The endpoint dies: nothing listens on its port any more."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


@pytest.fixture
def counter_apps() -> Iterator[Callable[[int], CounterApp]]:
    """Start CounterApps (on a given port: the same endpoint back); each is stopped at the end."""
    apps: list[CounterApp] = []

    def start(port: int = 0) -> CounterApp:
        apps.append(CounterApp(port))
        return apps[-1]

    yield start
    for app in apps:
        if app.thread.is_alive():
            app.stop()


def near(value: float, rate: float = RATE) -> bool:
    return abs(value - rate) <= TOLERANCE * rate


def metrics(addr: str) -> helix_pb2.Metrics:
    with grpc.insecure_channel(addr) as ch:
        return helix_pb2_grpc.AgentStub(ch).GetMetrics(helix_pb2.GetMetricsRequest(), metadata=AUTH, timeout=5)


def start_agent(procs, url: str, **settings):
    # Nothing listens on the monitor's port: the agent keeps trying to register, which does not
    # matter here; it accepts the fleet token (AUTH) until it has a credential of its own.
    env = agent_env("i-app", free_port(), HELIX_APP_METRICS_URL=url, **settings)
    agent = procs.python("agent", ["-m", "monitor_c"], env)
    addr = env["HELIX_AGENT_LISTEN"]
    wait_for(lambda: metrics(addr), 30, "the agent to serve")
    return agent, addr


# -- the agent, over real gRPC --------------------------------------------------------------------


@pytest.mark.slow
def test_agent_reports_the_rate_and_a_counter_reset_is_never_negative(procs, counter_apps):
    counter_app = counter_apps()
    counter_app.set_rate(RATE)
    agent, addr = start_agent(procs, counter_app.url)
    assert f"app metrics {NAME} at {counter_app.url}" in agent.output()
    wait_for(lambda: near(metrics(addr).rps), 30, f"GetMetrics to report about {RATE}/s")

    # Polled as fast as a caller likes, the endpoint is read at most once per 0.5 s.
    scrapes, started = counter_app.scrapes, time.monotonic()
    wait_for(lambda: time.monotonic() - started >= 2.0 and [metrics(addr) for _ in range(20)], 30, "20 fast polls")
    assert counter_app.scrapes - scrapes <= (time.monotonic() - started) / 0.5 + 1

    # The app restarts: its counter goes back to 0. That reading gives no rate (the last one is
    # reported again), the next one rates from the new value: never a negative or a spike.
    counter_app.reset()
    seen: list[float] = []

    def after_reset() -> bool:
        seen.append(metrics(addr).rps)
        return counter_app.scrapes >= scrapes + 3 and "went down from" in agent.output()

    scrapes = counter_app.scrapes
    wait_for(after_reset, 30, "three readings after the reset")
    assert all(near(rps) for rps in seen), seen
    assert agent.output().count(f"app metrics: {NAME} went down from") == 1


@pytest.mark.slow
def test_a_dead_endpoint_reads_0_after_3_intervals_and_the_agent_keeps_answering(procs, counter_apps):
    counter_app = counter_apps()
    counter_app.set_rate(RATE)
    agent, addr = start_agent(procs, counter_app.url)
    with grpc.insecure_channel(addr) as ch:
        # WatchMetrics: the agent paces the samplings itself, one per 0.6 s tick.
        stream = helix_pb2_grpc.AgentStub(ch).WatchMetrics(
            helix_pb2.WatchMetricsRequest(interval_seconds=0.6), metadata=AUTH, timeout=120
        )
        for m in stream:
            if near(m.rps):
                break
        counter_app.stop()
        after = [next(stream).rps for _ in range(HOLD_MISSES + 4)]
        # The tick right after the stop may still have read the endpoint; from the first one that
        # could not, the last rate is held for two ticks, and the third without a reading says 0.
        first_zero = after.index(0.0)
        assert first_zero in (HOLD_MISSES - 1, HOLD_MISSES), after
        assert all(rps > 0 for rps in after[:first_zero]) and all(rps == 0 for rps in after[first_zero:]), after

        # The agent keeps answering, and said what went wrong once (not once per tick).
        m = metrics(addr)
        assert m.rps == 0 and m.instance_id == "i-app" and agent.alive()
        log = agent.output()
        assert log.count(f"app metrics: {counter_app.url}: connection refused") == 1, log

        # The app comes back (its counter from 0): the rate follows within a few ticks.
        counter_apps(counter_app.port).set_rate(RATE)
        for m in stream:
            if near(m.rps):
                break
        stream.cancel()
    assert agent.output().count(f"app metrics: {counter_app.url} answers again") == 1


@pytest.mark.slow
def test_a_hanging_endpoint_never_slows_a_poll(procs, counter_apps):
    counter_app = counter_apps()
    counter_app.set_rate(RATE)
    agent, addr = start_agent(procs, counter_app.url)
    wait_for(lambda: near(metrics(addr).rps), 30, f"GetMetrics to report about {RATE}/s")
    counter_app.stop()
    took: list[float] = []

    def answered_0() -> bool:
        started = time.monotonic()
        rps = metrics(addr).rps
        took.append(time.monotonic() - started)
        return rps == 0

    # The same port, now a socket whose backlog takes connections that nobody ever answers.
    with socket.create_server(("127.0.0.1", counter_app.port)):
        wait_for(answered_0, 30, "the rate to read 0 while the endpoint hangs")
    # A poll waits for its reading at most WAIT_MAX (0.2 s), never the fetch's timeout (1 s).
    assert max(took) < 0.9, took
    assert agent.output().count(f"app metrics: {counter_app.url}: timeout after 1s") == 1


@pytest.mark.slow
@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("HELIX_APP_METRICS_URL", "ftp://127.0.0.1/metrics"),
        ("HELIX_APP_METRICS_URL", "http://127.0.0.1:99999/metrics"),
        ("HELIX_APP_METRICS_URL", "http:///metrics"),
        ("HELIX_APP_METRICS_NAME", "9requests"),
        ("HELIX_APP_METRICS_NAME", "http-requests"),
        # The manager's placeholder, reaching an agent unfilled: it names no endpoint.
        ("HELIX_APP_METRICS_URL", "http://127.0.0.1:{port}/metrics"),
    ],
)
def test_bad_settings_exit_2_with_one_line(procs, key, value):
    env = agent_env("i-bad", free_port(), **{key: value})
    if key == "HELIX_APP_METRICS_NAME":
        env["HELIX_APP_METRICS_URL"] = "http://127.0.0.1:1/metrics"
    agent = procs.python("agent", ["-m", "monitor_c"], env)
    assert agent.wait(timeout=60) == 2
    lines = [line for line in agent.output().splitlines() if line.strip()]
    assert len(lines) == 1 and f"{key}={value}: expected" in lines[0], lines


# -- end to end: agent -> MonitorS -> the table's rps column ---------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["poll", "stream"])
def test_the_rate_reaches_the_table_and_inspect(procs, table_name, counter_apps, mode):
    counter_app = counter_apps()
    counter_app.set_rate(RATE)
    port = free_port()
    start_monitor(procs, table_name, port, HELIX_POLL_MODE=mode)
    procs.python("agent-rps", ["-m", "monitor_c"], agent_env("i-rps", port, HELIX_APP_METRICS_URL=counter_app.url))
    procs.python("agent-none", ["-m", "monitor_c"], agent_env("i-none", port))
    wait_for(
        lambda: (t := rows(table_name)).keys() == {"i-rps", "i-none"} and near(t["i-rps"].rps),
        60,
        f"the table's rps of i-rps to be about {RATE}",
    )
    assert rows(table_name)["i-none"].rps == 0.0  # no endpoint: no rate
    shown = {r["instance_id"]: r for r in inspect_json(table_name)["instances"]}
    assert near(shown["i-rps"]["rps"]) and shown["i-none"]["rps"] == 0.0


# -- the parts: parsing, the rate rules, the settings ------------------------------------------------


def test_counter_total_sums_the_counter_only():
    text = (
        f"# TYPE {NAME} counter\n"
        f'{NAME}{{code="200"}} 30\n{NAME}{{code="500"}} 12.5\n'
        "# TYPE http_requests_created gauge\nhttp_requests_created 1.7e9\n"
        "# TYPE other_total counter\nother_total 1000\n"
    )
    assert counter_total(text, NAME) == counter_total(text, "http_requests") == 42.5
    # `# TYPE x counter` over `x_total` samples (names differ, as some apps write it): still the counter.
    assert counter_total("# TYPE jobs counter\njobs_total 7\n", "jobs_total") == 7
    assert counter_total("# TYPE jobs counter\njobs 7\n", "jobs") == 7  # a counter without the suffix
    assert counter_total(f"# TYPE {NAME} counter\n", NAME) == 0  # declared, no label set yet


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("other_total 1\n", f"no counter {NAME} in the exposition"),
        (f"# TYPE {NAME} gauge\n{NAME} 1\n", f"{NAME} is a gauge, expected a counter"),
        (f"{NAME} 1\n", f"{NAME} is untyped, expected a counter"),
        (f"# TYPE {NAME} counter\n{NAME} NaN\n", f"{NAME} = nan, expected a finite count of 0 or more"),
        (f"# TYPE {NAME} counter\n{NAME} -3\n", f"{NAME} = -3.0, expected a finite count of 0 or more"),
    ],
)
def test_counter_total_refuses_what_is_not_a_count(text, message):
    with pytest.raises(MetricsError, match=f"^{message}$".replace("(", r"\(").replace(")", r"\)")):
        counter_total(text, NAME)


def test_counter_total_raises_on_text_that_does_not_parse():
    with pytest.raises(ValueError):
        counter_total("http_requests_total{ 1\n", NAME)


def test_rate_rules():
    r = RateTracker()
    assert (r.reading(100, 10.0), r.rate) == ("first", 0.0)  # no rate yet
    assert (r.reading(150, 12.0), r.rate) == ("rate", 25.0)  # over the time between the readings
    assert (r.reading(20, 13.0), r.rate) == ("reset", 25.0)  # went down: the last rate again
    assert (r.reading(30, 14.0), r.rate) == ("rate", 10.0)  # rated from the new value
    assert (r.reading(30, 14.0), r.rate) == ("reset", 10.0)  # no time between: no rate
    # Misses hold the last rate; the HOLD_MISSES-th in a row reads 0; a reading rates again.
    assert [r.miss() for _ in range(HOLD_MISSES + 1)] == [False] * (HOLD_MISSES - 1) + [True, False]
    assert r.rate == 0.0
    r.reading(40, 16.0)
    assert r.rate == 5.0 and r.misses == 0
    r.miss()
    r.reading(41, 17.0)  # a miss between readings does not count towards a later streak
    assert [r.miss() for _ in range(HOLD_MISSES - 1)] == [False] * (HOLD_MISSES - 1) and r.rate == 1.0


def agent_config(**settings: str):
    return load_config({"HELIX_ENV_FILE": "", **settings})


def test_settings():
    cfg = agent_config()
    assert (cfg.app_metrics_url, cfg.app_metrics_name) == ("", NAME)  # off by default
    # The manager's value may name the local instances' port; an IPv6 host and https are URLs too.
    for url in ("http://127.0.0.1:{port}/metrics", "https://[::1]:9100/metrics?x=1", "http://app/metrics"):
        assert agent_config(HELIX_APP_METRICS_URL=url).app_metrics_url == url
    assert agent_config(HELIX_APP_METRICS_NAME="app:requests").app_metrics_name == "app:requests"
    with pytest.raises(ConfigError) as info:
        agent_config(HELIX_APP_METRICS_URL="127.0.0.1:8080/metrics", HELIX_APP_METRICS_NAME="")
    assert info.value.errors == [
        "HELIX_APP_METRICS_URL=127.0.0.1:8080/metrics: expected empty or an http(s)://host[:port]/path URL, "
        "at most 1024 characters (`{port}`: a local instance's app port)",
        "HELIX_APP_METRICS_NAME=: expected a Prometheus metric name ([a-zA-Z_:][a-zA-Z0-9_:]*, at most 200 characters)",
    ]


# -- the table column and MonitorS's write ------------------------------------------------------------


def test_rps_is_the_last_row_column_and_every_other_column_keeps_its_offset():
    assert ROW_DTYPE.names[-1] == "rps" and ROW_DTYPE["rps"] == np.dtype("<f4")
    assert ROW_DTYPE.fields["rps"][1] == 365 and ROW_DTYPE.itemsize == 369
    assert LAYOUT_VERSION == 3  # layout 3 had not shipped without it
    row = InstanceRow("i-1", "10.0.0.1:1", rps=12.5)
    arr = np.zeros(1, dtype=ROW_DTYPE)
    arr[0] = row.to_record()
    assert InstanceRow.from_record(arr[0]) == row


def poll_sample(slot: int, rps: float) -> PollSample:
    return PollSample(
        slot=slot,
        instance_id=f"i-{slot}",
        state=State.HEALTHY,
        app_down_polls=0,
        poll_latency=0.01,
        cpu=0.5,
        mem=0.5,
        disk=0.5,
        load1=0.0,
        load5=0.0,
        load15=0.0,
        net_rx=0.0,
        net_tx=0.0,
        sample_time=time.time(),
        vcpus=1,
        app_live=True,
        app_detail="ok",
        rps=rps,
    )


def test_write_samples_writes_rps_within_the_columns_range(table_name):
    wanted = [12.5, 0.0, 1e9, 0.0, 0.0, 0.0]
    given = [12.5, 0.0, 5e12, math.nan, math.inf, -4.0]  # what a broken agent (or MonitorS) might pass
    with MetricsTable.open_or_create(table_name, 8) as table:
        for slot in range(len(given)):
            table.register(InstanceRow(f"i-{slot}", f"10.0.0.{slot}:1", vcpus=1))
        assert table.write_samples([poll_sample(s, rps) for s, rps in enumerate(given)], now=time.time()) == []
        snap = table.snapshot()
        assert not snap.problems  # every row still passes the readers' checks
        got = {r.instance_id: r.rps for r in snap.instances()}
    assert [got[f"i-{s}"] for s in range(len(given))] == wanted


def test_monitor_carries_rps_and_zeroes_what_is_not_a_rate():
    entry = Entry("i-1", "127.0.0.1:1", slot=3, registered_at=1.0)
    for reported, kept in [(12.5, 12.5), (0.0, 0.0), (math.nan, 0.0), (math.inf, 0.0), (-math.inf, 0.0), (-2.0, 0.0)]:
        assert _sample(entry, helix_pb2.Metrics(rps=reported, app_live=True), 0.01).rps == kept


# -- what the providers give new instances -------------------------------------------------------------


@pytest.fixture
def local_dirs(tmp_path):
    state, envs = str(tmp_path / "state"), tmp_path / "envs"
    envs.mkdir()
    yield state, str(envs)
    _kill_recorded(state)


def launched_env(state_dir: str, env_dir: str, **settings: str) -> dict:
    prov = LocalProvider(make_cfg(state_dir, **settings), agent_argv=fake_agent(env_dir))
    try:
        [inst] = prov.launch(1, "tok-1")
        env = recorded_agent_env(env_dir, inst.instance_id)
        with open(os.path.join(state_dir, "instances", inst.instance_id + ".json")) as fh:
            env["app_port"] = json.load(fh).get("app_port", 0)
        return env
    finally:
        prov.close()


def test_local_instances_get_their_own_app_metrics_url(local_dirs):
    state, envs = local_dirs
    env = launched_env(
        state,
        envs,
        HELIX_LOCAL_APP_CMD=APP_CMD,
        HELIX_APP_METRICS_URL="http://127.0.0.1:{port}/metrics",
        HELIX_APP_METRICS_NAME="app_requests_total",
    )
    assert env["HELIX_APP_METRICS_URL"] == f"http://127.0.0.1:{env['app_port']}/metrics"
    assert env["HELIX_APP_METRICS_NAME"] == "app_requests_total"


@pytest.mark.parametrize(
    "settings",
    [
        {"HELIX_LOCAL_APP_CMD": APP_CMD},  # the manager reads no app metrics: nor do its instances
        {"HELIX_APP_METRICS_URL": "http://127.0.0.1:{port}/metrics"},  # no app, so no port to fill in
    ],
)
def test_local_instances_without_app_metrics(local_dirs, settings):
    state, envs = local_dirs
    env = launched_env(state, envs, **settings)
    assert "HELIX_APP_METRICS_URL" not in env and "HELIX_APP_METRICS_NAME" not in env


def ec2_config(**settings: str):
    return load_config(
        {
            "HELIX_ENV_FILE": "",
            "HELIX_PROVIDER": "ec2",
            "HELIX_GROUP": "g1",
            "HELIX_TOKEN": "tok-12345678",
            "HELIX_EC2_AMI": "ami-1",
            "HELIX_EC2_SUBNETS": "subnet-a",
            "HELIX_AWS_REGION": "us-east-1",
            "HELIX_IMDS_URL": "",
            "HELIX_PKI_DIR": manager_pki(),
            **settings,
        }
    )


def test_ec2_user_data_passes_the_app_metrics_settings():
    env = render_env_file(ec2_config(), "t", {}).splitlines()
    assert not any(line.startswith("HELIX_APP_METRICS_") for line in env)
    env = render_env_file(ec2_config(HELIX_APP_METRICS_URL="http://127.0.0.1:8080/metrics"), "t", {}).splitlines()
    assert 'HELIX_APP_METRICS_URL="http://127.0.0.1:8080/metrics"' in env
    assert f'HELIX_APP_METRICS_NAME="{NAME}"' in env
    with pytest.raises(ValueError, match=r"^HELIX_APP_METRICS_URL=http://127.0.0.1:\{port\}/m: expected a fixed URL"):
        render_env_file(ec2_config(HELIX_APP_METRICS_URL="http://127.0.0.1:{port}/m"), "t", {})


def test_poll_sample_and_instance_row_default_rps_is_0():
    given = {f.name: getattr(poll_sample(0, 1.0), f.name) for f in fields(PollSample) if f.name != "rps"}
    assert PollSample(**given).rps == 0.0 and InstanceRow("i-1", "10.0.0.1:1").rps == 0.0
