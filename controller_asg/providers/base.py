"""The provider contract: list what Helix owns, launch n (idempotently), terminate ids.

A provider only ever sees, counts and terminates instances that carry Helix's group mark (the
`helix:group` tag on EC2, the state directory for local processes).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class ProviderInstance:
    instance_id: str
    zone: str
    launched_at: float  # epoch seconds
    state: str  # "pending" | "running" | "terminating" | "stopped" (a warm-pool instance, paused)
    protected: bool = False  # scale-in protection: never chosen for scale-in
    address: str = ""  # private address if known
    # The launch token it was launched under ("" if unknown): how the launch gate tells which
    # in-doubt launch an instance answers for.
    launch_token: str = ""
    # SHA-256 (hex) of the per-instance secret the provider gave the agent ("" if none): the
    # controller publishes it on the roster, and MonitorS registers the agent only with the secret.
    secret_digest: str = ""


class LaunchError(Exception):
    """A launch failed in every zone; the message says why, in one line."""


class Provider(Protocol):
    name: str

    def list_instances(self) -> list[ProviderInstance]:
        """Every instance this group owns that may still be billed (pending, running, terminating):
        one leaves the list only when it is gone or no longer billed (EC2 after `shutting-down`, a
        local instance when its process group has exited). The launch gate relies on this."""
        ...

    def launch(self, count: int, token: str) -> list[ProviderInstance]:
        """Launch `count` instances spread over the zones. Calling again with the same `token`
        (a retry after a lost reply, a restart mid-launch) returns the same instances and launches
        nothing new. Never waits for the instances to boot."""
        ...

    def terminate(self, instance_ids: Sequence[str]) -> None:
        """Terminate exactly these ids (ids not owned by the group are refused, never touched)."""
        ...

    def stop(self, instance_ids: Sequence[str]) -> None:
        """Stop these instances, keeping them (a warm pool): EC2 StopInstances, a paused process
        group locally. They list as "stopped" and cost only their disks meanwhile."""
        ...

    def start(self, instance_ids: Sequence[str]) -> None:
        """Start stopped instances again; they list as pending or running."""
        ...

    def close(self) -> None: ...
