"""HELIX_EXTERNAL_METRIC: one number from outside the fleet (a queue's backlog, say) that the
controller sizes the fleet by, at HELIX_EXTERNAL_TARGET per instance.

`make_external(cfg)` builds the source the setting names (None when it is empty):
  * `sqs:<queue URL>`: the queue's ApproximateNumberOfMessages, its visible messages (what
    CloudWatch calls ApproximateNumberOfMessagesVisible), through boto3, one GetQueueAttributes per
    read. Credentials are the ec2 provider's (HELIX_AWS_ACCESS_KEY/… else boto3's default chain);
    the region is the one in the queue's URL, where the queue lives (a stand-in endpoint,
    HELIX_SQS_ENDPOINT_URL, gets HELIX_AWS_REGION). The IAM policy `python -m controller_asg.iam`
    prints allows exactly that call on exactly that queue;
  * `command:<shell words>`: run without a shell in a process group of its own, without Helix's
    secrets in its environment; the first line it prints;
  * `http(s)://…`: a GET (no redirects, no proxy); the body's first line;
  * `file:<absolute path>`: a regular file's first line (a writer should write a temporary file and
    rename it over this one, so a read never sees it half-written).
With HELIX_EXTERNAL_METRIC_NAME, the output of the last three is Prometheus text instead, and the
value is the one series that name (and its labels) picks.

`ExternalMetric.read(now)` never raises and takes about HELIX_EXTERNAL_TIMEOUT at most (a command
still running then is killed with its group; HTTP and SQS get it as their socket timeouts). A
value must be a finite number ≥ 0; anything else, like any failure, is a Reading with value None
and a one-line error. Each source keeps its last good value, which a failed Reading carries as
`last_good` with its `age`: how stale a value may be before it is ignored is the caller's call.

boto3 is imported only for `sqs:` (the local provider's path never loads it).
"""

from __future__ import annotations

import http.client
import math
import os
import re
import shlex
import signal
import ssl
import stat
import subprocess
import time
import urllib.parse
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from shared.config import METRIC_SELECTOR, Config, ConfigError, settings, sqs_queue

if TYPE_CHECKING:
    from controller_asg.providers.ec2 import ApiCall

KEY = "HELIX_EXTERNAL_METRIC"
# The GetQueueAttributes attribute for visible messages (the API has no "...Visible" one).
SQS_ATTRIBUTE = "ApproximateNumberOfMessages"
# Every SQS operation this module calls; the generated IAM policy allows each (tested).
OPERATIONS = ("GetQueueAttributes",)
MAX_OUTPUT = 1 << 20  # bytes read from a command, a body or a file: a read stays cheap
SHOWN = 40  # characters of a bad value quoted in an error
_SPEC_SHOWN = 120  # characters of the setting quoted in an error
# The controller's secrets (token, cloud keys, instance secret) are not the command's business.
_SECRET_KEYS = frozenset(k for info in settings() if info.secret for k in (info.key, *info.aliases))
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)\s*=\s*"((?:[^"\\\n]|\\.)*)"')


@dataclass(frozen=True)
class Reading:
    """One read. `value`: this read's number, None when it failed (`error` says why, one line).
    `last_good`: the latest good value (this one, or the one before a failure; None if none ever),
    read `age` seconds before `now` (0.0 when this read is good, inf when there never was one)."""

    value: float | None
    age: float
    error: str = ""
    last_good: float | None = None


class ExternalMetric(Protocol):
    kind: str  # sqs, command, http or file

    def read(self, now: float) -> Reading:
        """The metric now (`now` in the caller's clock, which `age` is measured in); never raises."""
        ...

    def close(self) -> None: ...


class ReadError(Exception):
    """A read failed; the message (one line) follows `HELIX_EXTERNAL_METRIC=<spec>: `."""


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _quote(text: str) -> str:
    shown = "".join(c if c.isprintable() else "?" for c in text[:SHOWN])
    return repr(shown + ("…" if len(text) > SHOWN else ""))


def checked(value: float, raw: str) -> float:
    if not math.isfinite(value) or value < 0:
        raise ReadError(f"expected a finite number ≥ 0, got {_quote(raw)}")
    return value


def first_number(text: str) -> float:
    """The number on the first non-blank line of `text`."""
    stripped = text.strip()
    first = stripped.splitlines()[0].strip() if stripped else ""
    if not first:
        raise ReadError("expected a number on the first line, got nothing")
    try:
        return checked(float(first), first)
    except ValueError:
        raise ReadError(f"expected a number on the first line, got {_quote(first)}") from None


def _unescape(label_value: str) -> str:
    # The exposition format's three escapes in a label value: \\, \" and \n.
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), label_value)


def prometheus_value(text: str, selector: str) -> float:
    """The value of the one sample `selector` (name{label="value",…}) picks in Prometheus text."""
    from prometheus_client.parser import text_string_to_metric_families

    found = METRIC_SELECTOR.fullmatch(selector)
    if not found:
        raise ReadError(f'HELIX_EXTERNAL_METRIC_NAME={selector}: expected name or name{{label="value",…}}')
    name = found.group("name")
    wanted = {k: _unescape(v) for k, v in _LABEL.findall(found.group("labels") or "")}
    try:
        values = [
            s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in wanted.items())
        ]
    except Exception as exc:  # noqa: BLE001 - the parser raises ValueError, and others on odd input
        raise ReadError(f"expected Prometheus text ({_one_line(exc)[:SHOWN]})") from None
    if len(values) != 1:
        more = " (add labels to HELIX_EXTERNAL_METRIC_NAME to pick one)" if values else ""
        raise ReadError(f"expected one series {selector} in the Prometheus text, found {len(values)}{more}")
    return checked(float(values[0]), f"{values[0]:g}")


class _Source:
    """What every source shares: `read` never raises and keeps the last good value."""

    kind = ""

    def __init__(self, cfg: Config):
        self.spec = cfg.external_metric
        self.timeout = cfg.external_timeout
        self.selector = cfg.external_metric_name
        self._good: tuple[float, float] | None = None  # (value, when), in the caller's clock

    def read(self, now: float) -> Reading:
        try:
            value = self._fetch(time.monotonic() + self.timeout)
        except ReadError as exc:
            error = str(exc)
        except Exception as exc:  # noqa: BLE001 - a read never raises: the controller's step goes on
            error = f"expected a reading ({type(exc).__name__}: {_one_line(exc)})"
        else:
            self._good = (value, now)
            return Reading(value, 0.0, "", value)
        shown = self.spec if len(self.spec) <= _SPEC_SHOWN else self.spec[:_SPEC_SHOWN] + "…"
        line = _one_line(f"{KEY}={shown}: {error}")
        if self._good is None:
            return Reading(None, math.inf, line, None)
        value, at = self._good
        return Reading(None, max(0.0, now - at), line, value)

    def _number(self, text: str) -> float:
        return prometheus_value(text, self.selector) if self.selector else first_number(text)

    def _fetch(self, deadline: float) -> float:
        raise NotImplementedError

    def close(self) -> None:
        pass


class FileMetric(_Source):
    kind = "file"

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.path = self.spec.partition(":")[2]

    def _fetch(self, deadline: float) -> float:
        try:
            # Non-blocking: a FIFO (or a device) answers at once instead of waiting for a writer.
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise ReadError(f"expected a readable file ({exc.strerror})") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ReadError("expected a regular file")
            data = os.read(fd, MAX_OUTPUT)
        finally:
            os.close(fd)
        return self._number(data.decode("utf-8", "replace"))


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class CommandMetric(_Source):
    kind = "command"

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.argv = shlex.split(self.spec.partition(":")[2])

    def _fetch(self, deadline: float) -> float:
        env = {k: v for k, v in os.environ.items() if k not in _SECRET_KEYS}
        try:
            proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                start_new_session=True,  # its own group: a timeout kills all it started
            )
        except OSError as exc:
            raise ReadError(f"expected a command that runs ({self.argv[0]}: {exc.strerror})") from None
        try:
            out, err = proc.communicate(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
            try:
                proc.wait(1)  # SIGKILL: gone at once, unless stuck in the kernel (then reaped next time)
            except subprocess.TimeoutExpired:
                pass
            raise ReadError(
                f"expected an answer within HELIX_EXTERNAL_TIMEOUT={self.timeout:g} s (killed its process group)"
            ) from None
        finally:
            for pipe in (proc.stdout, proc.stderr):
                if pipe:
                    pipe.close()
        # Whatever it left running in the background would pile up, one more every step.
        _kill_group(proc.pid)
        if proc.returncode != 0:
            lines = err.decode("utf-8", "replace").strip().splitlines()
            why = f": {_quote(lines[-1])}" if lines else ""
            raise ReadError(f"expected exit status 0, got {proc.returncode}{why}")
        return self._number(out[:MAX_OUTPUT].decode("utf-8", "replace"))


class HttpMetric(_Source):
    kind = "http"

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.url = urllib.parse.urlsplit(self.spec)

    def _remaining(self, deadline: float) -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise ReadError(f"expected an answer within HELIX_EXTERNAL_TIMEOUT={self.timeout:g} s")
        return left

    def _fetch(self, deadline: float) -> float:
        url = self.url
        host, port = url.hostname or "", url.port
        conn: http.client.HTTPConnection
        if url.scheme == "https":
            conn = http.client.HTTPSConnection(
                host, port, timeout=self._remaining(deadline), context=ssl.create_default_context()
            )
        else:
            conn = http.client.HTTPConnection(host, port, timeout=self._remaining(deadline))
        try:
            path = (url.path or "/") + (f"?{url.query}" if url.query else "")
            conn.request("GET", path, headers={"Accept": "text/plain", "User-Agent": "helix-controller"})
            self._socket_deadline(conn, deadline)
            resp = conn.getresponse()
            if resp.status != 200:
                raise ReadError(f"expected HTTP 200, got {resp.status} {_one_line(resp.reason)[:SHOWN]}")
            body = b""
            # Chunk by chunk, so a server that trickles its body cannot hold a read past the deadline.
            while len(body) < MAX_OUTPUT:
                self._socket_deadline(conn, deadline)
                chunk = resp.read1(MAX_OUTPUT - len(body))
                if not chunk:
                    break
                body += chunk
        except (OSError, http.client.HTTPException) as exc:
            reason = _one_line(exc) or type(exc).__name__
            raise ReadError(f"expected an HTTP answer from {host} ({reason})") from None
        finally:
            conn.close()
        return self._number(body.decode("utf-8", "replace"))

    def _socket_deadline(self, conn: http.client.HTTPConnection, deadline: float) -> None:
        if conn.sock is not None:
            conn.sock.settimeout(self._remaining(deadline))


def make_sqs_client(cfg: Config, region: str, timeout: float) -> Any:
    """An SQS client with Helix's AWS credentials, in `region`, at HELIX_SQS_ENDPOINT_URL when
    set. One attempt, the timeout split between connecting and reading: the controller's next step
    is the retry."""
    from botocore.config import Config as BotoConfig
    from botocore.exceptions import NoRegionError

    from controller_asg.providers.aws import aws_session

    session = aws_session(cfg, region)
    try:
        return session.client(
            "sqs",
            endpoint_url=cfg.sqs_endpoint_url or None,
            config=BotoConfig(
                retries={"mode": "standard", "total_max_attempts": 1},
                connect_timeout=timeout / 2,
                read_timeout=timeout / 2,
                user_agent_extra="helix-controller",
            ),
        )
    except NoRegionError:
        raise ConfigError(
            [f"HELIX_AWS_REGION=: expected the region of the queue in {KEY}={cfg.external_metric} (its URL names none)"]
        ) from None


class SqsMetric(_Source):
    kind = "sqs"

    def __init__(self, cfg: Config, client: Any = None):
        from controller_asg.providers.ec2 import CALLS_KEPT

        super().__init__(cfg)
        queue = sqs_queue(self.spec.partition(":")[2])
        if queue is None:  # the loader refuses it; a Config built by hand may not have been loaded
            raise ConfigError([f"{KEY}={self.spec}: expected sqs:https://sqs.REGION.amazonaws.com/ACCOUNT/NAME"])
        self.queue = queue
        self.client = (
            client if client is not None else make_sqs_client(cfg, queue.region or cfg.aws_region, self.timeout)
        )
        self._region = str(self.client.meta.region_name or "")
        # Every request as sent (bounded): what the IAM policy tests check.
        self.operations_called: set[str] = set()
        self.calls: deque[ApiCall] = deque(maxlen=CALLS_KEPT)
        self.client.meta.events.register("before-parameter-build.sqs", self._record_operation)

    def _record_operation(self, model: Any = None, params: Any = None, **_: Any) -> None:
        from controller_asg.providers.ec2 import ApiCall

        if model is None:
            return
        self.operations_called.add(model.name)
        self.calls.append(ApiCall(model.name, dict(params or {}), self._region))

    def _fetch(self, deadline: float) -> float:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            reply = self.client.get_queue_attributes(QueueUrl=self.queue.url, AttributeNames=[SQS_ATTRIBUTE])
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = error.get("Code", "") or "Unknown"
            raise ReadError(
                f"expected the queue's {SQS_ATTRIBUTE} (GetQueueAttributes: {code}: {_one_line(error.get('Message', ''))})"
            ) from None
        except BotoCoreError as exc:  # no connection, a timeout: no error code, the class says what
            raise ReadError(f"expected the queue's {SQS_ATTRIBUTE} ({type(exc).__name__}: {_one_line(exc)})") from None
        raw = str(reply.get("Attributes", {}).get(SQS_ATTRIBUTE, ""))
        try:
            return checked(float(raw), raw)
        except ValueError:
            raise ReadError(f"expected {SQS_ATTRIBUTE} to be a number, got {_quote(raw)}") from None

    def close(self) -> None:
        close = getattr(self.client, "close", None)
        if close:
            close()


def make_external(cfg: Config) -> ExternalMetric | None:
    """The source HELIX_EXTERNAL_METRIC names, or None when it is empty. Builds, never reads:
    a queue or endpoint that is missing shows in the first Reading. Raises ConfigError (one line)
    only when an sqs: client cannot be made (no region)."""
    if not cfg.external_metric:
        return None
    kind = cfg.external_metric.partition(":")[0]
    if kind == "sqs":
        return SqsMetric(cfg)
    if kind == "command":
        return CommandMetric(cfg)
    if kind == "file":
        return FileMetric(cfg)
    return HttpMetric(cfg)
