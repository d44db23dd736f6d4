"""The `local` provider: each instance is a real process group on this machine.

An instance is the app (`HELIX_LOCAL_APP_CMD`, optional) and a MonitorC agent in one process group,
started in its own session so it outlives the controller. Everything needed to find it again is
recorded under `HELIX_STATE_DIR`:

  instances/<id>.json   one record per instance (pids, pgid, ports, zone, launch token, start times
                        of the pids so a reused pid is never mistaken for ours), written atomically
  launches/<digest>.json ids launched under a launch token (a retried launch launches nothing new)
  started/<id>          written by the instance's launcher once it may start (an id in a ledger
                        without it never ran, and is not counted as launched)
  protected/<id>        scale-in protection: create this (empty) file to keep an instance out of
                        scale-in; remove it to lift the protection
  logs/<id>.log         the app's and the agent's output

`list_instances` reads those files and checks the pids (no subprocess calls), so it is cheap
enough for a 1 s loop; dead instances are forgotten there. `terminate` sends SIGTERM to the group
and returns at once; a reaper thread (or, after a controller restart, the next `list_instances`)
sends SIGKILL when the grace period has passed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import secrets
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import psutil

from controller_asg.providers.base import LaunchConfig, LaunchError, ProviderInstance
from shared.config import PORT_PLACEHOLDER, Config

log = logging.getLogger("controller_asg.providers.local")

AGENT_ARGV = (sys.executable, "-m", "monitor_c")
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# A pid-less record means a launch died between writing it and starting the process.
_ORPHAN_RECORD_AGE = 30.0
_LEDGER_MAX_AGE = 24 * 3600.0
# Keys the agent and the app must never inherit from the controller (secrets, its own settings).
_PRIVATE_PREFIXES = ("HELIX_", "AWS_")
_PRIVATE_KEYS = {"ACCESS_KEY", "SECRET_KEY", "SESSION_TOKEN", "AWS_ACCESS_KEY", "AWS_SECRET_KEY", "REGION"}


@dataclass
class Member:
    """One process of an instance; `started` is psutil's create_time, to tell a reused pid apart."""

    role: str  # "app" | "agent"
    pid: int
    started: float


@dataclass
class Record:
    instance_id: str
    group: str
    zone: str
    token: str
    launched_at: float
    host: str
    agent_port: int
    app_port: int = 0
    pgid: int = 0
    members: list[Member] = field(default_factory=list)
    terminate_at: float = 0.0  # when SIGTERM was sent; 0 = not terminating
    stopped: bool = False  # paused (SIGSTOP to its group): a warm-pool instance
    secret_digest: str = ""  # SHA-256 (hex) of the secret its agent registers with (the secret is not kept)
    config: str = ""  # the digest of the LaunchConfig it was launched from
    epoch: int = 0  # the leader lease's epoch it was launched under (0: no lease)

    @classmethod
    def from_json(cls, data: dict) -> Record:
        # Fields a newer Helix wrote are left out rather than making the instance unreadable
        # (an unreadable record is an instance nobody sees, and so never terminates).
        known = {f.name for f in dataclasses.fields(cls)}
        data = {k: v for k, v in data.items() if k in known}
        data["members"] = [Member(**m) for m in data.get("members", [])]
        return cls(**data)


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _member_alive(member: Member) -> bool:
    try:
        proc = psutil.Process(member.pid)
        # create_time is rounded differently across reads; a reused pid differs by far more.
        return abs(proc.create_time() - member.started) < 1.0 and proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def _pid_reused(rec: Record, pid: int) -> bool:
    """True when `pid` now belongs to a process other than the member recorded with it."""
    member = next((m for m in rec.members if m.pid == pid), None)
    if member is None:
        return True  # never recorded: not ours to signal
    try:
        return abs(psutil.Process(pid).create_time() - member.started) >= 1.0
    except psutil.NoSuchProcess:
        return False


def _start_time(pid: int) -> float:
    try:
        return psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        return 0.0


class LocalProvider:
    name = "local"

    def __init__(
        self,
        cfg: Config,
        *,
        agent_argv: Sequence[str] | None = None,
        grace: float = 5.0,
        clock: Callable[[], float] = time.time,
    ):
        self.cfg = cfg
        self.group = cfg.group_name
        self.agent_argv = list(agent_argv or AGENT_ARGV)
        self.grace = grace
        self.clock = clock
        self.state_dir = os.path.abspath(cfg.state_dir)
        self.dirs = {
            d: os.path.join(self.state_dir, d) for d in ("instances", "launches", "started", "protected", "logs")
        }
        for path in self.dirs.values():
            os.makedirs(path, exist_ok=True)
        self._lock = threading.RLock()
        self._children: dict[int, subprocess.Popen] = {}  # ours to reap (zombies otherwise)
        self._reapers: list[threading.Thread] = []
        self._closed = threading.Event()
        self._id_prefix = "local-" + re.sub(r"[^A-Za-z0-9-]", "-", self.group)[:40]

    # --- records -----------------------------------------------------------------------------

    def _record_path(self, instance_id: str) -> str:
        return os.path.join(self.dirs["instances"], f"{instance_id}.json")

    def _write(self, rec: Record) -> None:
        _atomic_write(self._record_path(rec.instance_id), json.dumps(asdict(rec), sort_keys=True))

    def _read(self, instance_id: str) -> Record | None:
        try:
            with open(self._record_path(instance_id), encoding="utf-8") as fh:
                return Record.from_json(json.load(fh))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as exc:
            log.warning("instance record %s unreadable, ignored: %s", instance_id, exc)
            return None

    def _records(self) -> list[Record]:
        out = []
        for name in sorted(os.listdir(self.dirs["instances"])):
            if name.endswith(".json"):
                rec = self._read(name[:-5])
                if rec is not None and rec.group == self.group:
                    out.append(rec)
        return out

    def _forget(self, rec: Record, why: str) -> None:
        for path in (self._record_path(rec.instance_id), os.path.join(self.dirs["protected"], rec.instance_id)):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        log.info("instance %s forgotten: %s", rec.instance_id, why)

    def _reap_children(self) -> None:
        for pid, popen in list(self._children.items()):
            if popen.poll() is not None:
                del self._children[pid]

    def _alive(self, rec: Record) -> bool:
        """An instance lives while its agent or its app does. When both are gone, whatever they left
        in the group is killed (the group id is safe to signal: a pid stays reserved while its
        group exists), so a forgotten instance leaves nothing behind."""
        if any(_member_alive(m) for m in rec.members):
            return True
        self._kill(rec, signal.SIGKILL)
        return False

    def _to_instance(self, rec: Record) -> ProviderInstance:
        return ProviderInstance(
            instance_id=rec.instance_id,
            zone=rec.zone,
            launched_at=rec.launched_at,
            state="terminating"
            if rec.terminate_at
            else ("stopped" if rec.stopped else ("running" if rec.members else "pending")),
            protected=os.path.exists(os.path.join(self.dirs["protected"], rec.instance_id)),
            address=f"{rec.host}:{rec.agent_port}",
            launch_token=rec.token,
            secret_digest=rec.secret_digest,
            config=rec.config,
        )

    # --- the contract ------------------------------------------------------------------------

    def list_instances(self) -> list[ProviderInstance]:
        with self._lock:
            self._reap_children()
            now = self.clock()
            out = []
            for rec in self._records():
                if not rec.members:
                    if now - rec.launched_at > _ORPHAN_RECORD_AGE:
                        self._forget(rec, "its launch never started a process")
                        continue
                    out.append(self._to_instance(rec))
                    continue
                if not self._alive(rec):
                    self._forget(rec, "its processes have exited")
                    continue
                if rec.terminate_at and now - rec.terminate_at > self.grace:
                    # A restarted controller finishes what the previous one's reaper started.
                    self._kill(rec, signal.SIGKILL)
                out.append(self._to_instance(rec))
            return out

    def launch_config(self) -> LaunchConfig:
        return LaunchConfig.of({"app_cmd": self.cfg.local_app_cmd})

    def launch(
        self, count: int, token: str, config: LaunchConfig | None = None, *, epoch: int = 0
    ) -> list[ProviderInstance]:
        config = config or self.launch_config()
        if count < 0:
            raise ValueError(f"count={count}: expected 0 or more")
        if not token or len(token) > 256:
            raise ValueError(f"token={token!r}: expected 1 to 256 characters")
        with self._lock:
            live = self.list_instances()
            # Any token is fine: the ledger's file name is its digest.
            digest = hashlib.sha256(token.encode()).hexdigest()[:32]
            ledger_path = os.path.join(self.dirs["launches"], f"{digest}.json")
            launched = self._read_ledger(ledger_path)
            by_id = {i.instance_id: i for i in live}
            # An id the ledger names but that never started (the controller died between the
            # ledger and the launcher's "go") was not launched: launch it anew, never report it.
            never = [i for i in launched if i not in by_id and not os.path.exists(self._started_marker(i))]
            if never:
                log.info("launch %s: %s never started; not counted as launched", token, ", ".join(never))
                launched = [i for i in launched if i not in never]
                _atomic_write(ledger_path, json.dumps({"token": token, "ids": launched, "at": self.clock()}))
            out = [by_id[i] for i in launched if i in by_id]
            missing = count - len(launched)
            if missing <= 0:
                if launched:
                    log.info("launch %s already done (%s); nothing new launched", token, ", ".join(launched))
                return out
            self._prune_ledgers()
            zones = self.cfg.local_zones or ("local",)
            zones_used = {z: 0 for z in zones}
            for inst in live:
                if inst.state != "terminating" and inst.zone in zones_used:
                    zones_used[inst.zone] += 1
            errors = []
            for _ in range(missing):
                zone = min(zones, key=lambda z: zones_used[z])  # ties: first in config order
                instance_id = f"{self._id_prefix}-{secrets.token_hex(3)}"
                # Ledger first: a controller that dies right after the spawn never launches it twice.
                launched.append(instance_id)
                _atomic_write(ledger_path, json.dumps({"token": token, "ids": launched, "at": self.clock()}))
                try:
                    rec = self._spawn(instance_id, zone, token, config, epoch)
                except (OSError, ValueError, LaunchError) as exc:
                    errors.append(str(exc))
                    log.error("launch of %s in %s failed: %s", instance_id, zone, exc)
                    continue
                zones_used[zone] += 1
                out.append(self._to_instance(rec))
                log.info(
                    "launched %s in %s (agent %s:%d, app port %s, pgid %d, launch %s)",
                    instance_id,
                    zone,
                    rec.host,
                    rec.agent_port,
                    rec.app_port or "-",
                    rec.pgid,
                    token,
                )
            if errors and len(out) == 0:
                raise LaunchError(f"local launch {token}: every start failed: {errors[0]}")
            return out

    def terminate(self, instance_ids: Sequence[str]) -> None:
        with self._lock:
            self._reap_children()
            targets = []
            for instance_id in instance_ids:
                rec = self._read(instance_id) if _SAFE_ID.match(instance_id) else None
                if rec is None or rec.group != self.group:
                    log.warning("terminate %s refused: not an instance of group %s", instance_id, self.group)
                    continue
                if not rec.terminate_at:
                    rec.terminate_at = self.clock()
                    self._write(rec)
                self._kill(rec, signal.SIGTERM)
                if rec.stopped:  # a paused group holds the SIGTERM until it runs again
                    self._kill(rec, signal.SIGCONT)
                log.info("terminating %s (SIGTERM to group %d, SIGKILL after %.0fs)", instance_id, rec.pgid, self.grace)
                targets.append(rec)
            if targets:
                reaper = threading.Thread(target=self._reap, args=(targets,), name="helix-local-reaper", daemon=True)
                reaper.start()
                self._reapers = [t for t in self._reapers if t.is_alive()] + [reaper]

    def stop(self, instance_ids: Sequence[str]) -> None:
        """Pause each instance's whole process group (SIGSTOP): it keeps its memory and its port,
        uses no CPU, and resumes where it was, which is what a warm-pool instance is for."""
        self._pause(instance_ids, stop=True)

    def start(self, instance_ids: Sequence[str]) -> None:
        self._pause(instance_ids, stop=False)

    def _pause(self, instance_ids: Sequence[str], stop: bool) -> None:
        verb = "stop" if stop else "start"
        with self._lock:
            for instance_id in instance_ids:
                rec = self._read(instance_id) if _SAFE_ID.match(instance_id) else None
                if rec is None or rec.group != self.group or rec.terminate_at:
                    log.warning("%s %s refused: not a live instance of group %s", verb, instance_id, self.group)
                    continue
                # Recorded first: a controller killed in between finds it as it meant to leave it,
                # and the next stop or start signals the group again (both are idempotent).
                rec.stopped = stop
                self._write(rec)
                self._kill(rec, signal.SIGSTOP if stop else signal.SIGCONT)
                log.info(
                    "%s %s (SIG%s to group %d)",
                    "stopped" if stop else "started",
                    instance_id,
                    "STOP" if stop else "CONT",
                    rec.pgid,
                )

    def close(self) -> None:
        """Stop the reapers. The instances live on; an overdue SIGKILL is sent by the next
        `list_instances`, from this controller or a restarted one."""
        self._closed.set()
        for t in self._reapers:
            t.join(timeout=2)

    # --- processes ---------------------------------------------------------------------------

    def _kill(self, rec: Record, sig: int) -> None:
        if not rec.pgid:
            return
        # Never signal a group whose leader pid now belongs to some other process.
        if _pid_reused(rec, rec.pgid):
            return
        try:
            os.killpg(rec.pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def _reap(self, recs: list[Record]) -> None:
        deadline = time.monotonic() + self.grace
        pending = list(recs)
        while pending and not self._closed.is_set():
            with self._lock:
                self._reap_children()
                pending = [r for r in pending if self._alive(r)]
            if not pending:
                break
            if time.monotonic() >= deadline:
                for rec in pending:
                    log.warning("instance %s still running %.0fs after SIGTERM: SIGKILL", rec.instance_id, self.grace)
                    self._kill(rec, signal.SIGKILL)
                deadline = float("inf")
            self._closed.wait(0.05)
        with self._lock:
            self._reap_children()

    def _child_env(self) -> dict[str, str]:
        return {k: v for k, v in os.environ.items() if not k.startswith(_PRIVATE_PREFIXES) and k not in _PRIVATE_KEYS}

    def _spawn(self, instance_id: str, zone: str, token: str, config: LaunchConfig, epoch: int = 0) -> Record:
        """Start one instance, crash-consistently: nothing runs before its process group is on disk.

        1. the record is written with no process (a crash here leaves a pid-less record: nothing to
           kill, forgotten by `list_instances`);
        2. a launcher `sh` starts in a new session and waits for a line on its stdin;
        3. its pid (the group id, and the agent's pid, since it execs into the agent) is recorded;
        4. only then does it get "go": it marks the instance started (`started/<id>`), starts the
           app and execs the agent.
        A controller killed before step 4 closes the launcher's stdin by dying: the launcher reads
        end-of-file and exits without starting anything. So every running instance process is in a
        recorded group, and a resumed launch can tell an id that never started (no marker).
        """
        cfg = self.cfg
        host = cfg.local_host
        rec = Record(
            instance_id=instance_id,
            group=self.group,
            zone=zone,
            token=token,
            launched_at=self.clock(),
            host=host,
            agent_port=_free_port(host),
            config=config.digest,
            epoch=epoch,
        )
        app_argv: list[str] = []
        app_cmd = config.as_dict().get("app_cmd", "")
        if app_cmd:
            rec.app_port = _free_port(host)
            app_argv = [w.replace("{port}", str(rec.app_port)) for w in shlex.split(app_cmd)]
            if not app_argv:
                raise ValueError(f"HELIX_LOCAL_APP_CMD={app_cmd!r}: expected a command")
            if shutil.which(app_argv[0]) is None:
                raise ValueError(
                    f"HELIX_LOCAL_APP_CMD={app_cmd!r}: expected a command found on PATH, not {app_argv[0]!r}"
                )
        self._write(rec)  # pid-less: a crash from here on is found and forgotten by list_instances

        log_path = os.path.join(self.dirs["logs"], f"{instance_id}.log")
        base = self._child_env()
        base["PYTHONPATH"] = _ROOT + (os.pathsep + base["PYTHONPATH"] if base.get("PYTHONPATH") else "")
        agent_env = dict(base, **self._agent_env(rec, zone, with_app=bool(app_argv)))
        # The agent's own proof of identity: only its digest is written down (the record is not a secret).
        secret = secrets.token_urlsafe(32)
        agent_env["HELIX_INSTANCE_SECRET"] = secret
        rec.secret_digest = hashlib.sha256(secret.encode()).hexdigest()
        try:
            app_pid = self._start_launcher(app_argv, agent_env, log_path, rec)
            if app_pid:
                rec.members.append(Member("app", app_pid, _start_time(app_pid)))
                self._write(rec)
        except (OSError, ValueError):
            # Leave nothing half-started behind.
            self._kill(rec, signal.SIGKILL)
            self._forget(rec, "its start failed")
            raise
        return rec

    def _started_marker(self, instance_id: str) -> str:
        return os.path.join(self.dirs["started"], instance_id)

    def _start_launcher(self, app_argv: list[str], agent_env: dict[str, str], log_path: str, rec: Record) -> int:
        """The launcher: one `sh` in a new session and process group. It waits for "go" (see
        `_spawn`), marks the instance started, starts the app in the background (without the
        agent's HELIX_ settings, the token among them), reports the app's pid, and execs into the
        agent, which keeps its pid: the agent leads the group and is the app's parent
        (`tree:<app pid>` leaves it out). Returns the app's pid (0 with no app)."""
        unset = " ".join(f"-u {k}" for k in sorted(agent_env) if k.startswith("HELIX_"))
        script = (
            'log=$1; marker=$2; shift 2\nIFS= read -r go || exit 0\n[ "$go" = go ] || exit 0\n: >"$marker" || exit 1\n'
        )
        if app_argv:
            script += (
                f'env {unset} PORT={rec.app_port} {shlex.join(app_argv)} </dev/null >>"$log" 2>&1 &\n'
                'echo "$!"\n'
                'exec >>"$log" 2>&1 </dev/null\n'
                'export HELIX_CPU_SOURCE="tree:$!"\n'
            )
        else:
            script += 'echo 0\nexec >>"$log" 2>&1 </dev/null\n'
        script += 'exec "$@"\n'
        with open(log_path, "ab") as out:
            leader = subprocess.Popen(
                [
                    "/bin/sh",
                    "-c",
                    script,
                    "helix-instance",
                    log_path,
                    self._started_marker(rec.instance_id),
                    *self.agent_argv,
                ],
                env=agent_env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=out,
                start_new_session=True,
            )
        self._children[leader.pid] = leader
        assert leader.stdin is not None and leader.stdout is not None
        try:
            rec.pgid = leader.pid
            rec.members.append(Member("agent", leader.pid, _start_time(leader.pid)))
            self._write(rec)  # the group is on disk before anything in it runs
            leader.stdin.write(b"go\n")
            leader.stdin.close()
            # sh answers within milliseconds; the deadline only guards against a wedged machine.
            ready, _, _ = select.select([leader.stdout], [], [], 10.0)
            line = leader.stdout.readline() if ready else b""
        except BrokenPipeError:
            line = b""
        finally:
            leader.stdout.close()
        if not line.strip().isdigit():
            raise OSError(f"instance {rec.instance_id}: the launcher did not start")
        return int(line)

    def _agent_env(self, rec: Record, zone: str, with_app: bool) -> dict[str, str]:
        cfg = self.cfg
        addr = f"[{rec.host}]:{rec.agent_port}" if ":" in rec.host else f"{rec.host}:{rec.agent_port}"
        labels = f"zone={zone}" + (f",app_port={rec.app_port}" if with_app else "")
        env = {
            "HELIX_INSTANCE_ID": rec.instance_id,
            "HELIX_AGENT_LISTEN": addr,
            "HELIX_ADVERTISE_ADDR": addr,
            "HELIX_MONITOR_ADDR": cfg.monitor_addr,
            "HELIX_LABELS": labels,
            # With an app, the launcher sets `tree:<app pid>` once the app has a pid.
            "HELIX_CPU_SOURCE": "host",
            "HELIX_VCPUS": f"{cfg.local_vcpus:g}",
            "HELIX_ENV_FILE": "",
            "HELIX_LOG_LEVEL": cfg.log_level,
        }
        if with_app:
            env["HELIX_APP_CHECK"] = f"tcp://{rec.host}:{rec.app_port}"
        # The manager's lifecycle hooks run on the instance, by its agent; `{port}` is the instance's
        # app port, as in HELIX_LOCAL_APP_CMD (left as written when there is no app).
        for key, command in (("HELIX_LAUNCH_HOOK", cfg.launch_hook), ("HELIX_TERMINATE_HOOK", cfg.terminate_hook)):
            if command:
                env[key] = command.replace("{port}", str(rec.app_port)) if with_app else command
        # The app's request counter, read by the agent: the manager's HELIX_APP_METRICS_URL names
        # every instance's endpoint, `{port}` its app port. Without an app a `{port}` URL names
        # nothing (and an agent given one refuses to start), so it is not passed.
        url = cfg.app_metrics_url
        if url and (with_app or PORT_PLACEHOLDER not in url):
            env["HELIX_APP_METRICS_URL"] = url.replace(PORT_PLACEHOLDER, str(rec.app_port))
            env["HELIX_APP_METRICS_NAME"] = cfg.app_metrics_name
        # No fleet token: the agent proves who it is with its own HELIX_INSTANCE_SECRET (set by
        # `_spawn`) and then accepts only the credential MonitorS hands it. A controller running
        # insecure (no token) starts insecure agents, which accept calls before they register.
        if not cfg.resolved_token():
            env["HELIX_INSECURE"] = "1"
        # The agent speaks to MonitorS as the rest of the manager does: under the manager CA (it gets
        # the CA's public certificate and enrols at registration), or with the same TLS files.
        mode = cfg.effective_tls_mode
        env["HELIX_TLS_MODE"] = mode
        material = (
            [("HELIX_TLS_CA", os.path.join(cfg.effective_pki_dir, "ca.crt"))]
            if mode == "ca"
            else [("HELIX_TLS_CA", cfg.tls_ca), ("HELIX_TLS_CERT", cfg.tls_cert), ("HELIX_TLS_KEY", cfg.tls_key)]
        )
        for key, value in material:
            if value:
                env[key] = os.path.abspath(value)
        return env

    # --- launch ledger -----------------------------------------------------------------------

    @staticmethod
    def _read_ledger(path: str) -> list[str]:
        try:
            with open(path, encoding="utf-8") as fh:
                return list(json.load(fh)["ids"])
        except FileNotFoundError:
            return []
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise LaunchError(f"launch ledger {path}: unreadable ({exc}); remove it to launch again") from None

    def _prune_ledgers(self) -> None:
        cutoff = time.time() - _LEDGER_MAX_AGE
        for path in [
            os.path.join(self.dirs[d], name) for d in ("launches", "started") for name in os.listdir(self.dirs[d])
        ]:
            try:
                if os.stat(path).st_mtime < cutoff:
                    os.unlink(path)
            except FileNotFoundError:
                pass
