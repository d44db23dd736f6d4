"""The what-if plot: demand as required instances, the fleet over time, and CPU."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from controller_asg.sim.fleet import FleetParams, required
from controller_asg.sim.runner import Outcome


def plot(path: str, outcomes: Sequence[Outcome], p: FleetParams, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not outcomes:
        return
    demand = outcomes[0].run.demand
    hours = np.arange(len(demand)) / 3600.0
    step = max(1, len(demand) // 4000)  # keep the figure light: at most ~4000 points a line
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(12, 7), sharex=True, height_ratios=[3, 2])
    ax1.plot(hours[::step], required(demand, p)[::step], color="black", lw=0.8, label="required r(t)")
    for o in outcomes:
        ax1.step(hours[::step], o.run.in_service[::step], lw=0.9, where="post", label=f"{o.name} in service")
        n = np.maximum(o.run.in_service, 1)
        cpu = np.minimum(1.0, demand / (n * p.capacity))
        ax2.plot(hours[::step], cpu[::step], lw=0.6, label=o.name)
    ax1.set_ylabel("instances")
    ax1.legend(loc="upper left", fontsize=8)
    ax2.axhline(p.target, color="grey", ls="--", lw=0.8)
    ax2.set_ylabel("CPU per instance")
    ax2.set_xlabel("hours")
    ax2.set_ylim(0, 1.05)
    if title:
        ax1.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
