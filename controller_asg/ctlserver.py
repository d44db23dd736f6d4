"""The controller's control socket: how `helix-ctl` (controller_asg/ctl.py) talks to a running
ControllerASG.

A Unix stream socket (HELIX_CTL_SOCKET, default `<HELIX_STATE_DIR>/controller/ctl.sock`), one
request and one response per connection, each one line of JSON:

    request:  {"op": "set-capacity", "args": {...}, "reason": "incident 42"}
    response: {"ok": true, "result": {...}}
              {"ok": false, "error": "<one line>", "code": "bad-request" | "refused" | "internal"}

Who may talk to it: the socket file is mode 0600 (its directory 0700 when this makes it), and the
kernel's word on the peer (SO_PEERCRED) is checked on every connection: only the controller's own
effective uid and root are served. A connection gets `read_timeout` seconds to send its request
(at most `max_request` bytes); each is served in its own short-lived thread, at most
`max_connections` at once, so a slow or oversized client never holds up another.

The shapes of every op's arguments are checked here (`validate`), and the handler is given a
complete, normalised `args` dict (every key of the op present, defaults filled in, "all" expanded
to every process). The handler raises `CtlError` for a request that is well-formed but cannot be
done; anything else it raises is an `internal` error, logged with its traceback.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import pwd
import selectors
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

OPS = ("status", "set-capacity", "suspend", "resume", "refresh", "schedule", "history")
PROCESSES = ("launch", "terminate", "replace-unhealthy", "scale-in", "scheduled", "refresh")
REFRESH_ACTIONS = ("start", "status", "cancel", "rollback")
SCHEDULE_ACTIONS = ("add", "remove", "list")
CODES = ("bad-request", "refused", "internal")

MAX_REQUEST = 64 * 1024  # bytes, the newline included
READ_TIMEOUT = 5.0  # seconds a connection has to send its whole request
MAX_CONNECTIONS = 16  # served at once; beyond that a connection is refused at once
MAX_REASON = 500  # characters
MAX_HISTORY_LIMIT = 100_000
DEFAULT_HISTORY_LIMIT = 100
SUN_PATH_MAX = 107  # bytes of a Unix socket path on Linux (108 with the terminating NUL)
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class CtlError(Exception):
    """Raised by the handler: the request cannot be done. `code` is one of CODES."""

    def __init__(self, message: str, code: str = "bad-request"):
        if code not in CODES:
            raise ValueError(f"CtlError code {code!r}: expected one of {', '.join(CODES)}")
        super().__init__(message)
        self.message = message
        self.code = code


class CtlServerError(RuntimeError):
    """The control socket cannot be served (another live controller owns it, a path problem)."""


class CtlUnreachable(Exception):
    """The client could not get an answer: no socket, nobody listening, a timeout, a garbled reply."""


@dataclass(frozen=True)
class Caller:
    """Who is on the other end of a connection, as the kernel says (SO_PEERCRED)."""

    pid: int
    uid: int
    user: str  # the user name, or 'uid N' when the uid has none


Handler = Callable[[str, dict[str, Any], Caller, str], dict[str, Any]]


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except (KeyError, OverflowError):
        return f"uid {uid}"


def one_line(text: str, limit: int = 500) -> str:
    """`text` with every run of whitespace (newlines included) made one space, cut at `limit`."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


# ---------------------------------------------------------------------------------------------
# Validation of each op's arguments: shapes and plain ranges only (what the controller can do is
# the handler's to say).


def _show(value: Any) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return one_line(text, 80)


def _bad(name: str, value: Any, expected: str) -> CtlError:
    return CtlError(f"{name}={_show(value)}: expected {expected}", "bad-request")


def _int(name: str, value: Any, lo: int, hi: int, *, nullable: bool) -> int | None:
    if value is None and nullable:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise _bad(name, value, f"an integer from {lo} to {hi}{' or null' if nullable else ''}")
    return value


def _float(name: str, value: Any, lo: float, hi: float, *, nullable: bool, lo_open: bool = False) -> float | None:
    if value is None and nullable:
        return None
    bound = f"greater than {lo:g}" if lo_open else f"from {lo:g}"
    expected = f"a number {bound} to {hi:g}{' or null' if nullable else ''}"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad(name, value, expected)
    number = float(value)
    if not math.isfinite(number) or not lo <= number <= hi or (lo_open and number == lo):
        raise _bad(name, value, expected)
    return number


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _bad(name, value, "true or false")
    return value


def _processes(name: str, value: Any) -> list[str]:
    expected = f"a non-empty list of process names from {', '.join(PROCESSES)} (or all)"
    if not isinstance(value, list) or not value or not all(isinstance(p, str) for p in value):
        raise _bad(name, value, expected)
    for item in value:
        if item != "all" and item not in PROCESSES:
            raise _bad(name, item, f"one of {', '.join(PROCESSES)} or all")
    if "all" in value:
        return list(PROCESSES)
    return [p for p in PROCESSES if p in value]  # deduplicated, in a fixed order


def _checkpoints(name: str, value: Any) -> list[float]:
    expected = "a list of percentages greater than 0 up to 100, in increasing order"
    if not isinstance(value, list) or len(value) > 100:
        raise _bad(name, value, expected)
    out: list[float] = []
    for i, item in enumerate(value):
        pct = _float(f"{name}[{i}]", item, 0, 100, nullable=False, lo_open=True)
        assert pct is not None
        if out and pct <= out[-1]:
            raise _bad(name, value, expected)
        out.append(pct)
    return out


# Each op's arguments: name -> (default, checker). A missing argument takes its default.
_Check = Callable[[str, Any], Any]
_DAY = 86400.0
_SPECS: dict[str, dict[str, tuple[Any, _Check]]] = {
    "status": {},
    "set-capacity": {
        "min": (None, lambda n, v: _int(n, v, 0, 1_000_000, nullable=True)),
        "max": (None, lambda n, v: _int(n, v, 0, 1_000_000, nullable=True)),
        "desired": (None, lambda n, v: _int(n, v, 0, 1_000_000, nullable=True)),
        "for": (None, lambda n, v: _float(n, v, 0, 366 * _DAY, nullable=True, lo_open=True)),
        "clear": (False, _bool),
    },
    "suspend": {"processes": (None, _processes)},
    "resume": {"processes": (None, _processes)},
    "refresh": {
        "action": (None, lambda n, v: v),  # checked in validate: the other arguments depend on it
        "min_healthy": (None, lambda n, v: _float(n, v, 0, 100, nullable=True)),
        "max_healthy": (None, lambda n, v: _float(n, v, 100, 200, nullable=True)),
        "warmup": (None, lambda n, v: _float(n, v, 0, 7 * _DAY, nullable=True)),
        "checkpoints": ([], _checkpoints),
        "checkpoint_delay": (None, lambda n, v: _float(n, v, 0, 30 * _DAY, nullable=True)),
        "skip_matching": (True, _bool),
        "auto_rollback": (True, _bool),
        "allow_above_max": (False, _bool),
    },
    "schedule": {
        "action": (None, lambda n, v: v),  # checked in validate
        "spec": (None, lambda n, v: _text_or_none(n, v, 1000)),
        "name": (None, lambda n, v: _text_or_none(n, v, 64)),
    },
    "history": {
        "since": (None, lambda n, v: _float(n, v, 0, 1e11, nullable=True)),
        "action": (None, lambda n, v: _text_or_none(n, v, 64)),
        "limit": (DEFAULT_HISTORY_LIMIT, lambda n, v: _int(n, v, 1, MAX_HISTORY_LIMIT, nullable=False)),
    },
}
_REFRESH_START_ONLY = (
    "min_healthy",
    "max_healthy",
    "warmup",
    "checkpoints",
    "checkpoint_delay",
    "skip_matching",
    "auto_rollback",
    "allow_above_max",
)


def _text_or_none(name: str, value: Any, limit: int) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > limit or not value.isprintable():
        raise _bad(name, value, f"a non-empty printable string of at most {limit} characters, or null")
    return value


def validate(request: Any) -> tuple[str, dict[str, Any], str]:
    """(op, complete args, reason) of a decoded request; raise CtlError('bad-request') naming the
    first field that is wrong, its value and what was expected."""
    if not isinstance(request, dict):
        raise _bad("request", request, 'a JSON object {"op": …, "args": {…}, "reason": …}')
    unknown = sorted(set(request) - {"op", "args", "reason"})
    if unknown:
        raise _bad(unknown[0], request[unknown[0]], "only op, args and reason in a request")
    op = request.get("op")
    if not isinstance(op, str) or op not in _SPECS:
        raise _bad("op", op, f"one of {', '.join(OPS)}")
    raw_args = request.get("args", {})
    if raw_args is None:
        raw_args = {}
    if not isinstance(raw_args, dict):
        raise _bad("args", raw_args, "a JSON object")
    reason = request.get("reason", "")
    if reason is None:
        reason = ""
    if not isinstance(reason, str) or len(reason) > MAX_REASON:
        raise _bad("reason", reason, f"a string of at most {MAX_REASON} characters")
    reason = one_line(reason, MAX_REASON)
    spec = _SPECS[op]
    unknown = sorted(set(raw_args) - set(spec))
    if unknown:
        known = ", ".join(spec) if spec else "none"
        raise _bad(f"args.{unknown[0]}", raw_args[unknown[0]], f"only these arguments for {op}: {known}")
    args: dict[str, Any] = {}
    for name, (default, check) in spec.items():
        if name not in raw_args:
            if default is None and name == "processes":
                raise _bad(f"args.{name}", None, f"a non-empty list of process names for {op}")
            args[name] = list(default) if isinstance(default, list) else default
        else:
            args[name] = check(f"args.{name}", raw_args[name])
    if op == "set-capacity":
        _check_set_capacity(args, raw_args)
    elif op == "refresh":
        action = raw_args.get("action")
        if action not in REFRESH_ACTIONS:
            raise _bad("args.action", action, f"one of {', '.join(REFRESH_ACTIONS)}")
        if action != "start":
            extra = [k for k in _REFRESH_START_ONLY if k in raw_args]
            if extra:
                raise _bad(f"args.{extra[0]}", raw_args[extra[0]], "it only with action start")
            args = {"action": action}
        elif None not in (args["min_healthy"], args["max_healthy"]) and args["min_healthy"] > args["max_healthy"]:
            raise _bad("args.min_healthy", raw_args["min_healthy"], "at most args.max_healthy")
    elif op == "schedule":
        action = raw_args.get("action")
        if action not in SCHEDULE_ACTIONS:
            raise _bad("args.action", action, f"one of {', '.join(SCHEDULE_ACTIONS)}")
        needed = {"add": "spec", "remove": "name"}.get(action)
        for name in ("spec", "name"):
            if name == needed and args[name] is None:
                raise _bad(f"args.{name}", None, f"a {name} with action {action}")
            if name != needed and args[name] is not None:
                raise _bad(f"args.{name}", raw_args[name], f"null with action {action}")
    return op, args, reason


def _check_set_capacity(args: dict[str, Any], raw: dict[str, Any]) -> None:
    values = [k for k in ("min", "max", "desired") if args[k] is not None]
    if args["clear"]:
        if values or args["for"] is not None:
            name = (values or ["for"])[0]
            raise _bad(f"args.{name}", raw[name], "null with clear (clear removes the override)")
        return
    if not values:
        raise _bad("args", raw, "at least one of min, max and desired, or clear")
    if args["min"] is not None and args["max"] is not None and args["min"] > args["max"]:
        raise _bad("args.min", raw["min"], f"at most args.max ({args['max']})")
    for bound, ok in (("min", lambda d, b: d >= b), ("max", lambda d, b: d <= b)):
        if args["desired"] is not None and args[bound] is not None and not ok(args["desired"], args[bound]):
            word = "at least" if bound == "min" else "at most"
            raise _bad("args.desired", raw["desired"], f"{word} args.{bound} ({args[bound]})")


# ---------------------------------------------------------------------------------------------
# The server.


def peer_credentials(conn: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of a connected Unix socket's peer, as the kernel recorded them at connect."""
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return pid, uid, gid


def _encode(response: dict[str, Any]) -> bytes:
    return (json.dumps(response, separators=(",", ":"), allow_nan=False) + "\n").encode("utf-8")


def _error(message: str, code: str) -> dict[str, Any]:
    return {"ok": False, "error": one_line(message), "code": code}


class CtlServer:
    """Serves the control socket at `path`, calling `handler(op, args, caller, reason)` for each
    request that is allowed and well-formed. The handler returns the result dict; it is called from
    connection threads, so possibly from several at once (at most `max_connections`)."""

    def __init__(
        self,
        path: str,
        handler: Handler,
        *,
        log: logging.Logger,
        read_timeout: float = READ_TIMEOUT,
        max_request: int = MAX_REQUEST,
        max_connections: int = MAX_CONNECTIONS,
    ):
        self.path = path
        self.handler = handler
        self.log = log
        self.read_timeout = read_timeout
        self.max_request = max_request
        self.allowed_uids = tuple(sorted({os.geteuid(), 0}))
        self._slots = threading.BoundedSemaphore(max_connections)
        self._listener: socket.socket | None = None
        self._inode: tuple[int, int] | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake_r, self._wake_w = -1, -1
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()

    # --- binding ----------------------------------------------------------------------------------

    def start(self) -> None:
        """Bind and listen, then serve from a daemon thread. Raises CtlServerError when the path
        cannot be used: too long, not a socket, or another live process answers on it."""
        if self._listener is not None:
            raise CtlServerError(f"control socket {self.path}: already started")
        if len(os.fsencode(self.path)) > SUN_PATH_MAX:
            raise CtlServerError(
                f"control socket {self.path}: the path is {len(os.fsencode(self.path))} bytes, at most "
                f"{SUN_PATH_MAX} fit in a Unix socket address (set HELIX_CTL_SOCKET to a shorter one)"
            )
        self._make_parent()
        self._remove_stale()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            try:
                listener.bind(self.path)
            except OSError as exc:
                raise CtlServerError(f"control socket {self.path}: cannot bind: {exc.strerror or exc}") from exc
            st = os.stat(self.path)
            self._inode = (st.st_dev, st.st_ino)
            os.chmod(self.path, 0o600)
            listener.listen(32)
        except BaseException:
            listener.close()
            self._unlink_own()
            raise
        self._listener = listener
        self._wake_r, self._wake_w = os.pipe()
        self._stop.clear()
        self._thread = threading.Thread(target=self._serve, name="ctl-socket", daemon=True)
        self._thread.start()
        self.log.info("control socket listening on %s (uids allowed: %s)", self.path, self._allowed_text())

    def _make_parent(self) -> None:
        parent = os.path.dirname(os.path.abspath(self.path))
        if os.path.isdir(parent):
            return
        try:
            os.makedirs(os.path.dirname(parent), exist_ok=True)
            os.mkdir(parent, 0o700)
            os.chmod(parent, 0o700)  # whatever the umask
        except FileExistsError:
            pass
        except OSError as exc:
            raise CtlServerError(f"control socket {self.path}: cannot create {parent}: {exc.strerror or exc}") from exc

    def _remove_stale(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise CtlServerError(
                f"control socket {self.path}: the path exists and is not a socket; not removing it "
                "(move it away or set HELIX_CTL_SOCKET)"
            )
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(self.path)
        except (ConnectionRefusedError, FileNotFoundError):
            pass  # nobody listens: a stale file from a controller that died
        except OSError as exc:
            raise CtlServerError(
                f"control socket {self.path}: cannot tell whether another controller is listening "
                f"({exc.strerror or exc}); not removing it"
            ) from exc
        else:
            raise CtlServerError(
                f"control socket {self.path}: another controller is already listening on it "
                "(stop it first, or give this one another HELIX_CTL_SOCKET)"
            )
        finally:
            probe.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self.log.info("control socket %s: removed a stale socket file (nothing was listening)", self.path)

    def _unlink_own(self) -> None:
        """Remove the socket file if it is still the one this server bound (not a successor's)."""
        if self._inode is None:
            return
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._inode:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            self.log.warning("control socket %s: cannot remove it: %s", self.path, exc)
        self._inode = None

    def _allowed_text(self) -> str:
        return ", ".join(f"uid {uid} ({user_name(uid)})" for uid in self.allowed_uids)

    # --- serving ------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop listening, cut the connections still open, remove the socket file. Idempotent."""
        self._stop.set()
        if self._wake_w >= 0:
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._wake_r = self._wake_w = -1
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._unlink_own()

    def __enter__(self) -> CtlServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _serve(self) -> None:
        assert self._listener is not None
        listener = self._listener
        with selectors.DefaultSelector() as sel:
            sel.register(listener, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while not self._stop.is_set():
                ready = sel.select()
                if self._stop.is_set():
                    return
                if not any(key.fileobj is listener for key, _ in ready):
                    continue
                try:
                    conn, _ = listener.accept()
                except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                    continue
                except OSError as exc:
                    if self._stop.is_set():
                        return
                    self.log.warning("control socket: cannot accept a connection: %s", exc)
                    self._stop.wait(0.1)  # e.g. out of file descriptors: give it a moment
                    continue
                if not self._slots.acquire(blocking=False):
                    self._reply(conn, _error("the controller is busy with other control connections", "refused"))
                    conn.close()
                    continue
                with self._lock:
                    self._conns.add(conn)
                threading.Thread(target=self._connection, args=(conn,), name="ctl-conn", daemon=True).start()

    def _connection(self, conn: socket.socket) -> None:
        try:
            response = self._answer(conn)
            if response is not None:
                self._reply(conn, response)
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()
            self._slots.release()

    def _reply(self, conn: socket.socket, response: dict[str, Any]) -> None:
        try:
            payload = _encode(response)
        except (TypeError, ValueError) as exc:
            self.log.error("control socket: the handler's result is not JSON: %s", exc)
            payload = _encode(_error(f"the controller's answer is not JSON: {exc}", "internal"))
        try:
            conn.settimeout(self.read_timeout)
            conn.sendall(payload)
        except OSError as exc:
            self.log.debug("control socket: could not send the answer: %s", exc)

    def _answer(self, conn: socket.socket) -> dict[str, Any] | None:
        try:
            pid, uid, _gid = peer_credentials(conn)
        except OSError as exc:
            self.log.warning("control socket: cannot read the peer's credentials: %s", exc)
            return _error(f"cannot read the peer's credentials: {exc}", "refused")
        user = user_name(uid)
        if uid not in self.allowed_uids:
            self.log.warning("control socket: refused pid %d, uid %d (%s): not an allowed uid", pid, uid, user)
            return _error(f"uid {uid} may not control this controller (allowed: {self._allowed_text()})", "refused")
        caller = Caller(pid=pid, uid=uid, user=user)
        raw = self._read_request(conn)
        if isinstance(raw, dict):
            return raw  # an error response
        if raw is None:
            return None  # the client went away without a request
        try:
            request = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            return _error(f"request: expected one line of JSON ({exc})", "bad-request")
        try:
            op, args, reason = validate(request)
        except CtlError as exc:
            return _error(exc.message, exc.code)
        try:
            result = self.handler(op, args, caller, reason)
        except CtlError as exc:
            return _error(exc.message, exc.code)
        except Exception as exc:  # any failure of the handler is the caller's answer (logged)
            self.log.exception("control socket: %s from %s (pid %d) failed", op, user, pid)
            return _error(f"{op} failed inside the controller: {type(exc).__name__}: {exc}", "internal")
        if not isinstance(result, dict):
            self.log.error("control socket: the handler returned %s for %s, not a dict", type(result).__name__, op)
            return _error(f"{op}: the controller's answer is not an object", "internal")
        return {"ok": True, "result": result}

    def _read_request(self, conn: socket.socket) -> bytes | dict[str, Any] | None:
        """The request line (without its newline), an error response, or None if the peer left."""
        deadline = time.monotonic() + self.read_timeout
        data = bytearray()
        while True:
            newline = data.find(b"\n")
            if newline >= 0:
                return bytes(data[:newline])
            if len(data) >= self.max_request:
                self.log.warning("control socket: refused a request larger than %d bytes", self.max_request)
                return _error(
                    f"request: expected at most {self.max_request} bytes ending with a newline", "bad-request"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.log.warning("control socket: a client sent no complete request within %gs", self.read_timeout)
                return _error(f"request: expected within {self.read_timeout:g}s of connecting", "bad-request")
            conn.settimeout(remaining)
            try:
                chunk = conn.recv(min(65536, self.max_request - len(data) + 1))
            except TimeoutError:
                continue
            except OSError:
                return None
            if not chunk:
                # The peer closed its side: what came is the request if there is any.
                return bytes(data) if data.strip() else None
            data += chunk


# ---------------------------------------------------------------------------------------------
# The client side (controller_asg/ctl.py uses it; so may tests).


def call(
    path: str, op: str, args: dict[str, Any] | None = None, reason: str = "", *, timeout: float = 10.0
) -> dict[str, Any]:
    """Send one request to the controller at `path` and return its response dict (ok or not).
    Raises CtlUnreachable with one line saying what went wrong when there is no answer."""
    request = {"op": op, "args": args or {}, "reason": reason}
    payload = (json.dumps(request, separators=(",", ":")) + "\n").encode("utf-8")
    deadline = time.monotonic() + timeout
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except FileNotFoundError:
            raise CtlUnreachable(f"no control socket at {path}") from None
        except ConnectionRefusedError:
            raise CtlUnreachable(f"nothing is listening on {path}") from None
        except PermissionError:
            raise CtlUnreachable(
                f"permission denied connecting to {path} (run as the controller's user or root)"
            ) from None
        except TimeoutError:
            raise CtlUnreachable(f"no answer from {path} within {timeout:g}s") from None
        except OSError as exc:
            raise CtlUnreachable(f"cannot connect to {path}: {exc.strerror or exc}") from None
        data = bytearray()
        try:
            sock.sendall(payload)
        except OSError:
            pass  # the controller may have answered (and closed) before reading it all: read that answer
        try:
            while b"\n" not in data:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                sock.settimeout(remaining)
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except TimeoutError:
            raise CtlUnreachable(f"no answer from {path} within {timeout:g}s") from None
        except OSError as exc:
            if not data:
                raise CtlUnreachable(f"the connection to {path} failed: {exc.strerror or exc}") from None
    finally:
        sock.close()
    line = bytes(data).split(b"\n", 1)[0]
    if not line:
        raise CtlUnreachable(f"{path} closed the connection without an answer")
    try:
        response = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        raise CtlUnreachable(f"{path} answered something that is not JSON") from None
    if not isinstance(response, dict) or not isinstance(response.get("ok"), bool):
        raise CtlUnreachable(f"{path} answered JSON that is not a control-socket response")
    return response
