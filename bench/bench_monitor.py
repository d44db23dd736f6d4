"""MonitorS at scale and the agent's own footprint.

    python -m bench monitor                          # the default sweep
    python -m bench.bench_monitor --steps 100,1000 --cycles 5    # a short run

Simulated agents: a few processes, each one grpc.aio server bound to many loopback ports (one
port per simulated agent, so MonitorS keeps one channel per agent exactly as in production), each
registering every port through the real Registry. The real `python -m monitor_s` polls them every
second. For each fleet size it prints the cycle time (median, p99, from the table header MonitorS
writes every cycle), MonitorS's CPU seconds per 1,000 polls (from /proc, over the polls its
Prometheus counter reports) and failed polls; the sweep stops after the first size whose cycle
no longer fits in the interval. Then a real `python -m monitor_c`, polled every second, gets its
time-to-registered, RSS and CPU share measured.

Everything, simulated agents included, shares this machine's cores: the figures are for the
whole setup on one box, not for MonitorS alone.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import os
import resource
import shutil
import signal
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKEN = "bench-token-0123456789"
AGENTS_PER_SIM = 1000


# ---------------------------------------------------------------------------------------------
# Simulated agents (run in child processes: `python -m bench.bench_monitor --sim ...`)


async def _sim(count: int, monitor: str, prefix: str) -> None:
    import grpc
    import grpc.aio

    from protos import helix_pb2, helix_pb2_grpc

    credentials: dict[str, bytes] = {}  # instance id -> the bearer its Register answer gave it

    def authorized(instance_id: str, context: grpc.aio.ServicerContext) -> bool:
        # As a real agent does (shared/rpc_security.py): its own credential, compared in constant time.
        expected = credentials.get(instance_id, b"")
        return any(
            key == "authorization"
            and hmac.compare_digest(value if isinstance(value, bytes) else value.encode(), expected)
            for key, value in context.invocation_metadata() or ()
        )

    class SimAgent(helix_pb2_grpc.AgentServicer):
        async def Heartbeat(
            self, request: helix_pb2.HeartbeatRequest, context: grpc.aio.ServicerContext
        ) -> helix_pb2.HeartbeatResponse:
            return helix_pb2.HeartbeatResponse(agent_time=time.time(), agent_version="sim", app_live=True)

        async def GetMetrics(
            self, request: helix_pb2.GetMetricsRequest, context: grpc.aio.ServicerContext
        ) -> helix_pb2.Metrics:
            if not authorized(request.instance_id, context):
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer")
            return self.metrics(request.instance_id)

        async def WatchMetrics(
            self, request: helix_pb2.WatchMetricsRequest, context: grpc.aio.ServicerContext
        ) -> AsyncIterator[helix_pb2.Metrics]:
            if not authorized(request.instance_id, context):
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer")
            while True:
                yield self.metrics(request.instance_id)
                await asyncio.sleep(request.interval_seconds)

        @staticmethod
        def metrics(instance_id: str) -> helix_pb2.Metrics:
            return helix_pb2.Metrics(
                cpu=0.42,
                vcpus=2,
                mem=0.3,
                load1=0.5,
                load5=0.4,
                load15=0.3,
                net_rx_bps=1e4,
                net_tx_bps=2e4,
                disk=0.5,
                app_live=True,
                app_detail="sim",
                sample_time=time.time(),
                instance_id=instance_id,
            )

    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    helix_pb2_grpc.add_AgentServicer_to_server(SimAgent(), server)
    ports = [server.add_insecure_port("127.0.0.1:0") for _ in range(count)]
    await server.start()
    md = (("authorization", f"Bearer {TOKEN}"),)
    async with grpc.aio.insecure_channel(monitor) as channel:
        stub = helix_pb2_grpc.RegistryStub(channel)
        for start in range(0, count, 200):
            answers = await asyncio.gather(
                *(
                    stub.Register(
                        helix_pb2.RegisterRequest(
                            instance_id=f"{prefix}-{i}",
                            address=f"127.0.0.1:{ports[i]}",
                            vcpus=2,
                            agent_version="sim",
                            labels={"zone": "sim"},
                        ),
                        metadata=md,
                        timeout=30,
                    )
                    for i in range(start, min(start + 200, count))
                )
            )
            for i, answer in zip(range(start, min(start + 200, count)), answers, strict=True):
                credentials[f"{prefix}-{i}"] = f"Bearer {answer.credential}".encode()
    print(f"registered {count}", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(0)


# ---------------------------------------------------------------------------------------------
# The driver


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _scrape(port: int) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        if family.name in ("helix_polls", "helix_registered_instances"):
            for s in family.samples:
                out[s.name + ("_" + s.labels["result"] if "result" in s.labels else "")] = s.value
    return out


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def run(steps: list[int], cycles: int, interval: float, mode: str) -> None:
    import psutil

    from shared.table import MetricsTable
    from tests.procs import ProcessPool, base_env, free_port, wait_for

    _raise_fd_limit()
    name = f"helix-bench-{os.getpid()}"
    state_dir = tempfile.mkdtemp(prefix="helix-bench-monitor-")
    port, metrics_port = free_port(), free_port()
    pool = ProcessPool()
    env = base_env(
        HELIX_TOKEN=TOKEN,
        HELIX_SHM_NAME=name,
        HELIX_STATE_DIR=state_dir,  # MonitorS's credential key
        HELIX_SHM_CAPACITY=max(steps) + 16,
        HELIX_MONITOR_LISTEN=f"127.0.0.1:{port}",
        HELIX_POLL_INTERVAL=interval,
        HELIX_METRICS_LISTEN=f"127.0.0.1:{metrics_port}",
        HELIX_LOG_LEVEL="error",
        # Thousands of simulated agents on one loopback address and no controller: no roster and no
        # per-source registration limit (the poll cycle is what is measured).
        HELIX_ROSTER="off",
        HELIX_REGISTER_RATE=0,
    )
    env["HELIX_POLL_MODE"] = mode
    table = None
    try:
        monitor = pool.python("monitor_s", ["-m", "monitor_s"], env)
        wait_for(lambda: MetricsTable.attach(name), 60, "MonitorS to create its table")
        table = MetricsTable.attach(name)
        wait_for(lambda: table.snapshot().monitor.pid == monitor.pid, 60, "MonitorS heartbeat")
        mon = psutil.Process(monitor.pid)

        # -- the real agent's footprint first, while the fleet is small --------------------------
        agent_port = free_port()
        agent_env = {
            **env,
            "HELIX_INSTANCE_ID": "real-agent",
            "HELIX_AGENT_LISTEN": f"127.0.0.1:{agent_port}",
            "HELIX_ADVERTISE_ADDR": f"127.0.0.1:{agent_port}",
            "HELIX_MONITOR_ADDR": f"127.0.0.1:{port}",
            "HELIX_LABELS": "zone=bench",
            "HELIX_APP_CHECK": f"tcp://127.0.0.1:{metrics_port}",
            "HELIX_LOG_LEVEL": "warning",
        }
        reg_times = []
        for attempt in range(3):
            started = time.monotonic()
            agent = pool.python("agent", ["-m", "monitor_c"], agent_env)
            wait_for(
                lambda: any(r.instance_id == "real-agent" for r in table.snapshot().instances()),
                60,
                "the real agent to register",
                interval=0.005,
            )
            reg_times.append(time.monotonic() - started)
            if attempt < 2:
                agent.signal(signal.SIGTERM)
                agent.wait(30)
                wait_for(
                    lambda: not any(r.instance_id == "real-agent" for r in table.snapshot().instances()),
                    30,
                    "the stopped agent's row to be freed",
                )
        proc = psutil.Process(agent.pid)
        time.sleep(2 * interval)  # let start-up CPU settle before the measured window
        cpu0, t0 = sum(proc.cpu_times()[:2]), time.monotonic()
        window = max(10.0, 10 * interval)
        time.sleep(window)
        cpu1, t1 = sum(proc.cpu_times()[:2]), time.monotonic()
        mem = proc.memory_full_info()
        rss, uss, pss = mem.rss / 2**20, mem.uss / 2**20, mem.pss / 2**20
        print(
            f"agent: time-to-registered {min(reg_times):.2f} s (best of 3; all {', '.join(f'{t:.2f}' for t in reg_times)}); "
            f"RSS {rss:.1f} MB (private {uss:.1f} MB, PSS {pss:.1f} MB: the rest is shared library code); CPU {100 * (cpu1 - cpu0) / (t1 - t0):.2f}% of one core while polled every "
            f"{interval:g} s ({window:.0f} s window)",
            flush=True,
        )

        # -- the sweep ---------------------------------------------------------------------------
        print(
            f"MonitorS mode: {mode}, interval {interval:g} s, {os.cpu_count()} CPUs, load average now "
            f"{os.getloadavg()[0]:.1f}",
            flush=True,
        )
        print(
            f"{'agents':>7} {'cycle p50':>10} {'cycle p99':>10} {'max':>7} {'CPU-s/1k polls':>15} "
            f"{'MonitorS CPU':>13} {'failed':>7} {'oldest row':>11} {'load1':>6}",
            flush=True,
        )
        have = 0
        for n in steps:
            while have < n:
                count = min(AGENTS_PER_SIM, n - have)
                pool.python(
                    f"sim-{have}",
                    [
                        "-m",
                        "bench.bench_monitor",
                        "--sim",
                        str(count),
                        "--monitor",
                        f"127.0.0.1:{port}",
                        "--prefix",
                        f"sim{have}",
                    ],
                    env,
                )
                have += count
            wait_for(
                lambda: table.snapshot().monitor.registered >= n + 1,  # noqa: B023 - wait_for calls it before the loop moves on
                300,
                f"{n} simulated agents to register",
                interval=0.2,
            )
            # Two full cycles after the last registration before measuring.
            hb = table.snapshot().monitor.heartbeat
            wait_for(lambda: table.snapshot().monitor.heartbeat > hb + 2 * interval, 60, "two warm-up cycles")  # noqa: B023 - wait_for calls it before the loop moves on
            before = _scrape(metrics_port)
            c0 = sum(mon.cpu_times()[:2])
            samples: dict[float, float] = {}
            last = 0.0
            staleness: list[float] = []
            unpolled = 0  # rows never polled successfully yet (registered during the window)
            while len(samples) < cycles:
                snap = table.snapshot()
                status = snap.monitor
                if status.heartbeat != last:
                    last = status.heartbeat
                    samples[last] = status.cycle_seconds
                    # Freshness, comparable across modes: the oldest row at the end of this cycle.
                    live = snap.live
                    polled = live[live["last_seen"] > 0]
                    unpolled = max(unpolled, len(live) - len(polled))
                    staleness.append(float((status.heartbeat - polled["last_seen"]).max()) if len(polled) else 0.0)
                time.sleep(min(0.05, interval / 10))
            c1 = sum(mon.cpu_times()[:2])
            after = _scrape(metrics_port)
            ok = after.get("helix_polls_total_ok", 0) - before.get("helix_polls_total_ok", 0)
            failed = after.get("helix_polls_total_error", 0) - before.get("helix_polls_total_error", 0)
            values = list(samples.values())
            p50, p99 = statistics.median(values), _pct(values, 0.99)
            per_k = (c1 - c0) / max(ok + failed, 1) * 1000
            share = (c1 - c0) / (len(values) * interval)
            print(
                f"{n + 1:>7} {p50:>9.3f}s {p99:>9.3f}s {max(values):>6.3f}s {per_k:>15.3f} {share:>12.0%} "
                f"{int(failed):>7} {max(staleness):>10.3f}s {os.getloadavg()[0]:>6.1f}"
                + (f"  ({unpolled} rows not polled yet)" if unpolled else ""),
                flush=True,
            )
            if p99 >= interval or failed > 0.01 * (ok + failed) or max(staleness) > 2 * interval:
                print(
                    f"stop: at {n + 1} agents a cycle no longer fits in the {interval:g} s interval "
                    "(slow cycles, failed polls or stale rows)",
                    flush=True,
                )
                break
    finally:
        pool.stop_all()
        if table is not None:
            table.close()
        MetricsTable.remove(name)
        shutil.rmtree(state_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench_monitor", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--steps",
        default="100,1000,2000,3000,4000,5000,6000",
        help="fleet sizes (simulated agents), comma-separated, increasing",
    )
    parser.add_argument("--cycles", type=int, default=10, help="cycles measured per size")
    parser.add_argument("--interval", type=float, default=1.0, help="HELIX_POLL_INTERVAL")
    parser.add_argument("--mode", default="both", choices=("poll", "stream", "both"), help="HELIX_POLL_MODE")
    parser.add_argument("--sim", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--monitor", help=argparse.SUPPRESS)
    parser.add_argument("--prefix", default="sim", help=argparse.SUPPRESS)
    args = parser.parse_args(argv if argv is not None else [])
    if args.sim:
        _raise_fd_limit()
        asyncio.run(_sim(args.sim, args.monitor, args.prefix))
        return
    for mode in ("poll", "stream") if args.mode == "both" else (args.mode,):
        run([int(s) for s in args.steps.split(",")], args.cycles, args.interval, mode)


if __name__ == "__main__":
    main(sys.argv[1:])
