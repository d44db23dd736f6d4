"""The provider contract: list what Helix owns, launch n (idempotently), terminate ids.

A provider only ever sees, counts and terminates instances that carry Helix's group mark (the
`helix:group` tag on EC2, the state directory for local processes).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class LaunchConfig:
    """What an instance is launched from (ec2: image, instance type, launch template and version,
    the user data's hash; local: the app command). Each launch records its digest on the instance,
    so an instance refresh can tell which instances differ from the configuration in force."""

    settings: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(cls, values: Mapping[str, object]) -> LaunchConfig:
        return cls(tuple(sorted((str(k), str(v)) for k, v in values.items())))

    @property
    def digest(self) -> str:
        text = json.dumps(dict(self.settings), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def as_dict(self) -> dict[str, str]:
        return dict(self.settings)

    def describe(self) -> str:
        return ", ".join(f"{k}={v[:80]}" for k, v in self.settings) or "(empty)"


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
    # The digest of the LaunchConfig it was launched from ("" unknown: launched before Helix recorded it).
    config: str = ""


class LaunchError(Exception):
    """A launch failed in every zone; the message says why, in one line."""


class Provider(Protocol):
    name: str

    def list_instances(self) -> list[ProviderInstance]:
        """Every instance this group owns that may still be billed (pending, running, terminating):
        one leaves the list only when it is gone or no longer billed (EC2 after `shutting-down`, a
        local instance when its process group has exited). The launch gate relies on this."""
        ...

    def launch_config(self) -> LaunchConfig:
        """The launch configuration the settings say new instances get now."""
        ...

    def launch(
        self, count: int, token: str, config: LaunchConfig | None = None, *, epoch: int = 0
    ) -> list[ProviderInstance]:
        """Launch `count` instances spread over the zones, from `config` (None: `launch_config()`;
        an instance refresh rolling back passes the previous one). Calling again with the same
        `token` (a retry after a lost reply, a restart mid-launch) returns the same instances and
        launches nothing new. Never waits for the instances to boot. `epoch`: the leader lease's
        epoch the launch was made under (0: no lease), recorded on the instances (a tag)."""
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
