"""Bursty traffic at the oracle's cost (issue 12 §4): k8s-hpa, aws-target-tracking, target and the
default `predictive` against the oracle, at boot times 20, 45, 90, 180 and 300 s, on

- every member of the synthetic family (controller_asg/sim/synthetic.py: `family(seed)` for seeds
  1, 2, 3: short random bursts, spikes and bursts recurring at times of day, diurnal + weekly
  cycles, slow ramps, heavy-tailed noise, an outage with and without a retry surge, random bursts
  of mixed lengths);
- the NASA-HTTP week of bench_policies (22-28 Jul 1995 after a week of history, 60 s average).

Model as bench_policies: 1 s poll and control interval, 60 s warm-up, min 2, max 60, target 0.5,
each demand scaled so its busiest measured second needs 20 instances at the target. `predictive`
plans for the boot time it is run at (HELIX_LAUNCH_LEAD = the boot time).

Prints, per boot time, every member's lost %, cost / oracle and actions for each policy, then a
summary: on how many members predictive loses fewer requests and costs less than k8s-hpa, and
whether the issue's goals hold:
- bursty members: cost <= 1.05x the oracle with lost <= 70% of k8s-hpa's;
- NASA: lost < 0.03% at cost <= 1.02x, with fewer actions than k8s-hpa.
Then, for the members made of random bursts, the least cost at which a policy that cannot tell
when the next burst starts meets the loss goal (bench/burst_bound.py), and how that cheapest policy
is made (the headroom it stands and the bursts it launches for). Every figure goes to
bench/out/bursty.json. Simulations run in BENCH_WORKERS processes (default: every core); each is
independent, so the figures do not depend on how many.

    python -m bench bursty          # or: make bench BENCH_ARGS=bursty

A trial of predictive's settings, for tuning: BENCH_PREDICTIVE sets PredictiveSettings fields
(k8s-hpa and the oracle run beside it), BENCH_ONLY picks scenarios (a member alone: every boot
time). It prints one line per scenario and the goals held; bench/out/bursty.json is left alone.

    BENCH_PREDICTIVE="in_margin=0.05,hold_leads=4" BENCH_ONLY="nasa@20,short-bursts/s1" python -m bench bursty
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from dataclasses import fields
from functools import lru_cache

import numpy as np

from bench import burst_bound
from bench.bench_policies import NASA, PEAK_INSTANCES
from controller_asg.policy import predictive_settings
from controller_asg.policy.predictive import Predictive, PredictiveSettings
from controller_asg.sim import synthetic
from controller_asg.sim.fleet import simulate
from controller_asg.sim.metrics import figures as figures_of
from controller_asg.sim.runner import capacity_for_peak, compare, params_from
from controller_asg.sim.trace import load_trace, smooth
from shared.config import Config, load_config

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "out")
DAY = 86400
BOOTS = (20.0, 45.0, 90.0, 180.0, 300.0)
SHOWN = ["k8s-hpa", "aws-target-tracking", "target", "predictive"]
SHORT = {"k8s-hpa": "k8s-hpa", "aws-target-tracking": "aws-tt", "target": "target", "predictive": "predictive"}
COST_GOAL = 1.05  # × the oracle, on bursty members
LOSS_GOAL = 0.70  # × k8s-hpa's lost requests, on bursty members
NASA_LOST, NASA_COST = 0.03, 1.02


def config(boot: float) -> Config:
    return load_config(
        {
            "HELIX_MIN_INSTANCES": "2",
            "HELIX_MAX_INSTANCES": "60",
            "HELIX_POLL_INTERVAL": "1",
            "HELIX_LAUNCH_LEAD": f"{boot:g}",
        },
        env_file="",
    )


def members() -> list[synthetic.Member]:
    return [m for seed in synthetic.FAMILY_SEEDS for m in synthetic.family(seed)]


@lru_cache(maxsize=2)
def scenario(key: str) -> tuple[np.ndarray, int]:
    """(demand, seconds of history) of `nasa` or a family member `shape/sSEED`."""
    if key == "nasa":
        return smooth(load_trace(NASA), 60), 7 * DAY
    shape, _, seed = key.partition("/s")
    m = synthetic.member(shape, int(seed))
    return m.demand, m.history


def run_one(task: tuple[str, float]) -> tuple[str, float, dict[str, dict]]:
    key, boot = task
    demand, history = scenario(key)
    cfg = config(boot)
    p = params_from(cfg, capacity_for_peak(demand[history:], PEAK_INSTANCES, cfg.cpu_target), boot)
    trial = trial_settings()
    if not trial:
        outcomes = compare(SHOWN + ["oracle"], demand, p, cfg, measure_from=history)
        return key, boot, {o.name: o.figures.as_dict() for o in outcomes}
    outcomes = compare(["k8s-hpa", "oracle"], demand, p, cfg, measure_from=history)
    found = {o.name: o.figures.as_dict() for o in outcomes}
    oracle_hours = found["oracle"]["instance_hours"]
    settings = predictive_settings(cfg)
    for name, value in trial.items():
        setattr(settings, name, type(getattr(settings, name))(value))  # hot_confirm is an int
    policy = Predictive(settings)
    found["predictive"] = figures_of(simulate(demand, policy, p, measure_from=history), p, oracle_hours).as_dict()
    return key, boot, found


def trial_settings() -> dict[str, float]:
    """BENCH_PREDICTIVE="field=value,...": PredictiveSettings fields for a trial ({}: none)."""
    raw = os.environ.get("BENCH_PREDICTIVE", "").strip()
    known = {f.name for f in fields(PredictiveSettings) if f.type in ("float", "int")}
    out: dict[str, float] = {}
    for item in filter(None, (x.strip() for x in raw.split(","))):
        name, _, value = item.partition("=")
        if name not in known:
            raise SystemExit(f"BENCH_PREDICTIVE={raw}: {name!r}: expected one of {', '.join(sorted(known))}")
        try:
            out[name] = float(value)
        except ValueError:
            raise SystemExit(f"BENCH_PREDICTIVE={raw}: {name}={value}: expected a number") from None
    return out


def trial_tasks(keys: list[str]) -> list[tuple[str, float]]:
    """BENCH_ONLY="nasa@20,short-bursts/s1": the scenarios for a trial (all when unset)."""
    raw = os.environ.get("BENCH_ONLY", "").strip()
    if not raw:
        return [(k, b) for k in keys for b in BOOTS]
    tasks = []
    for item in filter(None, (x.strip() for x in raw.split(","))):
        key, _, boot = item.partition("@")
        if key not in keys or (boot and float(boot) not in BOOTS):
            raise SystemExit(f"BENCH_ONLY={raw}: {item!r}: expected a member of {', '.join(keys)}, @ one of {BOOTS}")
        tasks += [(key, float(boot))] if boot else [(key, b) for b in BOOTS]
    return tasks


def trial(keys: list[str], bursty: dict[str, bool], workers: int) -> None:
    """One line per scenario: predictive with BENCH_PREDICTIVE's settings against k8s-hpa, and
    whether the goals hold; nothing is written."""
    tasks = trial_tasks(keys)
    print(f"trial: predictive with {trial_settings() or 'its defaults'} on {len(tasks)} scenarios")
    found = run_all(tasks, workers)
    for key, boot in tasks:
        me, hpa = found[(key, boot)]["predictive"], found[(key, boot)]["k8s-hpa"]
        if key == "nasa":
            why = nasa_goal(found[(key, boot)])[1]
        elif bursty[key]:
            ok, why = bursty_goal(found[(key, boot)])
            why = "goal held" if ok else f"goal missed: {why}"
        else:
            why = "-"
        print(
            f"{key:<22}{boot:>5g} s  predictive {me['lost_pct']:7.3f}% {me['cost_vs_oracle']:6.3f}x {me['actions']:5d}"
            f"  k8s-hpa {hpa['lost_pct']:7.3f}% {hpa['cost_vs_oracle']:6.3f}x {hpa['actions']:5d}  {why}"
        )


def run_all(tasks: list[tuple[str, float]], workers: int) -> dict[tuple[str, float], dict[str, dict]]:
    if workers <= 1:
        done = [run_one(t) for t in tasks]
    else:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            done = list(pool.imap_unordered(run_one, tasks, chunksize=1))
    return {(key, boot): figs for key, boot, figs in done}


def workers_wanted() -> int:
    raw = os.environ.get("BENCH_WORKERS", "")
    return int(raw) if raw.strip().isdigit() and int(raw) > 0 else (os.cpu_count() or 1)


def nasa_goal(figs: dict[str, dict]) -> tuple[bool, str]:
    me, hpa = figs["predictive"], figs["k8s-hpa"]
    checks = [
        (f"lost < {NASA_LOST}%", me["lost_pct"] < NASA_LOST),
        (f"cost <= {NASA_COST}x", me["cost_vs_oracle"] <= NASA_COST),
        ("fewer actions than k8s-hpa", me["actions"] < hpa["actions"]),
    ]
    return all(ok for _, ok in checks), "; ".join(f"{name}: {'yes' if ok else 'NO'}" for name, ok in checks)


def bursty_goal(figs: dict[str, dict]) -> tuple[bool, str]:
    """(held, why not): cost <= 1.05x the oracle with lost <= 70% of k8s-hpa's."""
    me, hpa = figs["predictive"], figs["k8s-hpa"]
    misses = []
    if me["cost_vs_oracle"] > COST_GOAL:
        misses.append(f"cost {me['cost_vs_oracle']:.3f}x")
    if me["lost_pct"] > LOSS_GOAL * hpa["lost_pct"]:
        ratio = me["lost_pct"] / hpa["lost_pct"] if hpa["lost_pct"] > 0 else float("inf")
        misses.append(f"lost {ratio:.2f}x k8s-hpa's" if np.isfinite(ratio) else "lost > 0, k8s-hpa none")
    return not misses, ", ".join(misses)


def boot_table(boot: float, keys: list[str], figures: dict[tuple[str, float], dict[str, dict]], bursty: dict) -> str:
    head = f"{'member':<22}" + "".join(f"{SHORT[n]:>21}" for n in SHOWN) + "  goal"
    sub = f"{'':<22}" + "".join(f"{'lost%':>8}{'cost':>7}{'acts':>6}" for _ in SHOWN)
    lines = [head, sub]
    for key in keys:
        figs = figures[(key, boot)]
        row = f"{key:<22}" + "".join(
            f"{figs[n]['lost_pct']:8.3f}{figs[n]['cost_vs_oracle']:7.3f}{figs[n]['actions']:6d}" for n in SHOWN
        )
        if key == "nasa":
            ok, _ = nasa_goal(figs)
            row += "  " + ("yes" if ok else "NO")
        elif bursty[key]:
            ok, why = bursty_goal(figs)
            row += "  " + ("yes" if ok else f"NO: {why}")
        else:
            row += "  -"
        lines.append(row)
    fam = [k for k in keys if k != "nasa"]
    mean = f"{f'mean of {len(fam)} members':<22}" + "".join(
        f"{np.mean([figures[(k, boot)][n]['lost_pct'] for k in fam]):8.3f}"
        f"{np.mean([figures[(k, boot)][n]['cost_vs_oracle'] for k in fam]):7.3f}"
        f"{np.mean([figures[(k, boot)][n]['actions'] for k in fam]):6.0f}"
        for n in SHOWN
    )
    lines.append(mean)
    return "\n".join(lines)


def summarize(boot: float, keys: list[str], figures: dict[tuple[str, float], dict[str, dict]], bursty: dict) -> dict:
    fam = [k for k in keys if k != "nasa"]
    fewer_lost = [
        k for k in fam if figures[(k, boot)]["predictive"]["lost_pct"] < figures[(k, boot)]["k8s-hpa"]["lost_pct"]
    ]
    cheaper = [
        k
        for k in fam
        if figures[(k, boot)]["predictive"]["instance_hours"] < figures[(k, boot)]["k8s-hpa"]["instance_hours"]
    ]
    more_lost = [
        k for k in fam if figures[(k, boot)]["predictive"]["lost_pct"] > figures[(k, boot)]["k8s-hpa"]["lost_pct"]
    ]
    judged = [k for k in fam if bursty[k]]
    held = [k for k in judged if bursty_goal(figures[(k, boot)])[0]]
    nasa_ok, nasa_why = nasa_goal(figures[("nasa", boot)])

    def mean(name: str, figure: str) -> float:
        return float(np.mean([figures[(k, boot)][name][figure] for k in fam]))

    return {
        "members": len(fam),
        "mean_lost_pct": {n: mean(n, "lost_pct") for n in SHOWN},
        "mean_cost_vs_oracle": {n: mean(n, "cost_vs_oracle") for n in SHOWN},
        "fewer_lost_than_k8s_hpa": fewer_lost,
        "more_lost_than_k8s_hpa": more_lost,
        "cheaper_than_k8s_hpa": cheaper,
        "fewer_lost_and_cheaper": [k for k in fewer_lost if k in cheaper],
        "bursty_members": len(judged),
        "bursty_goal_held": held,
        "bursty_goal_missed": {k: bursty_goal(figures[(k, boot)])[1] for k in judged if k not in held},
        "nasa_goal_held": nasa_ok,
        "nasa_goal": nasa_why,
    }


# The members made of random bursts: how each is taken apart for bench/burst_bound.py.
BOUND_SHAPES = {"short-bursts": synthetic.short_bursts_parts, "mixed-bursts": synthetic.mixed_bursts_parts}


def bounds(figures: dict[tuple[str, float], dict[str, dict]], history: dict[str, int]) -> dict[str, dict[str, dict]]:
    """For each member made of random bursts and each boot time: the least cost at which a policy
    that does not know when the next burst starts can lose at most LOSS_GOAL of k8s-hpa's loss
    (bench/burst_bound.py, over the measured part, after the member's `history` seconds), beside
    predictive's figures."""
    out: dict[str, dict[str, dict]] = {}
    for shape, parts_of in BOUND_SHAPES.items():
        for seed in synthetic.FAMILY_SEEDS:
            key = f"{shape}/s{seed}"
            parts = parts_of(seed).after(history[key])
            demand = parts.demand
            for boot in BOOTS:
                cfg = config(boot)
                p = params_from(cfg, capacity_for_peak(demand, PEAK_INSTANCES, cfg.cpu_target), boot)
                figs = figures[(key, boot)]  # the oracle's run there is the cost reference
                points = burst_bound.frontier(parts, p, figs["oracle"]["instance_hours"])
                allowed = LOSS_GOAL * figs["k8s-hpa"]["lost_pct"]
                cheapest = burst_bound.cheapest_at(points, allowed)
                least = None if cheapest is None else burst_bound.cost_of(cheapest)
                out.setdefault(key, {})[f"{boot:g}"] = {
                    "goal_lost_pct": allowed,
                    "least_cost": least,
                    # how that cheapest policy is made: two hull points, alternated (share: of the time at the second)
                    "cheapest_at_goal": None
                    if cheapest is None
                    else {"points": [vars(cheapest[0]), vars(cheapest[1])], "share": cheapest[2]},
                    "reachable": least is not None and least <= COST_GOAL,
                    "predictive": {k: figs["predictive"][k] for k in ("lost_pct", "cost_vs_oracle")},
                    # the frontier at predictive's own loss: predictive should cost no less
                    "least_cost_at_predictive_loss": burst_bound.least_cost(points, figs["predictive"]["lost_pct"]),
                    "frontier": [vars(q) for q in points],
                }
    return out


def cheapest_table(found: dict[str, dict[str, dict]]) -> str:
    """How the frontier's cheapest policy meets the loss goal in each cell (burst_bound.describe)."""
    lines = [
        "\nhow it does so: headroom over the calm load (%: of the calm need; i: instances), and the bursts"
        " it launches for (>N s: those lasting longer; short-bursts' last 20-80 s; x0.5: half of what they"
        " need above the standing capacity); a..b: alternating two",
        f"{'member':<18}" + "".join(f"{f'{b:g} s':>33}" for b in BOOTS),
    ]
    for key, by_boot in found.items():
        cells = []
        for b in BOOTS:
            row = by_boot[f"{b:g}"]["cheapest_at_goal"]
            if row is None:
                cells.append("none")
                continue
            first, second = (burst_bound.Point(**q) for q in row["points"])
            cells.append(burst_bound.describe(first, second, b))
        lines.append(f"{key:<18}" + "".join(f"{c:>33}" for c in cells))
    return "\n".join(lines)


def bound_table(found: dict[str, dict[str, dict]]) -> str:
    lines = [
        "\nrandom bursts: the least cost at which a policy that cannot tell when the next burst starts"
        f" loses <= {LOSS_GOAL:.0%} of k8s-hpa's (bench/burst_bound.py), beside predictive (lost %, cost)",
        f"{'member':<18}" + "".join(f"{f'{b:g} s':>26}" for b in BOOTS),
    ]
    for key, by_boot in found.items():
        cells = []
        for b in BOOTS:
            row = by_boot[f"{b:g}"]
            least = "none" if row["least_cost"] is None else f"{row['least_cost']:.2f}x"
            mark = "" if row["reachable"] else "!"
            cells.append(
                f"{least + mark:>8} | {row['predictive']['lost_pct']:.2f}% {row['predictive']['cost_vs_oracle']:.2f}x"
            )
        lines.append(f"{key:<18}" + "".join(f"{c:>26}" for c in cells))
    lines.append(f"(!: above {COST_GOAL}x: out of reach for such a policy, by the frontier's argument)")
    rows = [(key, b, row) for key, by_boot in found.items() for b, row in by_boot.items()]
    below = [
        f"{key}@{b}"
        for key, b, row in rows
        if row["least_cost_at_predictive_loss"] is not None
        and row["predictive"]["cost_vs_oracle"] < row["least_cost_at_predictive_loss"] - 1e-9
    ]
    gaps = [
        row["predictive"]["cost_vs_oracle"] - row["least_cost_at_predictive_loss"]
        for _, _, row in rows
        if row["least_cost_at_predictive_loss"] is not None
    ]
    lines.append(
        f"predictive against the frontier at its own loss: on or above it in {len(rows) - len(below)}/{len(rows)}"
        f" cells ({min(gaps):+.3f}x to {max(gaps):+.3f}x above it)"
        + (f"; BELOW it (the frontier is no bound there): {', '.join(below)}" if below else "")
    )
    return "\n".join(lines)


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    family = members()
    keys = ["nasa"] + [m.name for m in family]
    bursty = {m.name: m.bursty for m in family}
    print(
        "the synthetic family (controller_asg/sim/synthetic.py), seeds " + ", ".join(map(str, synthetic.FAMILY_SEEDS))
    )
    for shape in synthetic.SHAPES:
        m = next(m for m in family if m.shape == shape)
        print(f"  {shape:<18} {'bursty' if m.bursty else 'smooth'}  {m.description}")
    length = {m.name: len(m.demand) for m in family}
    length["nasa"] = 14 * DAY
    if os.environ.get("BENCH_PREDICTIVE", "").strip() or os.environ.get("BENCH_ONLY", "").strip():
        trial(keys, bursty, workers_wanted())
        return
    # longest first, so the last task to finish is a short one
    tasks = sorted(((k, b) for k in keys for b in BOOTS), key=lambda t: (-length[t[0]] * (1 + t[1] / 3000), t))
    workers = workers_wanted()
    started = time.monotonic()
    figures = run_all(tasks, workers)
    print(
        f"\n{len(tasks)} scenarios x {len(SHOWN) + 1} policies simulated in {time.monotonic() - started:.0f} s "
        f"({workers} workers); per member: lost % of requests, cost / oracle, actions (launches + terminations)"
    )
    summary = {}
    for boot in BOOTS:
        print(f"\nboot {boot:g} s (predictive's HELIX_LAUNCH_LEAD={boot:g})")
        print(boot_table(boot, keys, figures, bursty))
        summary[boot] = summarize(boot, keys, figures, bursty)
    print(
        f"\nsummary: predictive against k8s-hpa on the {len(family)} family members; the bursty goal is "
        f"cost <= {COST_GOAL}x oracle with lost <= {LOSS_GOAL:.0%} of k8s-hpa's"
    )
    print(
        "(fewer lost / more lost / cheaper: members where predictive loses fewer requests / more / costs less"
        " than k8s-hpa; both: fewer lost and cheaper; means over the family, predictive vs k8s-hpa)"
    )
    print(
        f"{'boot':>6}  {'fewer lost':>10}  {'more lost':>9}  {'cheaper':>7}  {'both':>4}  "
        f"{'mean lost %':>15}  {'mean cost':>13}  {'bursty goal':>11}  NASA goal"
    )
    for boot in BOOTS:
        s = summary[boot]
        lost, cost = s["mean_lost_pct"], s["mean_cost_vs_oracle"]
        print(
            f"{boot:>5g}s  {len(s['fewer_lost_than_k8s_hpa']):>6}/{s['members']:<3}  "
            f"{len(s['more_lost_than_k8s_hpa']):>5}/{s['members']:<3}  {len(s['cheaper_than_k8s_hpa']):>3}/{s['members']:<3}  "
            f"{len(s['fewer_lost_and_cheaper']):>4}  {lost['predictive']:>6.3f} / {lost['k8s-hpa']:<6.3f}  "
            f"{cost['predictive']:>5.3f} / {cost['k8s-hpa']:<5.3f}  "
            f"{len(s['bursty_goal_held']):>7}/{s['bursty_members']:<3}  {s['nasa_goal']}"
        )
    for boot in BOOTS:
        s = summary[boot]
        if s["more_lost_than_k8s_hpa"]:
            print(f"boot {boot:g} s: predictive loses more than k8s-hpa on {', '.join(s['more_lost_than_k8s_hpa'])}")
    found = bounds(figures, {m.name: m.history for m in family})
    print(bound_table(found))
    print(cheapest_table(found))
    doc = {
        "boots": list(BOOTS),
        "policies": SHOWN + ["oracle"],
        "members": {
            m.name: {
                "shape": m.shape,
                "seed": m.seed,
                "description": m.description,
                "bursty": m.bursty,
                "history_s": m.history,
                "measured_s": len(m.demand) - m.history,
            }
            for m in family
        },
        "figures": {f"{b:g}": {k: figures[(k, b)] for k in keys} for b in BOOTS},
        "summary": {f"{b:g}": summary[b] for b in BOOTS},
        "burst_bound": found,
    }
    with open(os.path.join(OUT, "bursty.json"), "w", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=2)
    print(f"\nfigures: {OUT}/bursty.json")


if __name__ == "__main__":
    main()
