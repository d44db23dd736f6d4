"""What the demo shows while it runs: a live rich view on a terminal, plain lines otherwise.

The demo gathers one `Frame` per second (from the table, the load generator's per-second stats
and the controller's activity log); this module only turns frames into output, so the live view
and the plain progress lines (CI, a pipe) show the same facts.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from shared.table import ControllerStatus, InstanceRow, State

STATE_STYLE = {
    State.HEALTHY: "green",
    State.REGISTERING: "yellow",
    State.UNHEALTHY: "red",
    State.APP_DOWN: "magenta",
    State.FREE: "dim",
}


@dataclass
class Action:
    """One scaling action from the controller's activity log."""

    at: float  # seconds into the demo
    action: str
    count: int
    reason: str
    instance_ids: tuple[str, ...] = ()

    def line(self) -> str:
        ids = f" [{', '.join(self.instance_ids)}]" if self.instance_ids else ""
        return f"t={self.at:5.1f}s {self.action} {self.count}{ids}: {self.reason}"


@dataclass
class Frame:
    elapsed: float
    duration: float
    demand: float = 0.0  # requests per second asked in the last second
    served: int = 0  # in the last second
    failed: int = 0
    served_total: int = 0
    failed_total: int = 0
    instances: list[InstanceRow] = field(default_factory=list)
    controller: ControllerStatus = field(default_factory=ControllerStatus)
    mean_cpu: float | None = None  # over healthy instances
    cpu_target: float = 0.5
    phase: str = "running"

    @property
    def healthy(self) -> int:
        return sum(1 for r in self.instances if r.state == State.HEALTHY)


def plain_line(f: Frame) -> str:
    cpu = "-" if f.mean_cpu is None else f"{f.mean_cpu:.2f}"
    c = f.controller
    return (
        f"t={f.elapsed:5.1f}s {f.phase}: demand {f.demand:5.1f} rps, served {f.served}/s failed {f.failed}/s, "
        f"healthy {f.healthy}/{len(f.instances)}, mean CPU {cpu} (target {f.cpu_target:g}), "
        f"desired {c.desired} in-service {c.in_service} pending {c.pending}"
    )


def _bar(value: float, width: int = 20) -> Text:
    filled = max(0, min(width, round(value * width / 1.5)))  # the bar's end is 150 % of the allotment
    style = "red" if value > 1.0 else "yellow" if value > 0.7 else "green"
    return Text("█" * filled + "·" * (width - filled), style=style)


def render(f: Frame, actions: list[Action], settings: list[str]) -> Group:
    left = max(0.0, f.duration - f.elapsed)
    head = Text.assemble(
        ("Helix demo", "bold"),
        f"  {f.phase}, t={f.elapsed:.0f}s of {f.duration:.0f}s ({left:.0f}s left, Ctrl-C stops it)\n",
        ("demand ", "bold"),
        f"{f.demand:.1f} req/s   ",
        ("served ", "bold"),
        f"{f.served}/s ({f.served_total} total)   ",
        ("failed ", "bold"),
        (f"{f.failed}/s ({f.failed_total} total)", "red" if f.failed else ""),
    )
    c = f.controller
    cpu = "-" if f.mean_cpu is None else f"{f.mean_cpu:.2f}"
    ctl = Text.assemble(
        ("desired ", "bold"),
        str(c.desired),
        ("   in service ", "bold"),
        str(c.in_service),
        ("   pending ", "bold"),
        str(c.pending),
        ("   mean CPU ", "bold"),
        f"{cpu} (target {f.cpu_target:g})",
        ("   policy ", "bold"),
        c.policy or "-",
        ("\nlast decision: ", "bold"),
        f"{c.action or '-'}: {c.reason or '-'}",
    )
    table = Table(expand=True, show_edge=False, pad_edge=False)
    for name in ("instance", "zone", "state", "CPU", "", "app port", "age"):
        table.add_column(name, no_wrap=True)
    now = time.time()
    for r in sorted(f.instances, key=lambda r: r.registered_at):
        table.add_row(
            r.instance_id,
            r.zone,
            Text(r.state.label, style=STATE_STYLE.get(r.state, "")),
            f"{r.cpu:5.2f}",
            _bar(r.cpu),
            str(r.app_port or "-"),
            f"{now - r.registered_at:4.0f}s" if r.registered_at else "-",
        )
    if not f.instances:
        table.add_row("(no instance registered yet)", "", "", "", "", "", "")
    decisions = Text("\n".join(a.line() for a in actions[-8:]) or "(none yet)")
    return Group(
        Panel(Group(head, ctl), border_style="blue"),
        Panel(table, title=f"instances ({f.healthy} healthy)", border_style="green"),
        Panel(decisions, title="scaling actions", border_style="yellow"),
        Panel(Text("  ".join(settings), style="dim"), title="demo settings", border_style="dim"),
    )


class View:
    """Live view when `live` (a terminal), else a plain line every `every` seconds plus one line per
    scaling action as it happens."""

    def __init__(self, console: Console, live: bool, settings: list[str], every: float = 5.0):
        self.console = console
        self.live = live
        self.settings = settings
        self.every = every
        self.actions: deque[Action] = deque(maxlen=50)
        self._last_plain = -1e9
        self._live: Live | None = None

    def __enter__(self) -> View:
        if self.live:
            self._live = Live(console=self.console, refresh_per_second=4, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(None, None, None)
            self._live = None

    def action(self, a: Action) -> None:
        self.actions.append(a)
        if self._live is None:
            self.console.print(f"scaling: {a.line()}", highlight=False, markup=False, soft_wrap=True)

    def message(self, text: str) -> None:
        if self._live is not None:
            self._live.console.print(text, highlight=False, markup=False)
        else:
            self.console.print(text, highlight=False, markup=False, soft_wrap=True)

    def update(self, f: Frame) -> None:
        if self._live is not None:
            self._live.update(render(f, list(self.actions), self.settings))
        elif f.elapsed - self._last_plain >= self.every:
            self._last_plain = f.elapsed
            self.console.print(plain_line(f), highlight=False, markup=False, soft_wrap=True)
