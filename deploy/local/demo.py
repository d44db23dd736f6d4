"""`make demo`: the whole system on this machine, under a replayed day of real traffic.

    python -m deploy.local.demo [--duration 180] [--curve nasa|spike | --trace FILE] [--peak-rps N]
                                [--out DIR] [--plain] [--summary-json FILE] [--no-drain]
                                [--request-log]

It starts MonitorS and ControllerASG as two separate OS processes, exactly as the systemd units
would (`python -m monitor_s`, `python -m controller_asg`, settings in an environment file), with
the `local` provider, a fresh random token, a unique segment name and a state dir of its own.
Each instance the controller launches runs `deploy/local/sample_app.py` (CPU per request) with a
MonitorC agent measuring that app's process tree. Once the first instance is healthy, the load
generator replays the demand curve (a day of NASA-HTTP 1995 by default) over the remaining time,
spreading requests over the instances in service in the table.

Scale-in drains: the controller publishes the drain, the load generator stops sending to that
instance, and the instance's terminate hook (deploy/local/drain_hook.py) waits until its app has
nothing in flight before the controller terminates it (at most HELIX_DRAIN_TIMEOUT, 20 s here).
`--no-drain` (or DEMO_DRAIN=0) terminates at once instead, for comparison; the summary says why
each failed request failed.

It ends after `--duration` seconds (default: $DEMO_DURATION, else 180) or on Ctrl-C, stops every
process it started (controller first so it replaces nothing, then the load, the instances, and
MonitorS), removes its segment and state, prints a summary and writes a PNG plot (demand,
instances, mean CPU over time) plus the run's logs to `--out` (default `demo-out/`). A crash of
any part ends the demo the same way. If the demo itself is killed (SIGKILL), its watchdog
(`deploy/local/cleanup.py`) cleans up; the next demo also cleans any run left behind.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psutil
from rich.console import Console
from rich.markup import escape

from deploy.local import cleanup
from deploy.local.cleanup import MARKER_KEY, RUNS_ROOT, RunRecord
from deploy.local.loadgen import BUILTIN_CURVES, CAUSES, CurveError, builtin_curve, per_second, read_curve
from deploy.local.plot import Sample, summarize, write_plot
from deploy.local.view import Action, Frame, View
from shared.config import EXIT_BAD_CONFIG, ConfigError, load_config
from shared.table import ControllerStatus, InstanceRow, MetricsTable, State, TableError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_DURATION = 180
WORK_MS = 10.0
ALLOTMENT_CORES = 0.25  # the CPU each instance is sized for: 4 at their target fit this 2-core machine
# The curve's busiest second needs this many instances at the CPU target (a request costs the app
# about 0.6 ms of CPU on top of its work, so the true need is ~6 % higher: 3.4, i.e. 4 instances).
PEAK_INSTANCES = 3.2
STARTUP_TIMEOUT = 60.0
# Drain: a scale-in waits this long at most for the instance's requests to finish (the hook takes
# about DRAIN_QUIET seconds when they do). The quiet time covers the load generator's one look at
# the table per second: a request may still arrive up to a second after the drain is published.
DRAIN_TIMEOUT = 20
DRAIN_QUIET = 1.5


class DemoError(Exception):
    """The demo cannot go on; one line saying why."""


# ---------------------------------------------------------------------------------------------
# Settings


@dataclass
class Tuning:
    """The demo's settings: what is tuned for a short run, and what makes this run its own."""

    duration: int
    work_ms: float
    vcpus: str
    cpu_target: float
    peak_rps: float
    tuned: dict[str, str]  # in the environment file; the caller's environment may override them
    own: dict[str, str] = field(default_factory=dict)  # in the process environment, always this run's
    overridden: dict[str, str] = field(default_factory=dict)  # tuned keys the caller's environment sets

    def shown(self) -> list[str]:
        """The tuned settings in effect: a value from the caller's environment wins, and says so.
        The interpreter's path is left out of the hook: it is this Python, and long."""
        return [
            f"{k}={self.overridden[k]} (yours)"
            if k in self.overridden
            else f"{k}={v.replace(sys.executable, 'python')}"
            for k, v in self.tuned.items()
        ] + [f"work {self.work_ms:g} ms CPU/request", f"peak {self.peak_rps:.0f} req/s"]


def drain_hook_command(quiet: float = DRAIN_QUIET) -> str:
    """HELIX_TERMINATE_HOOK for the demo's instances; the local provider fills in `{port}`."""
    return f"{sys.executable} -m deploy.local.drain_hook --port {{port}} --quiet {quiet:g}"


def tune(duration: int, work_ms: float, peak_rps: float | None, drain: bool = True) -> Tuning:
    # Each instance is sized at ALLOTMENT_CORES of this machine, with the usual target.
    vcpus, target = f"{ALLOTMENT_CORES:g}", 0.5
    rps_per_instance = target * float(vcpus) / (work_ms / 1000.0)
    peak = peak_rps if peak_rps else round(PEAK_INSTANCES * rps_per_instance, 1)
    tuned = {
        # The agent's CPU is measured between two polls: a 1 s window holds enough requests to
        # keep the sampling noise well inside the tolerance (0.5 s made single samples jump 30 %).
        "HELIX_POLL_INTERVAL": "1",
        "HELIX_CONTROL_INTERVAL": "1",
        "HELIX_UNHEALTHY_AFTER": "3",
        "HELIX_MIN_INSTANCES": "1",
        "HELIX_MAX_INSTANCES": "6",
        "HELIX_CPU_TARGET": f"{target:g}",
        "HELIX_TOLERANCE": "0.1",
        "HELIX_WARMUP": "2",  # a sample app is ready in well under a second
        "HELIX_SCALE_IN_WINDOW": str(max(5, duration // 15)),  # 12 s for 3 minutes, 5 s in CI
        "HELIX_HEALTH_GRACE": "30",
        "HELIX_LAUNCH_LEAD": "5",  # `predictive`: a local instance is in service ~2 s after launch
        "HELIX_COOLDOWN": "5",
        "HELIX_LOCAL_VCPUS": vcpus,
        "HELIX_METRICS_LISTEN": "",
        "HELIX_LOG_LEVEL": "info",
        # 0 turns draining off: terminate at once, as before drain existed.
        "HELIX_DRAIN_TIMEOUT": str(DRAIN_TIMEOUT) if drain else "0",
    }
    if drain:
        tuned["HELIX_TERMINATE_HOOK"] = drain_hook_command()
    return Tuning(duration, work_ms, vcpus, target, peak, tuned)


OWN_KEYS = (
    "HELIX_ENV_FILE",
    "HELIX_TOKEN",
    "HELIX_TOKEN_FILE",
    "HELIX_SHM_NAME",
    "HELIX_SHM_DIR",
    "HELIX_STATE_DIR",
    "HELIX_GROUP",
    "HELIX_MONITOR_LISTEN",
    "HELIX_MONITOR_ADDR",
    "HELIX_PROVIDER",
    "HELIX_LOCAL_APP_CMD",
    "HELIX_ACTIVITY_LOG",
)


def check_environment(tuning: Tuning, environ: dict[str, str]) -> list[str]:
    """What the caller's environment gets wrong, before anything is created: the demo's own keys
    are replaced by this run's, every other setting is checked as the processes will read it."""
    env = {k: v for k, v in environ.items() if k not in OWN_KEYS}
    env = tuning.tuned | env | {"HELIX_ENV_FILE": "", "HELIX_INSECURE": "1"}
    try:
        load_config(env)
    except ConfigError as exc:
        return exc.errors
    return []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# The run


def _tail(path: str, offset: int) -> tuple[list[str], int]:
    """Complete new lines of `path` from `offset`, and the offset after them."""
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1
    lines = data[:end].decode("utf-8", errors="replace").splitlines()
    return [x for x in lines if x.strip()], offset + end


class Demo:
    def __init__(self, args: argparse.Namespace, console: Console):
        self.args = args
        self.console = console
        # `make chaos` builds its own args and tuning: what it leaves out takes the demo's defaults.
        self.tuning = tune(args.duration, args.work_ms, args.peak_rps, drain=getattr(args, "drain", True))
        self.stop_reason = ""
        self.failed_part = ""
        self.run_id = secrets.token_hex(6)
        self.shm_name = f"helix-demo-{self.run_id}"
        self.record: RunRecord | None = None
        self.popen: dict[str, subprocess.Popen] = {}
        self.samples: list[Sample] = []
        self.actions: list[Action] = []
        self.served = self.failed = 0
        self.causes: Counter[str] = Counter()  # failed requests by cause (loadgen.CAUSES)
        self.t0 = time.time()
        self.load_started: float | None = None
        self.table: MetricsTable | None = None
        self._offsets = {"stats": 0, "activity": 0}
        self._last: dict = {}
        self.cpu_target = self.tuning.cpu_target
        self.drain_timeout = 0.0
        self.env: dict[str, str] = {}
        self.logs_dir = ""
        self.ended = 0.0

    # -- paths ----------------------------------------------------------------------------------

    def path(self, *parts: str) -> str:
        assert self.record is not None
        return os.path.join(self.record.run_dir, *parts)

    # -- environment ----------------------------------------------------------------------------

    def build_env(self) -> dict[str, str]:
        """The environment of MonitorS and ControllerASG: the caller's, plus the env file (tuned
        settings, which the caller's environment may override, as systemd's Environment= would),
        plus this run's own keys, which nothing overrides."""
        with open(self.path("helix.env"), "w", encoding="utf-8") as fh:
            fh.write("# helix demo settings, tuned for a short run\n")
            for k, v in self.tuning.tuned.items():
                fh.write(f"{k}={v}\n")
        token_file = self.path("token")
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(32) + "\n")
        port = free_port()
        app_cmd = f"{sys.executable} -m deploy.local.sample_app --port {{port}} --work-ms {self.tuning.work_ms:g}"
        own = {
            "HELIX_ENV_FILE": self.path("helix.env"),
            "HELIX_TOKEN_FILE": token_file,
            "HELIX_SHM_NAME": self.shm_name,
            "HELIX_SHM_DIR": "",  # the demo's table is a /dev/shm segment, which it removes at the end
            "HELIX_STATE_DIR": self.path("state"),
            "HELIX_GROUP": f"demo-{self.run_id}",
            "HELIX_MONITOR_LISTEN": f"127.0.0.1:{port}",
            "HELIX_MONITOR_ADDR": f"127.0.0.1:{port}",
            "HELIX_PROVIDER": "local",
            "HELIX_LOCAL_APP_CMD": app_cmd,
            "HELIX_ACTIVITY_LOG": self.path("activity.jsonl"),
        }
        self.tuning.own = own
        self.tuning.overridden = {k: os.environ[k] for k in self.tuning.tuned if k in os.environ}
        env = {k: v for k, v in os.environ.items() if k not in OWN_KEYS}
        env.update(own)
        env[MARKER_KEY] = self.run_id
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        try:
            cfg = load_config(env)
        except ConfigError as exc:
            raise DemoError("bad configuration: " + "; ".join(exc.errors)) from None
        self.cpu_target = cfg.cpu_target
        self.drain_timeout = cfg.drain_timeout  # the caller's environment may have set it
        return env

    # -- processes ------------------------------------------------------------------------------

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = open(self.path(f"{name}.log"), "ab")
        try:
            proc = subprocess.Popen(
                argv,
                env=env,
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()
        self.popen[name] = proc
        assert self.record is not None
        self.record.add(name, proc.pid)
        return proc

    def check_parts(self) -> None:
        for name in ("monitor", "controller"):
            proc = self.popen.get(name)
            if proc is not None and proc.poll() is not None:
                self.failed_part = name
                raise DemoError(f"{name} exited with status {proc.returncode}; see its log below")
        gen = self.popen.get("loadgen")
        if gen is not None and gen.poll() not in (None, 0):
            self.failed_part = "loadgen"
            raise DemoError(f"the load generator exited with status {gen.returncode}")

    def track_instances(self) -> None:
        """Record the controller's descendants (the instances), for cleanup if all else fails."""
        proc = self.popen.get("controller")
        if proc is None or self.record is None:
            return
        known = {s.pid for s in self.record.procs}
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(proc.pid).children(recursive=True):
                if child.pid not in known:
                    self.record.add("instance", child.pid)

    # -- watching -------------------------------------------------------------------------------

    def wait(self, cond: Callable[[], object], timeout: float, what: str, view: View) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            self.check_parts()
            if self.stop_reason:
                return
            if time.monotonic() > deadline:
                raise DemoError(f"timed out after {timeout:.0f}s waiting for {what}")
            self.tick(view, phase=f"waiting for {what}")
            time.sleep(0.5)

    def attach(self) -> MetricsTable | None:
        """The table, once MonitorS has created it; None before."""
        if self.table is None:
            try:
                self.table = MetricsTable.attach(self.shm_name)
            except TableError:
                return None
        return self.table

    def healthy_with_app(self) -> bool:
        table = self.attach()
        if table is None:
            return False
        return any(r.state == State.HEALTHY and r.app_port for r in table.snapshot().instances())

    def tick(self, view: View, phase: str = "running") -> None:
        """One look at everything: table, load stats, activity log; update the view and timeline."""
        now = time.time()
        elapsed = now - self.t0
        instances: list[InstanceRow] = []
        controller: ControllerStatus | None = None
        table = self.attach()
        if table is not None:
            snap = table.snapshot()
            instances, controller = snap.instances(), snap.controller
        self.track_instances()
        self.read_load_stats()
        lines, self._offsets["activity"] = _tail(self.path("activity.jsonl"), self._offsets["activity"])
        for line in lines:
            with contextlib.suppress(ValueError, KeyError):
                rec = json.loads(line)
                action = Action(
                    at=float(rec["time"]) - self.t0,
                    action=str(rec["action"]),
                    count=int(rec.get("count", 0)),
                    reason=str(rec.get("reason", "")),
                    instance_ids=tuple(rec.get("instance_ids") or ()),
                )
                self.actions.append(action)
                view.action(action)
        healthy = [r for r in instances if r.state == State.HEALTHY]
        mean_cpu = sum(r.cpu for r in healthy) / len(healthy) if healthy else None
        last = self._last if self.load_started is not None else {}
        frame = Frame(
            elapsed=elapsed,
            duration=self.args.duration,
            demand=last.get("demand", 0.0),
            served=last.get("served", 0),
            failed=last.get("failed", 0),
            served_total=self.served,
            failed_total=self.failed,
            instances=instances,
            mean_cpu=mean_cpu,
            cpu_target=self.cpu_target,
            phase=phase,
        )
        if controller is not None:
            frame.controller = controller
        view.update(frame)
        if phase == "running":  # the timeline covers the load only
            self.samples.append(
                Sample(
                    t=round(elapsed, 2),
                    demand=frame.demand,
                    served=frame.served,
                    failed=frame.failed,
                    healthy=len(healthy),
                    registered=len(instances),
                    desired=frame.controller.desired,
                    mean_cpu=mean_cpu,
                )
            )

    def read_load_stats(self) -> None:
        """The load generator's new per-second lines; its final line's totals of causes replace the
        running sums (it settles the last failures' causes only as it ends)."""
        if self.record is None:
            return
        lines, self._offsets["stats"] = _tail(self.path("loadgen.jsonl"), self._offsets["stats"])
        for line in lines:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                rec = json.loads(line)
                if rec.get("final"):
                    self.causes = Counter(rec.get("causes") or {})
                    continue
                self._last = rec
                self.served += rec["served"]
                self.failed += rec["failed"]
                self.causes.update(rec.get("causes") or {})

    def failure_causes(self) -> dict[str, int]:
        """Failed requests by cause, every cause named (0 included); what no cause was counted for
        (a load generator killed before it settled them) as `unknown`."""
        out = {cause: self.causes.get(cause, 0) for cause in CAUSES}
        unknown = self.failed - sum(out.values())
        if unknown > 0:
            out["unknown"] = unknown
        return out

    # -- the whole run --------------------------------------------------------------------------

    def run(self, view: View) -> None:
        args = self.args
        env = self.env
        py = sys.executable
        if self.stop_reason:  # Ctrl-C before anything started
            return
        self.start("monitor", [py, "-m", "monitor_s"], env)
        self.wait(self.attach, 30, "MonitorS's table", view)
        if self.stop_reason:
            return
        self.start("controller", [py, "-m", "controller_asg"], env)
        self.wait(self.healthy_with_app, STARTUP_TIMEOUT, "the first healthy instance", view)
        if self.stop_reason:
            return
        left = int(args.duration - (time.time() - self.t0))
        if left < 10:
            raise DemoError(f"only {left}s of the {args.duration}s demo left after start-up; raise --duration")
        gen_argv = [
            py,
            "-m",
            "deploy.local.loadgen",
            "--duration",
            str(left),
            "--peak-rps",
            str(self.tuning.peak_rps),
            "--stats",
            self.path("loadgen.jsonl"),
        ]
        gen_argv += ["--trace", args.trace] if args.trace else ["--curve", args.curve]
        if getattr(args, "request_log", False):
            gen_argv += ["--requests", self.path("requests.jsonl")]
        self.load_started = time.time()
        self.start("loadgen", gen_argv, env)
        view.message(f"load: {args.trace or args.curve} curve over {left}s, peak {self.tuning.peak_rps:g} req/s")
        next_tick = time.monotonic()
        while not self.stop_reason:
            self.check_parts()
            if self.popen["loadgen"].poll() is not None:
                self.tick(view, phase="finishing")  # its last stats; the instances are idle now
                self.stop_reason = "the demand curve has been replayed"
                break
            if time.time() - self.t0 >= args.duration + 5:
                self.stop_reason = f"{args.duration}s are up"
                break
            self.tick(view)
            next_tick += 1.0
            time.sleep(max(0.0, next_tick - time.monotonic()))

    def shutdown(self, log: Callable[[str], None]) -> None:
        """Stop everything in order: controller, load, instances, MonitorS; then sweep and remove."""
        self.ended = time.time()
        if self.record is None:
            return
        rec = self.record
        self.track_instances()
        log("stopping: controller first (so it replaces nothing), then the load, the instances, MonitorS")
        started = time.monotonic()
        if self.table is not None:
            self.table.close()
            self.table = None
        cleanup.stop_run(rec, grace=5.0)
        self.read_load_stats()  # the load generator's last lines, written as it stopped
        self.copy_logs()  # with everything stopped, the logs are complete
        cleanup.remove_run(rec)
        for proc in self.popen.values():  # reap our children (clean_run has ended them)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        self.popen.clear()
        log(f"stopped every process and removed the segment and state in {time.monotonic() - started:.1f}s")

    def copy_logs(self) -> None:
        """Keep the run's logs beside the plot (the run dir itself is removed)."""
        dest = os.path.join(self.args.out, f"helix-demo-{self.stamp}-logs")
        with contextlib.suppress(OSError):
            os.makedirs(dest, exist_ok=True)
            for name in sorted(os.listdir(self.path())):
                if name.endswith((".log", ".jsonl", ".env")):
                    shutil.copy2(self.path(name), dest)
            inst_logs = self.path("state", "logs")
            if os.path.isdir(inst_logs):
                shutil.copytree(inst_logs, os.path.join(dest, "instances"), dirs_exist_ok=True)
        self.logs_dir = dest

    @property
    def stamp(self) -> str:
        return time.strftime("%Y%m%d-%H%M%S", time.localtime(self.t0)) + f"-{self.run_id[:4]}"


# ---------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m deploy.local.demo", description=__doc__.splitlines()[0])
    env_duration = os.environ.get("DEMO_DURATION", "")
    parser.add_argument(
        "--duration",
        type=int,
        default=None,
        help=f"seconds the demo runs (default $DEMO_DURATION, else {DEFAULT_DURATION})",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--curve", choices=BUILTIN_CURVES, default="nasa", help="built-in demand curve (default nasa)")
    source.add_argument(
        "--trace", metavar="FILE", help="your own demand curve: one number per line, stretched over the run"
    )
    parser.add_argument(
        "--peak-rps",
        type=float,
        default=None,
        help="requests per second at the curve's peak (default: what about 3.2 instances serve at the CPU target)",
    )
    parser.add_argument("--work-ms", type=float, default=WORK_MS, help=f"CPU ms per request (default {WORK_MS:g})")
    parser.add_argument("--out", default="demo-out", help="directory for the plot and the logs (default demo-out)")
    parser.add_argument("--plain", action="store_true", help="plain progress lines even on a terminal")
    parser.add_argument("--summary-json", metavar="FILE", help="also write the summary as JSON here")
    parser.add_argument(
        "--no-drain",
        dest="drain",
        action="store_false",
        default=None,
        help="terminate at once on scale-in, without draining (default: $DEMO_DRAIN, else drain)",
    )
    parser.add_argument(
        "--request-log",
        action="store_true",
        help="keep one JSON line per request (requests.jsonl, with the logs): what the drain bench reads",
    )
    args = parser.parse_args(argv)
    if args.drain is None:
        raw = os.environ.get("DEMO_DRAIN", "1").strip() or "1"
        if raw not in ("0", "1"):
            parser.error(
                f"DEMO_DRAIN={raw}: expected 1 (drain before terminating, the default) or 0 (terminate at once)"
            )
        args.drain = raw == "1"
    if args.duration is None:
        if env_duration:
            try:
                args.duration = int(env_duration)
            except ValueError:
                parser.error(f"DEMO_DURATION={env_duration}: expected a whole number of seconds")
        else:
            args.duration = DEFAULT_DURATION
    if not 20 <= args.duration <= 86400:
        parser.error(f"duration={args.duration}: expected 20 to 86400 seconds")
    if args.peak_rps is not None and not 0 < args.peak_rps <= 2000:
        parser.error(f"--peak-rps={args.peak_rps:g}: expected a number greater than 0, at most 2000")
    if not 0 < args.work_ms <= 200:
        parser.error(f"--work-ms={args.work_ms:g}: expected a number greater than 0, at most 200")
    try:
        curve = read_curve(args.trace) if args.trace else builtin_curve(args.curve)
        per_second(curve, args.duration, 1.0)
    except CurveError as exc:
        parser.error(str(exc))
    if args.trace:
        args.trace = os.path.abspath(args.trace)
    args.out = os.path.abspath(args.out)
    return args


def prepare_run(run: Any, prog: str, console: Console, runs_root: str, out: str) -> int:
    """What the demo and `make chaos` do before they start anything: check the caller's
    environment as the processes will read it (EXIT_BAD_CONFIG, one line per problem), clean up runs
    a killed predecessor left under `runs_root`, make the output directories, and turn SIGINT,
    SIGTERM and SIGHUP into the run's stop reason. 0 when the run may go on."""
    errors = check_environment(run.tuning, dict(os.environ))
    if errors:
        for line in errors:
            print(f"{prog}: bad configuration: {line}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    for run_dir in cleanup.clean_stale_runs(runs_root):
        console.print(f"cleaned up a {prog} run left behind: {run_dir}")
    os.makedirs(out, exist_ok=True)
    os.makedirs(runs_root, exist_ok=True)

    def on_signal(signum: int, frame: object) -> None:
        if not run.stop_reason:
            run.stop_reason = f"{signal.Signals(signum).name} received"

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    return 0


def begin_run(run: Any, runs_root: str) -> tuple[str, subprocess.Popen[bytes]]:
    """Record a run (the demo's, or `make chaos`'s: anything with run_id, shm_name and a `record`
    to set) and start its watchdog, which cleans up should this process be killed outright."""
    run_dir = tempfile.mkdtemp(prefix=f"{run.run_id}-", dir=runs_root)
    run.record = RunRecord(
        run_dir=run_dir,
        run_id=run.run_id,
        shm_name=run.shm_name,
        demo_pid=os.getpid(),
        demo_started=cleanup.process_started(os.getpid()) or 0.0,
    )
    run.record.save()
    # The watchdog carries no run marker: it must outlive the sweep that its own cleanup does.
    watchdog_env = {k: v for k, v in os.environ.items() if k != MARKER_KEY}
    watchdog_env["PYTHONPATH"] = ROOT + (
        os.pathsep + watchdog_env["PYTHONPATH"] if watchdog_env.get("PYTHONPATH") else ""
    )
    watchdog = subprocess.Popen(
        [sys.executable, "-m", "deploy.local.cleanup", "--watch", str(os.getpid()), run_dir],
        env=watchdog_env,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    run.record.add("watchdog", watchdog.pid)
    return run_dir, watchdog


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    console = Console(highlight=False, markup=False)  # paths and reasons print as they are
    live = console.is_terminal and not args.plain
    console.soft_wrap = not live  # plain lines stay one line each in a log
    demo = Demo(args, console)
    refused = prepare_run(demo, "demo", console, RUNS_ROOT, args.out)
    if refused:
        return refused
    run_dir, watchdog = begin_run(demo, RUNS_ROOT)
    assert demo.record is not None

    t = demo.tuning
    status = 0
    error = ""
    try:
        demo.env = demo.build_env()
        console.print(
            f"[bold]Helix demo[/bold]: {args.duration}s, {escape(args.trace or args.curve)} demand curve, peak "
            f"{t.peak_rps:g} req/s, {t.work_ms:g} ms CPU per request, {t.vcpus} vCPU per instance "
            f"(target {demo.cpu_target:g} of it)",
            markup=True,
        )
        console.print(f"run {demo.run_id}: segment /dev/shm/{demo.shm_name}, state {run_dir}")
        console.print("settings tuned for a short demo: " + " ".join(t.shown()))
        console.print(
            "steer it from another terminal: "
            f"helix-ctl --socket {os.path.join(demo.path('state'), 'controller', 'ctl.sock')} status "
            "(set-capacity, suspend, refresh start, history)"
        )
        console.print("Ctrl-C stops it at any time and cleans up.")
        with View(console, live, t.shown()) as view:
            demo.run(view)
    except DemoError as exc:
        error = str(exc)
        status = 1
    except BaseException as exc:  # noqa: BLE001 - whatever happened, clean up below, then say what
        error = f"{type(exc).__name__}: {exc}"
        status = 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # the cleanup must not be cut short
        demo.shutdown(lambda m: console.print(m))
        with contextlib.suppress(subprocess.TimeoutExpired):
            watchdog.wait(timeout=10)
    if error:
        console.print(f"[red]demo stopped: {escape(error)}[/red]", markup=True)
        if demo.failed_part:
            log_path = os.path.join(demo.logs_dir, f"{demo.failed_part}.log")
            with contextlib.suppress(OSError), open(log_path, encoding="utf-8", errors="replace") as fh:
                console.print(fh.read()[-3000:], markup=False)
    elif demo.stop_reason:
        console.print(f"demo ended: {demo.stop_reason}")
    summary = summarize(demo.samples, demo.actions, demo.served, demo.failed, demo.ended - demo.t0)
    if demo.samples:
        plot = os.path.join(args.out, f"helix-demo-{demo.stamp}.png")
        title = (
            f"Helix demo: {args.trace or args.curve} curve, peak {t.peak_rps:g} req/s, "
            f"{t.work_ms:g} ms/request, target {t.cpu_target:g} of {t.vcpus} vCPU"
        )
        summary.plot = write_plot(plot, demo.samples, demo.actions, demo.cpu_target, title)
    console.print("[bold]summary[/bold]", markup=True)
    for line in summary.lines():
        console.print("  " + line)
    causes = demo.failure_causes()
    console.print("  failed by cause:   " + ", ".join(f"{k} {v}" for k, v in causes.items()))
    drain = (
        f"on, at most {demo.drain_timeout:g} s per instance" if demo.drain_timeout > 0 else "off (terminate at once)"
    )
    console.print(f"  drain on scale-in: {drain}")
    console.print(f"  plot:              {summary.plot or '(no load ran, no plot)'}")
    console.print(f"  logs:              {demo.logs_dir}")
    if os.path.exists(run_dir) or os.path.exists(f"/dev/shm/{demo.shm_name}"):
        console.print(f"  LEFT BEHIND:       {run_dir} or /dev/shm/{demo.shm_name}", style="red")
        status = status or 1
    else:
        console.print(f"  left behind:       nothing (segment {demo.shm_name} and {run_dir} removed)")
    if args.summary_json:
        with open(args.summary_json, "w", encoding="utf-8") as fh:
            json.dump(
                summary.as_dict()
                | {
                    "failed_by_cause": causes,
                    "drain_timeout": demo.drain_timeout,
                    "run_id": demo.run_id,
                    "shm_name": demo.shm_name,
                    "run_dir": run_dir,
                    "error": error,
                    "stop_reason": demo.stop_reason,
                    "procs": [p.__dict__ for p in demo.record.procs],
                    "samples": [s.__dict__ for s in demo.samples],
                    "actions": [a.__dict__ for a in demo.actions],
                },
                fh,
            )
    return status


if __name__ == "__main__":
    sys.exit(main())
