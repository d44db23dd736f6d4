"""The demo's timeline, its summary and its PNG: demand, instance count and mean CPU over time."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from deploy.local.view import Action


@dataclass
class Sample:
    """One second of the demo."""

    t: float
    demand: float  # requests per second asked
    served: int  # requests served in that second
    failed: int
    healthy: int  # HEALTHY rows in the table
    registered: int  # every row in the table
    desired: int  # the controller's desired count (0 before its first decision)
    mean_cpu: float | None  # mean CPU of the healthy instances


@dataclass
class Summary:
    duration: float
    peak_instances: int
    final_instances: int
    scale_outs: int
    scale_ins: int
    actions: int
    mean_cpu: float | None  # mean over the seconds with healthy instances
    served: int
    failed: int
    plot: str = ""

    @property
    def failed_fraction(self) -> float:
        total = self.served + self.failed
        return self.failed / total if total else 0.0

    def as_dict(self) -> dict:
        return asdict(self) | {"failed_fraction": self.failed_fraction}

    def lines(self) -> list[str]:
        cpu = "-" if self.mean_cpu is None else f"{self.mean_cpu:.2f}"
        return [
            f"duration:          {self.duration:.0f} s",
            f"peak instances:    {self.peak_instances} healthy (at the end: {self.final_instances})",
            f"scaling actions:   {self.actions} ({self.scale_outs} out, {self.scale_ins} in)",
            f"mean CPU:          {cpu} (mean of the healthy instances, averaged over the run)",
            f"requests:          {self.served} served, {self.failed} failed ({100 * self.failed_fraction:.2f} %)",
        ]


def direction(action: str) -> str:
    """'out', 'in' or '' from an activity-log action name (launch, scale-out, terminate, …)."""
    a = action.lower()
    if a == "launch" or a.endswith("out"):
        return "out"
    if a == "terminate" or a.endswith(("-in", "_in")):
        return "in"
    return ""  # replace, freeze, resume, adopt: not a change of size


def summarize(
    samples: Sequence[Sample], actions: Sequence[Action], served: int, failed: int, duration: float
) -> Summary:
    cpus = [s.mean_cpu for s in samples if s.mean_cpu is not None and math.isfinite(s.mean_cpu)]
    return Summary(
        duration=duration,
        peak_instances=max((s.healthy for s in samples), default=0),
        final_instances=samples[-1].healthy if samples else 0,
        scale_outs=sum(1 for a in actions if direction(a.action) == "out"),
        scale_ins=sum(1 for a in actions if direction(a.action) == "in"),
        actions=len(actions),
        mean_cpu=sum(cpus) / len(cpus) if cpus else None,
        served=served,
        failed=failed,
    )


def write_plot(path: str, samples: Sequence[Sample], actions: Sequence[Action], cpu_target: float, title: str) -> str:
    # Imported here: matplotlib takes half a second to import, and only the end of a run needs it.
    import matplotlib

    matplotlib.use("Agg")  # no display needed, and never one picked up by accident
    import matplotlib.pyplot as plt

    t = [s.t for s in samples]
    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, sharex=True, figsize=(10, 8))
    ax1.plot(t, [s.demand for s in samples], label="demand (req/s asked)", color="tab:blue")
    ax1.plot(t, [s.served for s in samples], label="served (req/s)", color="tab:green", alpha=0.7)
    ax1.plot(t, [s.failed for s in samples], label="failed (req/s)", color="tab:red", alpha=0.7)
    ax1.set_ylabel("requests / s")
    ax1.legend(loc="upper left", fontsize="small")
    ax2.step(t, [s.healthy for s in samples], where="post", label="healthy instances", color="tab:green")
    ax2.step(t, [s.desired for s in samples], where="post", label="desired", color="tab:orange", linestyle="--")
    for a in actions:
        ax2.axvline(a.at, color="tab:purple" if direction(a.action) == "out" else "tab:gray", alpha=0.3)
    ax2.set_ylabel("instances")
    ax2.legend(loc="upper left", fontsize="small")
    ax2.yaxis.get_major_locator().set_params(integer=True)
    ax3.plot(
        t,
        [float("nan") if s.mean_cpu is None else s.mean_cpu for s in samples],
        label="mean CPU (healthy)",
        color="tab:red",
    )
    ax3.axhline(cpu_target, color="black", linestyle=":", label=f"target {cpu_target:g}")
    ax3.set_ylabel("CPU (of allotment)")
    ax3.set_xlabel("seconds")
    ax3.legend(loc="upper left", fontsize="small")
    fig.suptitle(title, fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
