"""The launch budget: never more than HELIX_MAX_INSTANCES instances that may be billed for compute,
and never more than HELIX_WARM_POOL_MAX_PREPARED instances at all (stopped warm-pool ones too).

Pure. The controller builds one `Budget` per step from what it knows and asks it before every
launch, whatever planned the launch (scale-out, replacement, min in a frozen fleet, a resumed
intent). What may be billed, conservatively:
- every instance the provider lists, terminating ones included (a provider lists an instance
  until it is gone or no longer billed);
- instances a launch call returned that the listing does not show yet (EC2's listing is
  eventually consistent);
- launches in doubt: a launch call with no definitive answer (a lost reply, a crash between the
  intent and the answer) may have launched its whole count, less what we already see of it.
Stopped instances (a warm pool) are billed for their disks only: they count against the prepared
cap, not against max, until started (`allow_start`). A launch of n goes only if billable + n stays
within max (and prepared + n within the prepared cap); a request above the budget is cut to it. Resuming an intent counts what it would add, not what it already launched; cut to nothing it
still resolves the doubt (a launch of 0 under its token only looks up what it launched).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from controller_asg.providers.base import ProviderInstance

TOKEN_HEX = 20


def token_prefix(group: str) -> str:
    return f"{group[:24]}-"


def valid_token(token: object, group: str) -> bool:
    """A launch token this controller could have made (see Controller.new_token)."""
    if not isinstance(token, str) or not token.startswith(token_prefix(group)):
        return False
    return re.fullmatch(f"[0-9a-f]{{{TOKEN_HEX}}}", token[len(token_prefix(group)) :]) is not None


@dataclass(frozen=True)
class Intent:
    """A launch we started and have no definitive answer for (persisted before the call)."""

    token: str
    count: int
    cause: str
    replaces: str = ""  # the instance this launch replaces, if it is a replacement
    created_at: float = 0.0  # when the first call under this token was made
    warm: bool = False  # for the warm pool: prepared, then stopped
    # The LaunchConfig settings it launches from (empty: the provider's own, from the settings): a
    # resumed launch keeps the configuration it was started with (a refresh's, a rollback's).
    config: dict[str, str] = field(default_factory=dict)


@dataclass
class Budget:
    max_instances: int
    listed: int  # instances the provider lists, but stopped ones
    unlisted: int  # returned by a launch call, not listed yet
    in_doubt: dict[str, int]  # token -> instances that launch may have started that we do not see
    stopped: int = 0  # listed as stopped (a warm pool): billed for disks only
    max_prepared: int = 0  # cap on every instance, stopped ones included (0: no cap beyond max)

    @classmethod
    def build(
        cls,
        max_instances: int,
        listed: list[ProviderInstance],
        recent: dict[str, str],
        intents: list[Intent],
        max_prepared: int = 0,
    ) -> Budget:
        """`recent`: ids a launch call returned -> their token; `intents`: launches in doubt."""
        listed_ids = {i.instance_id for i in listed}
        stopped = {i.instance_id for i in listed if i.state == "stopped"}
        seen: dict[str, set[str]] = {}
        for inst in listed:
            if inst.launch_token:
                seen.setdefault(inst.launch_token, set()).add(inst.instance_id)
        for instance_id, token in recent.items():
            seen.setdefault(token, set()).add(instance_id)
        unlisted = sum(1 for i in recent if i not in listed_ids)
        doubt = {it.token: max(0, it.count - len(seen.get(it.token, ()))) for it in intents}
        return cls(max_instances, len(listed_ids - stopped), unlisted, doubt, len(stopped), max_prepared)

    @property
    def billable(self) -> int:
        return self.listed + self.unlisted + sum(self.in_doubt.values())

    @property
    def prepared(self) -> int:
        return self.billable + self.stopped

    @property
    def room(self) -> int:
        return max(0, self.max_instances - self.billable)

    def allow(self, wanted: int, token: str = "") -> int:
        """How many of `wanted` new instances fit. With the `token` of an intent in doubt, its
        own doubt is the request, not part of what is already billed (a resumed intent is
        checked afresh: one that no longer fits is cut, down to 0 = only look up what it did)."""
        own = self.in_doubt.get(token, 0) if token else 0
        fits = self.max_instances - (self.billable - own)
        if self.max_prepared > 0:
            fits = min(fits, self.max_prepared - (self.prepared - own))
        return max(0, min(wanted, fits))

    def allow_start(self, wanted: int) -> int:
        """How many of `wanted` stopped instances may start: each adds one billed for compute."""
        return max(0, min(wanted, self.max_instances - self.billable))
