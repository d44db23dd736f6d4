"""`make mutate`: mutation testing of Helix's pure core with mutmut, on a copy of the tree.

For each module named, the tree is copied to a fresh temporary directory (the working tree is never
written to), mutmut generates the module's mutants there and runs, for each mutant, only the tests
mapped to that module below (and of those only the ones that reach the mutated function). It
prints each module's score (killed / total) and every mutant not killed, as file:line and the
mutation. Modules that do not exist (yet) are skipped.

What mutmut 3 mutates: operators, comparisons, boolean operators, number constants, string
literals, arguments and return values inside functions and methods. It leaves module-level
constants and decorated functions (`@property`) alone, so those are not measured here.

A mutant counts as killed when a test failed, hung (timeout) or crashed under it. "no tests"
(no mapped test reaches the function) counts as not killed.

mutmut itself first runs the mapped tests on the unmutated copy (they must pass) and then once
with a mutant forced to fail, so a copy that imported the working tree instead would stop there.

Usage: python -m tests.mutate [--jobs N] [--keep] [--tests FILE]... [--fail-under PCT] MODULE ...
"""

from __future__ import annotations

import argparse
import ast
import difflib
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Module -> the test files (globs, or pytest node ids) that pin its behaviour: fast unit tests
# only (the fault-schedule and end-to-end tests take minutes per run). Missing files are left out,
# so a mapping may name tests that arrive later.
MODULE_TESTS: dict[str, list[str]] = {
    "controller_asg/health.py": [
        "tests/test_controller_unit.py",
        "tests/test_cost_safety_rules.py",
        "tests/test_act_path_rules.py",
        "tests/test_health*.py",
    ],
    "controller_asg/fleet.py": [
        "tests/test_controller_unit.py",
        "tests/test_cost_safety_rules.py",
        "tests/test_fleet_rules.py",
    ],
    "controller_asg/termination.py": ["tests/test_controller_unit.py", "tests/test_termination_rules.py"],
    "controller_asg/policy/threshold.py": ["tests/test_policy_target.py", "tests/test_policy_threshold.py"],
    "controller_asg/policy/target.py": ["tests/test_policy_target.py"],
    "controller_asg/policy/predictive.py": ["tests/test_policy_predictive.py"],
    "monitor_s/validation.py": ["tests/test_monitor_validation.py", "tests/test_register_validation_rules.py"],
    "shared/config.py": ["tests/test_config.py", "tests/test_config_parsers.py"],
    "controller_asg/sim/metrics.py": ["tests/test_simulate.py", "tests/test_sim_metrics.py"],
    "controller_asg/gate.py": [
        "tests/test_cost_safety_rules.py",
        "tests/test_act_path_rules.py",
        "tests/test_gate*.py",
    ],
    "controller_asg/breaker.py": [
        "tests/test_cost_safety_rules.py",
        "tests/test_act_path_rules.py",
        "tests/test_breaker*.py",
    ],
    "controller_asg/plan.py": [
        "tests/test_cost_safety_rules.py",
        "tests/test_controller_unit.py",
        "tests/test_act_path_rules.py",
    ],
    "monitor_s/rowstate.py": ["tests/test_rowstate.py"],
    "monitor_s/admission.py": [
        f"tests/test_registration_binding.py::{name}"
        for name in (
            "test_admission_rules",
            "test_rate_limiter_buckets",
            "test_admission_messages_and_non_ip_hosts",
            "test_rate_limiter_edges",
        )
    ],
}

# Only these functions of a module are mutated (all of them when a module is not listed here).
# shared/config.py: the parsers, not the loader around them.
MODULE_FUNCTIONS: dict[str, list[str]] = {
    "shared/config.py": [
        "text",
        "integer",
        "number",
        "flag",
        "choice",
        "host_port",
        "csv_list",
        "shm_segment_name",
        "cpu_source_spec",
        "app_check_spec",
        "label_pairs",
        "parse_host_port",
    ],
}

# What the copy leaves out: version control, environments, caches, outputs.
SKIP_NAMES = {
    ".git",
    ".venv",
    "__pycache__",
    ".hypothesis",
    ".pytest_cache",
    ".ruff_cache",
    ".mypy_cache",
    "mutants",
    ".helix-state",
    "demo-out",
    "build",
}
SKIP_PATHS = {"bench/out"}
PACKAGES = ["controller_asg", "monitor_c", "monitor_s", "shared", "protos"]
ALSO_COPY = ["bench", "deploy", "README.md", "DEVELOPERS.md", "Makefile", "requirements.txt", "requirements-dev.txt"]
KILLED = {"killed", "timeout", "segfault"}
SEP = "\u01c1"  # mutmut's class separator in mangled names: x\u01c1Class\u01c1method


@dataclass
class Survivor:
    name: str
    status: str
    line: int
    change: str


@dataclass
class Result:
    module: str
    tests: list[str]
    total: int = 0
    killed: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    survivors: list[Survivor] = field(default_factory=list)
    seconds: float = 0.0
    skipped: str = ""
    error: str = ""

    @property
    def score(self) -> float:
        return 100.0 * self.killed / self.total if self.total else 0.0


def copy_tree(dest: Path) -> None:
    def ignore(directory: str, names: list[str]) -> set[str]:
        rel = Path(directory).relative_to(ROOT)
        return {n for n in names if n in SKIP_NAMES or (rel / n).as_posix() in SKIP_PATHS or n.endswith(".pyc")}

    shutil.copytree(ROOT, dest, symlinks=True, ignore=ignore)


def mapped_tests(module: str) -> list[str]:
    found: list[str] = []
    for spec in MODULE_TESTS.get(module, []):
        path = spec.split("::")[0]
        matches = sorted(glob.glob(path, root_dir=ROOT)) if any(c in path for c in "*?[") else [path]
        for match in matches:
            if (ROOT / match).is_file() and match not in found:
                found.append(spec if "::" in spec else match)
    return found


def toml_list(items: list[str]) -> str:
    return "[" + ", ".join(json.dumps(i) for i in items) + "]"


def configure(tree: Path, module: str, tests: list[str]) -> None:
    """mutmut's settings for this module, appended to the copy's pyproject.toml."""
    try:
        project = tomllib.loads((tree / "pyproject.toml").read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise SystemExit(f"mutate: pyproject.toml: {exc}, expected valid TOML") from None
    if "mutmut" in project.get("tool", {}):
        raise SystemExit("mutate: pyproject.toml has a [tool.mutmut] table, expected none (tests/mutate.py writes it)")
    with open(tree / "pyproject.toml", "a", encoding="utf-8") as fh:
        fh.write(
            "\n[tool.mutmut]\n"
            f"source_paths = {toml_list(PACKAGES)}\n"
            f"only_mutate = {toml_list([module])}\n"
            f"also_copy = {toml_list([p for p in ALSO_COPY if (tree / p).exists()])}\n"
            f"pytest_add_cli_args = {toml_list(['-p', 'no:cacheprovider', '-q'])}\n"
            f"pytest_add_cli_args_test_selection = {toml_list(tests)}\n"
            "use_git_change_detection = false\n"
        )


def dotted(module: str) -> str:
    return module.removesuffix(".py").replace("/", ".")


def patterns_for(module: str) -> list[str]:
    return [f"{dotted(module)}.x_{name}__mutmut_*" for name in MODULE_FUNCTIONS.get(module, [])]


def def_lines(source: str) -> dict[tuple[str | None, str], int]:
    """(class or None, function) -> line of its `def`, for the top-level functions and methods."""
    out: dict[tuple[str | None, str], int] = {}
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out[(None, node.name)] = node.lineno
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    out[(node.name, item.name)] = item.lineno
    return out


def describe(tree: Path, module: str, names: list[str]) -> dict[str, tuple[int, str]]:
    """mutant name -> (line in the module, 'old -> new'): the mutant's function in mutmut's generated
    file diffed against its unmutated copy there (`<function>__mutmut_orig`)."""
    defs = def_lines((tree / module).read_text(encoding="utf-8"))
    generated = (tree / "mutants" / module).read_text(encoding="utf-8")
    lines = generated.split("\n")
    bodies: dict[str, list[str]] = {}
    for node in ast.walk(ast.parse(generated)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and "__mutmut_" in node.name:
            text = [t.strip() for t in lines[node.lineno - 1 : node.end_lineno]]
            bodies[node.name] = [text[0].replace(node.name, "", 1)] + text[1:]  # the def line without the name
    out: dict[str, tuple[int, str]] = {}
    for name in names:
        local = name.rpartition(".")[2]  # x_integer__mutmut_3, or xǁThresholdǁdecide__mutmut_4
        stem = local.partition("__mutmut_")[0]
        outer, _, func = stem.rpartition(SEP) if SEP in stem else ("", "", stem.removeprefix("x_"))
        cls = outer.partition(SEP)[2] if outer else None
        orig, mutant = bodies.get(stem + "__mutmut_orig"), bodies.get(local)
        where = defs.get((cls, func), 0)
        if orig is None or mutant is None:
            out[name] = (where, "(function not found in the generated file)")
            continue
        ops = [op for op in difflib.SequenceMatcher(a=orig, b=mutant, autojunk=False).get_opcodes() if op[0] != "equal"]
        if not ops:
            out[name] = (where, "(no textual change)")
            continue
        _, i1, i2, j1, j2 = ops[0]
        old = " / ".join(orig[i1:i2]) or "(nothing)"
        new = " / ".join(mutant[j1:j2]) or "(removed)"
        out[name] = (where + i1, f"{old}  ->  {new}")
    return out


def mutmut_command() -> list[str]:
    script = Path(sys.executable).parent / "mutmut"
    return [str(script)] if script.exists() else [sys.executable, "-m", "mutmut"]


def run_module(module: str, jobs: int, keep: bool, tests: list[str] | None = None) -> Result:
    from mutmut.stats import status_by_exit_code

    tests = tests or mapped_tests(module)
    result = Result(module, tests)
    if not (ROOT / module).is_file():
        result.skipped = "module absent"
        return result
    if not tests:
        result.skipped = "no tests mapped"
        return result
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="helix-mutate-"))
    try:
        tree = work / "tree"
        copy_tree(tree)
        configure(tree, module, tests)
        patterns = patterns_for(module)
        log = work / "mutmut.log"
        with open(log, "w", encoding="utf-8") as out:
            proc = subprocess.run(
                [*mutmut_command(), "run", "--max-children", str(jobs), *patterns],
                cwd=tree,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
            )
        meta = tree / "mutants" / (module + ".meta")
        if proc.returncode != 0 or not meta.is_file():
            # Most often the tests fail on the unmutated tree: mutmut needs them green first.
            tail = log.read_text(encoding="utf-8", errors="replace")[-2500:]
            result.error = f"mutmut exited {proc.returncode}; the end of its log:\n{tail}"
            return result
        codes: dict[str, int | None] = json.loads(meta.read_text(encoding="utf-8"))["exit_code_by_key"]
        prefixes = tuple(p.removesuffix("*") for p in patterns)
        if prefixes:
            codes = {k: v for k, v in codes.items() if k.startswith(prefixes)}
        open_names = []
        for name, code in codes.items():
            status = status_by_exit_code[code]
            result.statuses[status] = result.statuses.get(status, 0) + 1
            result.total += 1
            if status in KILLED:
                result.killed += 1
            else:
                open_names.append((name, status))
        described = describe(tree, module, [n for n, _ in open_names])
        for name, status in open_names:
            line, change = described[name]
            result.survivors.append(Survivor(name, status, line, change))
        result.survivors.sort(key=lambda s: (s.line, s.name))
    finally:
        result.seconds = time.monotonic() - started
        if keep:
            print(f"  (kept {work})")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return result


def report(r: Result) -> None:
    if r.skipped:
        print(f"{r.module}: skipped ({r.skipped})")
        return
    if r.error:
        print(f"{r.module}: ERROR, no score (are its tests green on this tree?): {r.error}")
        return
    counts = ", ".join(f"{n} {s}" for s, n in sorted(r.statuses.items()))
    print(f"{r.module}: {r.killed}/{r.total} killed ({r.score:.1f}%) in {r.seconds:.0f} s [{counts}]")
    print(f"  tests: {' '.join(r.tests)}")
    for s in r.survivors:
        print(f"  {r.module}:{s.line}: {s.status}: {s.change}  ({s.name.rpartition('.')[2]})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mutate", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "modules", nargs="*", default=list(MODULE_TESTS), help="module paths (default: every mapped module)"
    )
    ap.add_argument("--jobs", type=int, default=1, help="mutants tested at once (default 1)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary copies")
    ap.add_argument(
        "--tests", action="append", default=None, help="a test file to run instead of the mapped ones (repeatable)"
    )
    ap.add_argument("--fail-under", type=float, default=None, help="exit 1 if a module scores below this %%")
    args = ap.parse_args(argv)
    unknown = [m for m in args.modules if m not in MODULE_TESTS]
    if unknown:
        print(f"mutate: {unknown[0]}: expected one of {', '.join(MODULE_TESTS)}", file=sys.stderr)
        return 2
    started = time.monotonic()
    results = []
    for module in args.modules:
        r = run_module(module, max(1, args.jobs), args.keep, args.tests)
        report(r)
        results.append(r)
        sys.stdout.flush()
    print()
    print("module                                    killed/total  score")
    for r in results:
        shown = "skipped" if r.skipped else "ERROR" if r.error else f"{r.killed:>6}/{r.total:<5}  {r.score:5.1f}%"
        print(f"{r.module:<42}{shown}")
    print(f"mutate: done in {time.monotonic() - started:.0f} s")
    if any(r.error for r in results):
        return 1
    if args.fail_under is not None and any(not r.skipped and r.score < args.fail_under for r in results):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
