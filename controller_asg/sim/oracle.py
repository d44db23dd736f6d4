"""`oracle`: knows the future. At every second it keeps in service (or launching) the highest
required supply r of the next boot-time seconds, so nothing is ever under-provisioned: the cost any
policy that never under-provisions must pay. Used only by the simulator (it reads the trace)."""

from __future__ import annotations

from typing import Any

import numpy as np

from controller_asg.policy.base import Decision, Observation


def forward_max(r: np.ndarray, window: int) -> np.ndarray:
    """out[t] = max(r[t : t + window + 1])."""
    padded = np.concatenate([r, np.full(window, r[-1])])
    return np.lib.stride_tricks.sliding_window_view(padded, window + 1).max(axis=1)


class Oracle:
    name = "oracle"

    def __init__(self, r: np.ndarray, boot_time: float, max_instances: int):
        self._plan = np.minimum(forward_max(r, int(np.ceil(boot_time))), max_instances).tolist()

    def decide(self, obs: Observation) -> Decision:
        t = min(int(obs.now), len(self._plan) - 1)
        return Decision(int(self._plan[t]), "knows the next boot time of demand")

    def export_state(self) -> dict[str, Any]:
        return {}

    def import_state(self, state: dict[str, Any]) -> None:
        return None
