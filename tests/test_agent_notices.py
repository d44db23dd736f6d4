"""EC2's Spot notices (instance-action, rebalance recommendation) in every Metrics message: a real
agent polling the fake IMDS (tests/fake_imds.py), called over real gRPC on loopback."""

from __future__ import annotations

from datetime import UTC, datetime

import grpc
import pytest

from monitor_c.notices import ImdsClient, ImdsError, Notice, NoticeState, parse_notice
from protos import helix_pb2, helix_pb2_grpc
from tests.fake_imds import ACTION_PATH, REBALANCE_PATH, serve_imds
from tests.procs import free_port, wait_for
from tests.test_monitor_e2e import AUTH, agent_env

DUE = datetime(2026, 11, 30, 5, 10, tzinfo=UTC).timestamp()


def metrics(addr: str) -> helix_pb2.Metrics:
    with grpc.insecure_channel(addr) as ch:
        return helix_pb2_grpc.AgentStub(ch).GetMetrics(helix_pb2.GetMetricsRequest(), metadata=AUTH, timeout=5)


def reporting(addr: str, notice: int):
    def check():
        m = metrics(addr)
        return m if m.notice == notice else None

    return check


def polls(imds) -> int:
    return imds.requests.count(f"GET {ACTION_PATH}")


@pytest.mark.slow
def test_notices_reach_every_metrics_message_and_survive_imds_failing(procs):
    with serve_imds() as imds:
        imds.meta(instance_id="i-spot1")
        imds.rebalance("2026-11-30T05:00:00Z")
        imds.spot_action("terminate", "2026-11-30T05:10:00Z")  # an interruption wins over a rebalance
        env = agent_env("", free_port(), HELIX_IMDS_URL=imds.url)
        agent = procs.python("agent", ["-m", "monitor_c"], env)
        addr = env["HELIX_AGENT_LISTEN"]
        m = wait_for(reporting(addr, helix_pb2.NOTICE_INTERRUPTION), 30, "the interruption notice")
        assert m.notice_at == DUE and m.instance_id == "i-spot1"
        assert "EC2 notices on" in agent.output()

        # IMDS failing: metrics still answered, the last known notice kept, the failure logged once.
        imds.failing = 500
        seen = polls(imds)
        wait_for(lambda: polls(imds) >= seen + 2, 20, "two polls of a failing IMDS")
        m = metrics(addr)
        assert m.notice == helix_pb2.NOTICE_INTERRUPTION and m.notice_at == DUE
        assert agent.output().count("IMDS did not answer (GET /latest/meta-data/spot/instance-action: HTTP 500)") == 1

        imds.failing = 0
        imds.spot_action(None)
        m = wait_for(reporting(addr, helix_pb2.NOTICE_REBALANCE), 20, "the rebalance recommendation")
        assert m.notice_at == 0  # notice_at is when an interruption is due; a rebalance has none
        imds.rebalance(None)
        wait_for(reporting(addr, helix_pb2.NOTICE_NONE), 20, "the notice to clear")

        imds.stop()  # IMDS down altogether: metrics still answered
        wait_for(lambda: agent.output().count("IMDS did not answer") == 2, 20, "the agent to notice IMDS is down")
        m = metrics(addr)
        assert m.notice == helix_pb2.NOTICE_NONE and m.instance_id == "i-spot1" and agent.alive()
    log = agent.output()
    # One line as each notice appears (and goes), not one per poll.
    assert log.count("EC2 notice: INTERRUPTION (terminate at 2026-11-30T05:10:00Z") == 1
    assert log.count("EC2 notice: REBALANCE (rebalance recommended at 2026-11-30T05:00:00Z)") == 1
    assert log.count("EC2 notice cleared (was REBALANCE") == 1
    assert log.count("EC2 notices: IMDS answers again") == 1


@pytest.mark.slow
def test_no_notices_when_the_identity_is_not_from_imds(procs):
    with serve_imds() as imds:
        imds.meta(instance_id="i-imds")
        imds.spot_action("terminate")
        # Its id is configured, so this is not (known to be) the instance IMDS speaks for.
        env = agent_env("i-configured", free_port(), HELIX_IMDS_URL=imds.url)
        agent = procs.python("agent", ["-m", "monitor_c"], env)
        addr = env["HELIX_AGENT_LISTEN"]
        m = wait_for(lambda: metrics(addr), 30, "the agent to serve")
        assert m.notice == helix_pb2.NOTICE_NONE and m.notice_at == 0
        assert "EC2 notices off" in agent.output()
        assert f"GET {ACTION_PATH}" not in imds.requests


def test_parse_notice():
    assert parse_notice(None, None) == NoticeState()
    stop = parse_notice('{"action": "stop", "time": "2026-11-30T05:10:00Z"}', '{"noticeTime": "x"}')
    assert stop == NoticeState(Notice.INTERRUPTION, DUE, "stop at 2026-11-30T05:10:00Z")
    # No zone: UTC, as IMDS speaks.
    assert parse_notice('{"action": "terminate", "time": "2026-11-30T05:10:00"}', None).at == DUE
    # There but unreadable: still an interruption, due at an unknown time.
    assert parse_notice("<html>", None) == NoticeState(Notice.INTERRUPTION, 0.0, "? at an unknown time")
    assert parse_notice('{"action": "hibernate", "time": "soon"}', None).at == 0.0
    assert parse_notice(None, "[]") == NoticeState(Notice.REBALANCE, 0.0, "rebalance recommended at ?")
    assert [n.value for n in Notice] == [
        helix_pb2.NOTICE_NONE,
        helix_pb2.NOTICE_REBALANCE,
        helix_pb2.NOTICE_INTERRUPTION,
    ]


def test_imds_client_keeps_its_token_and_tells_404_from_no_answer():
    with serve_imds() as imds:
        client = ImdsClient(imds.url)
        imds.rebalance("t")
        assert client.get_many([ACTION_PATH, REBALANCE_PATH]) == {
            ACTION_PATH: None,
            REBALANCE_PATH: '{"noticeTime": "t"}',
        }
        imds.spot_action("terminate")
        assert list(client.get_many([ACTION_PATH, REBALANCE_PATH], stop_at_first=True)) == [ACTION_PATH]
        assert imds.requests.count("PUT /latest/api/token") == 1  # one token for many polls
        imds.failing = 503
        with pytest.raises(ImdsError, match="HTTP 503"):
            client.get_many([ACTION_PATH])
        imds.stop()
        with pytest.raises(ImdsError, match="ConnectionRefusedError"):
            client.get_many([ACTION_PATH])
