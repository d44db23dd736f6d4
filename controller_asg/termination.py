"""Whom to terminate on scale-in. Pure.

Order of the rules, as EC2 Auto Scaling applies its own:
1. never an instance with scale-in protection;
2. keep the zones balanced: take from the zone that has the most instances;
3. then HELIX_TERMINATION_POLICY within that zone: `least-busy` (lowest recent CPU; an instance
   with no metrics yet counts as idle, so a pending launch goes first), `oldest`, `newest`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Collection

from controller_asg.fleet import FleetMember


def _policy_key(policy: str) -> Callable[[FleetMember], tuple[float | str, ...]]:
    if policy == "oldest":
        return lambda m: (m.instance.launched_at, m.instance_id)
    if policy == "newest":
        return lambda m: (-m.instance.launched_at, m.instance_id)
    return lambda m: (m.cpu if m.cpu is not None else 0.0, -m.instance.launched_at, m.instance_id)


def choose_victims(
    members: list[FleetMember], count: int, policy: str, first: Collection[str] = ()
) -> list[FleetMember]:
    """Up to `count` members to terminate; fewer when protection leaves fewer candidates.
    `first`: ids taken before any other (those an instance refresh still has to replace, as ASG's
    OldestLaunchConfiguration: scaling in never throws away an instance already refreshed first)."""
    chosen: list[FleetMember] = []
    if first:
        preferred = [m for m in members if m.instance_id in first]
        chosen = _choose(preferred, count, policy, Counter(m.instance.zone for m in members))
    rest = [m for m in members if m not in chosen]
    zones = Counter(m.instance.zone for m in rest)
    return chosen + _choose(rest, count - len(chosen), policy, zones)


def _choose(members: list[FleetMember], count: int, policy: str, zones: Counter) -> list[FleetMember]:
    # Protected ones count toward balance too (`zones` counts every member).
    candidates = [m for m in members if not m.instance.protected]
    key = _policy_key(policy)
    chosen: list[FleetMember] = []
    while len(chosen) < count and candidates:
        # The fullest zone that still has a candidate; ties broken by zone name for determinism.
        zone = max({m.instance.zone for m in candidates}, key=lambda z: (zones[z], z))
        victim = min((m for m in candidates if m.instance.zone == zone), key=key)
        chosen.append(victim)
        candidates.remove(victim)
        zones[zone] -= 1
    return chosen
