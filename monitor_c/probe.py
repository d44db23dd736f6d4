"""The app liveness probe (HELIX_APP_CHECK): `http(s)://…` answers 2xx, `tcp://host:port`
accepts, `process:NAME` exists, or unset (live whenever the agent is).

Probes run in the agent's background loop and GetMetrics returns the latest result, so a slow app
never makes a poll slow. HTTP is a minimal HTTP/1.0 GET on asyncio streams (no urllib import).
"""

from __future__ import annotations

import asyncio
import os
from urllib.parse import urlsplit

import psutil

from shared.config import parse_host_port


class AppProbe:
    def __init__(self, spec: str, timeout: float):
        self.spec = spec
        self.timeout = timeout
        self._pid: int | None = None  # process: the last match, re-checked cheaply before a full scan

    async def check(self) -> tuple[bool, str]:
        try:
            if not self.spec:
                return True, "no check"
            if self.spec.startswith("tcp://"):
                return await asyncio.wait_for(self._tcp(), self.timeout)
            if self.spec.startswith(("http://", "https://")):
                return await asyncio.wait_for(self._http(), self.timeout)
            if self.spec.startswith("process:"):
                return await asyncio.to_thread(self._process, self.spec[8:])
        except TimeoutError:
            return False, f"timeout after {self.timeout:g}s"
        except ConnectionRefusedError:
            return False, f"{self.spec.split(':')[0]} refused"
        except OSError as exc:
            return False, f"{self.spec.split(':')[0]} {type(exc).__name__}"[:40]
        return False, "unknown check"

    async def _tcp(self) -> tuple[bool, str]:
        host, port = parse_host_port(self.spec[6:])
        _, writer = await asyncio.open_connection(host.strip("[]"), port)
        writer.close()
        return True, "tcp ok"

    async def _http(self) -> tuple[bool, str]:
        url = urlsplit(self.spec)
        tls = url.scheme == "https"
        port = url.port or (443 if tls else 80)
        reader, writer = await asyncio.open_connection(url.hostname, port, ssl=True if tls else None)
        try:
            path = (url.path or "/") + (f"?{url.query}" if url.query else "")
            writer.write(
                f"GET {path} HTTP/1.0\r\nHost: {url.netloc}\r\nUser-Agent: helix-agent\r\n"
                "Connection: close\r\n\r\n".encode("latin-1")
            )
            await writer.drain()
            status_line = await reader.readline()
        finally:
            writer.close()
        parts = status_line.decode("latin-1", "replace").split()
        if len(parts) < 2 or not parts[1].isdigit():
            return False, "http bad answer"
        status = int(parts[1])
        return 200 <= status < 300, f"http {status}"

    def _process(self, name: str) -> tuple[bool, str]:
        if self._pid is not None:
            try:
                if psutil.Process(self._pid).name() == name:
                    return True, f"process {self._pid}"
            except psutil.Error:
                pass
        self._pid = None
        for proc in psutil.process_iter(["name"]):
            if proc.info["name"] == name and proc.pid != os.getpid():
                self._pid = proc.pid
                return True, f"process {proc.pid}"
        return False, f"no process {name}"[:40]
