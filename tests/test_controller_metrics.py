"""The controller's Prometheus endpoint: a real HTTP(S) server on loopback, scraped and checked by
promtool like MonitorS's; provider calls timed through a real (local) provider."""

from __future__ import annotations

import dataclasses
import logging
import socket

import pytest
from prometheus_client.parser import text_string_to_metric_families

from controller_asg.events import WebhookSink
from controller_asg.prom import ControllerMetrics, wrap_provider
from controller_asg.providers.local import LocalProvider
from shared.config import Config, load_config
from tests.test_monitor_e2e import assert_promtool_valid, http_get, self_signed_tls, write_private
from tests.test_webhook import captured

LOG = logging.getLogger("tests.controller_metrics")


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    for key in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(key, raising=False)


@pytest.fixture
def cfg(tmp_path) -> Config:
    environ = {
        "HELIX_ENV_FILE": "",
        "HELIX_STATE_DIR": str(tmp_path / "state"),
        "HELIX_TOKEN": "s3cret-token-0123",
        "HELIX_MONITOR_ADDR": "127.0.0.1:5999",
        "HELIX_GROUP": "tg",
    }
    # Port 0 (any free port) is for tests: the setting itself takes 1 to 65535.
    return dataclasses.replace(load_config(environ), controller_metrics_listen="127.0.0.1:0")


@pytest.fixture
def endpoints():
    """Serves through this; every endpoint is closed after the test, failed or not."""
    made = []

    def serve(metrics: ControllerMetrics, cfg: Config, log: logging.Logger = LOG):
        endpoint = metrics.serve(cfg, log)
        if endpoint is not None:
            made.append(endpoint)
        return endpoint

    yield serve
    for endpoint in made:
        endpoint.close()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def status(**overrides):
    values = dict(
        desired=5,
        in_service=3,
        pending=2,
        draining=1,
        frozen=False,
        breaker=True,
        min_=2,
        max_=8,
        suspended={"launch", "scale-in"},
        refresh_percent=40.0,
    )
    values.update(overrides)
    return values


def test_exposition_passes_promtool_and_shows_the_status(cfg, endpoints):
    sink = WebhookSink("http://127.0.0.1:9/unused", queue_size=1)  # never started: its counters only
    metrics = ControllerMetrics(sink=sink)
    endpoint = endpoints(metrics, cfg)
    assert endpoint is not None and endpoint.port > 0
    url = f"http://127.0.0.1:{endpoint.port}/metrics"
    assert endpoint.url == url and endpoint.auth == "no auth"

    code, text, _ = http_get(url)
    assert code == 200
    assert_promtool_valid(text)
    assert "helix_controller_desired_instances" not in text  # no step yet: no made-up value

    for _ in range(3):
        sink.emit({"type": "test"})  # a queue of one: two dropped, one waiting
    metrics.observe_status(**status())
    metrics.count_action("launch")
    metrics.count_action("launch")
    metrics.count_action("breaker-tripped")
    metrics.observe_step(0.2)
    with metrics.provider_call("list"):
        pass
    code, text, _ = http_get(url)
    assert code == 200
    assert_promtool_valid(text)
    got = samples(text)
    expected = {
        "helix_controller_desired_instances": 5,
        "helix_controller_in_service_instances": 3,
        "helix_controller_pending_instances": 2,
        "helix_controller_draining_instances": 1,
        "helix_controller_frozen": 0,
        "helix_controller_breaker_tripped": 1,
        "helix_controller_min_instances": 2,
        "helix_controller_max_instances": 8,
        "helix_controller_refresh_percent_complete": 40,
        "helix_controller_step_seconds_count": 1,
        "helix_controller_webhook_failed_attempts_total": 0,
        "helix_controller_webhook_queued_events": 1,
    }
    assert {name: got[(name, ())] for name in expected} == expected
    suspended = {
        labels[0][1]: value for (name, labels), value in got.items() if name == "helix_controller_suspended_processes"
    }
    assert suspended == {
        "launch": 1,
        "terminate": 0,
        "replace-unhealthy": 0,
        "scale-in": 1,
        "scheduled": 0,
        "refresh": 0,
    }
    assert got[("helix_controller_actions_total", (("kind", "launch"),))] == 2
    assert got[("helix_controller_actions_total", (("kind", "breaker-tripped"),))] == 1
    assert got[("helix_controller_actions_total", (("kind", "terminate"),))] == 0  # known kinds from the start
    assert got[("helix_controller_webhook_events_total", (("outcome", "sent"),))] == 0
    assert got[("helix_controller_webhook_events_total", (("outcome", "dropped"),))] == 2
    assert got[("helix_controller_provider_call_seconds_count", (("call", "list"),))] == 1
    assert got[("helix_controller_provider_errors_total", (("call", "launch"),))] == 0

    # Resumed processes go back to 0, an unknown one appears, and no refresh means no refresh gauge.
    metrics.observe_status(**status(suspended={"custom"}, refresh_percent=None, frozen=True, desired=0))
    code, text, _ = http_get(url)
    assert_promtool_valid(text)
    got = samples(text)
    assert got[("helix_controller_suspended_processes", (("process", "launch"),))] == 0
    assert got[("helix_controller_suspended_processes", (("process", "custom"),))] == 1
    assert got[("helix_controller_frozen", ())] == 1 and got[("helix_controller_desired_instances", ())] == 0
    assert not [key for key in got if key[0] == "helix_controller_refresh_percent_complete"]

    endpoint.close()
    with pytest.raises(OSError):  # closed: the port is free again
        http_get(url, timeout=5)


def test_provider_calls_are_timed_and_errors_counted(cfg):
    metrics = ControllerMetrics()
    local = LocalProvider(cfg)
    provider = wrap_provider(local, metrics)
    try:
        assert provider.name == "local"
        assert provider.state_dir == local.state_dir  # other attributes pass through
        assert provider.list_instances() == []
        with pytest.raises(ValueError, match="count=-1"):
            provider.launch(-1, "token-1")  # the real provider refuses: an error, raised as it was
        provider.terminate(["local-tg-nobody"])  # refused with a warning, not an error
        with pytest.raises(RuntimeError), metrics.provider_call("stop"):
            raise RuntimeError("cloud down")
    finally:
        provider.close()

    def value(name: str, call: str) -> float | None:
        return metrics.registry.get_sample_value(name, {"call": call})

    counts = {call: value("helix_controller_provider_call_seconds_count", call) for call in ("list", "launch")}
    assert counts == {"list": 1, "launch": 1}  # a failed call is timed too
    errors = {
        call: value("helix_controller_provider_errors_total", call)
        for call in ("list", "launch", "terminate", "stop", "start")
    }
    assert errors == {"list": 0, "launch": 1, "terminate": 0, "stop": 1, "start": 0}
    assert value("helix_controller_provider_call_seconds_count", "terminate") == 1


def test_an_address_in_use_is_one_error_line_and_no_endpoint(cfg, endpoints):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = dataclasses.replace(cfg, controller_metrics_listen=f"127.0.0.1:{port}")
        with captured(LOG) as lines:
            assert endpoints(ControllerMetrics(), busy) is None
    assert [(r.levelno, r.getMessage()) for r in lines.records] == [
        (
            logging.ERROR,
            "cannot serve the controller's Prometheus metrics, running on without them: "
            f"HELIX_CONTROLLER_METRICS_LISTEN=127.0.0.1:{port}: cannot listen there (Address already in use)",
        )
    ]


def test_off_is_no_endpoint_and_no_line(cfg, endpoints):
    with captured(LOG) as lines:
        assert endpoints(ControllerMetrics(), dataclasses.replace(cfg, controller_metrics_listen="")) is None
    assert not lines.records


def test_tls_and_basic_auth_as_monitor_s_serves_them(cfg, endpoints, tmp_path):
    import http.client
    import ssl

    cert, key = self_signed_tls(tmp_path)
    auth_file = write_private(tmp_path / "metrics-auth", "prometheus:scrape-pass-0123456789\n")
    secured = dataclasses.replace(cfg, metrics_tls_cert=cert, metrics_tls_key=key, metrics_basic_auth_file=auth_file)
    metrics = ControllerMetrics()
    metrics.observe_status(**status())
    endpoint = endpoints(metrics, secured)
    assert endpoint is not None
    url = f"https://127.0.0.1:{endpoint.port}/metrics"
    assert endpoint.description == f"{url} (basic auth as 'prometheus')"
    trusting = ssl.create_default_context(cafile=cert)
    code, body, headers = http_get(url, context=trusting)
    assert code == 401 and headers["WWW-Authenticate"].startswith("Basic ") and "helix_" not in body
    code, text, _ = http_get(url, context=trusting, auth=("prometheus", "scrape-pass-0123456789"))
    assert code == 200 and samples(text)[("helix_controller_desired_instances", ())] == 5
    assert_promtool_valid(text)
    with pytest.raises((OSError, http.client.HTTPException)):  # plain HTTP to the HTTPS port gets nothing
        http_get(f"http://127.0.0.1:{endpoint.port}/metrics", timeout=5)
