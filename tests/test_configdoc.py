"""The configuration reference (README table, deploy/helix.env.example) is generated from the loader
and checked against it, so documentation and `shared.config` can never drift."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys

import pytest

from shared import configdoc
from shared.config import Config, SettingInfo, load_config, settings, text
from tests.procs import ROOT, base_env


def run_configdoc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "shared.configdoc", *args],
        cwd=ROOT,
        env=base_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def docs(tmp_path):
    """Copies of the committed README and env example to break and repair."""
    readme = tmp_path / "README.md"
    env = tmp_path / "helix.env.example"
    shutil.copy(configdoc.README, readme)
    shutil.copy(configdoc.ENV_EXAMPLE, env)
    return readme, env


def test_committed_docs_match_the_loader():
    # The drift check itself: fails when a setting changes without `python -m shared.configdoc --write`,
    # and when README.md lacks the table markers.
    result = run_configdoc("--check")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_check_reports_each_stale_file_on_one_line_and_write_repairs_them(docs):
    readme, env = docs
    readme.write_text(readme.read_text().replace("`HELIX_POLL_INTERVAL` | `1.0`", "`HELIX_POLL_INTERVAL` | `2.0`"))
    env.write_text(env.read_text().replace("#HELIX_MAX_INSTANCES=10", "#HELIX_MAX_INSTANCES=99"))
    before_outside = readme.read_text().split(configdoc.START_MARKER)[0]

    result = run_configdoc("--check", "--readme", str(readme), "--env-example", str(env))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2, lines
    assert str(readme) in lines[0] and "out of date" in lines[0]
    assert str(env) in lines[1] and "out of date" in lines[1]

    result = run_configdoc("--write", "--readme", str(readme), "--env-example", str(env))
    assert result.returncode == 0, result.stderr
    assert readme.read_text() == open(configdoc.README, encoding="utf-8").read()
    assert env.read_text() == open(configdoc.ENV_EXAMPLE, encoding="utf-8").read()
    assert readme.read_text().split(configdoc.START_MARKER)[0] == before_outside
    assert run_configdoc("--check", "--readme", str(readme), "--env-example", str(env)).returncode == 0


def test_write_keeps_everything_outside_the_markers(tmp_path):
    readme = tmp_path / "README.md"
    env = tmp_path / "env"
    readme.write_text(f"# Title\n\nbefore\n{configdoc.START_MARKER}\nstale\n{configdoc.END_MARKER}\nafter\n")
    assert configdoc.write(str(readme), str(env)) == [str(readme), str(env)]
    text_ = readme.read_text()
    assert text_.startswith(f"# Title\n\nbefore\n{configdoc.START_MARKER}\n### General\n")
    assert text_.endswith(f"\n{configdoc.END_MARKER}\nafter\n")
    assert "stale" not in text_
    assert configdoc.write(str(readme), str(env)) == []  # idempotent


@pytest.mark.parametrize(
    "body",
    [
        "no markers at all\n",
        f"only the start {configdoc.START_MARKER}\n",
        f"{configdoc.END_MARKER} reversed {configdoc.START_MARKER}\n",
    ],
)
def test_readme_without_its_markers_fails_the_check_and_is_not_written(tmp_path, body):
    readme = tmp_path / "README.md"
    env = tmp_path / "env"
    readme.write_text(body)
    result = run_configdoc("--check", "--readme", str(readme), "--env-example", str(env))
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1
    assert str(readme) in result.stderr and "config-table" in result.stderr
    result = run_configdoc("--write", "--readme", str(readme), "--env-example", str(env))
    assert result.returncode == 1
    assert readme.read_text() == body
    assert not env.exists()


def test_every_setting_and_alias_is_documented_in_both():
    table = configdoc.render_table(settings())
    env = configdoc.render_env_example(settings())
    for info in settings():
        row = next((line for line in table.splitlines() if line.startswith(f"| `{info.key}` |")), None)
        assert row is not None, info.key
        for alias in info.aliases:
            assert f"`{alias}`" in row
            assert alias in env
        assert env.count(f"#{info.key}=") == 1, info.key
    groups = {info.group for info in settings()}
    assert table.count("### ") == len(groups)


def test_secrets_get_no_example_value():
    env = configdoc.render_env_example(settings()).splitlines()
    secrets = [info for info in settings() if info.secret]
    assert secrets, "the declaration has secrets (token, AWS keys)"
    for info in secrets:
        assert f"#{info.key}=" in env, info.key
    # Even a secret that had a default would not show it.
    fake = SettingInfo("x", "HELIX_X", "hunter2", "A secret.", (), True, "security", text())
    assert "hunter2" not in configdoc.render_env_example([fake])
    assert "**Secret.**" in configdoc.render_table([fake])


def test_env_example_uncommented_loads_to_the_defaults(tmp_path):
    # Every default the example shows is one the loader accepts and means exactly the default.
    lines = []
    for line in open(configdoc.ENV_EXAMPLE, encoding="utf-8"):
        if line.startswith("#HELIX_"):
            lines.append(line[1:])
    assert len(lines) == len(settings())
    path = tmp_path / "helix.env"
    path.write_text("".join(lines))
    cfg = load_config({}, env_file=str(path))
    assert dataclasses.asdict(cfg) == dataclasses.asdict(Config())


def test_table_cells_are_escaped_and_unknown_groups_still_documented():
    odd = SettingInfo("y", "HELIX_Y", "a|b", "Pipes | in the doc.", ("SEED_Y",), False, "brand-new", text())
    table = configdoc.render_table([odd])
    row = next(line for line in table.splitlines() if line.startswith("| `HELIX_Y`"))
    assert row.count(" | ") == 3  # exactly four cells: the pipes inside are escaped
    assert "Pipes \\| in the doc." in row
    assert "### Brand-new" in table
