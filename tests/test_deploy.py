"""The deployment kit: systemd units (verified by systemd-analyze), the AMI bake script and its
Packer template, deploy/sysdeps.sh.

The units run binaries that exist only on a deployed machine (/opt/helix/.venv/bin/python), so they
are verified inside a temporary root holding this machine's systemd units, the Helix units and a
stub interpreter at exactly the path the units name: any other path, an unknown key or a bad value
makes systemd-analyze complain, and any complaint fails the test.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import tempfile
from collections import defaultdict
from pathlib import Path

import pytest

from tests.procs import ROOT

DEPLOY = Path(ROOT) / "deploy"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze") or (
    "/usr/bin/systemd-analyze" if os.access("/usr/bin/systemd-analyze", os.X_OK) else None
)
SHELLCHECK = shutil.which("shellcheck")
VENV_PYTHON = "/opt/helix/.venv/bin/python"
MANAGER_UNITS = ["helix-monitor-s.service", "helix-controller-asg.service"]
AGENT_UNITS = ["helix-monitor-c.service"]
UNIT_PATHS = {name: DEPLOY / "systemd" / name for name in MANAGER_UNITS + AGENT_UNITS}
UNIT_PATHS["helix-sample-app.service"] = DEPLOY / "ami" / "helix-sample-app.service"
SHELL_SCRIPTS = sorted(glob.glob(str(DEPLOY / "**" / "*.sh"), recursive=True))

needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed (Debian package: systemd)"
)
needs_shellcheck = pytest.mark.skipif(
    SHELLCHECK is None,
    reason="shellcheck is not installed (run deploy/sysdeps.sh as root, or apt-get install shellcheck)",
)


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """A unit file as section -> key -> every value given (systemd allows a key more than once)."""
    sections: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    current = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        assert sep and current, f"not a unit file line: {raw!r}"
        sections[current][key.strip()].append(value.strip())
    return sections


def unit(name: str) -> dict[str, dict[str, list[str]]]:
    return parse_unit(UNIT_PATHS[name].read_text())


def one(section: dict[str, list[str]], key: str) -> str:
    values = section.get(key, [])
    assert len(values) == 1, f"{key}: expected exactly one value, got {values}"
    return values[0]


def words(section: dict[str, list[str]], key: str) -> list[str]:
    return [w for value in section.get(key, []) for w in value.split()]


# ---------------------------------------------------------------------------------------------
# systemd-analyze in a temporary root.


@pytest.fixture(scope="module")
def unit_root(tmp_path_factory) -> Path:
    """A root with this machine's stock units, the stub interpreter and an empty /etc/systemd/system."""
    root = tmp_path_factory.mktemp("systemd-root")
    stock = next(d for d in ("/usr/lib/systemd/system", "/lib/systemd/system") if os.path.isdir(d))
    shutil.copytree(stock, root / "usr/lib/systemd/system", symlinks=True)
    stub = root / VENV_PYTHON.lstrip("/")
    stub.parent.mkdir(parents=True)
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    (root / "etc/systemd/system").mkdir(parents=True)
    return root


def verify(root: Path, files: dict[str, str]) -> tuple[int, str]:
    """Install `files` (name -> text) in the root and verify them; (exit status, everything printed)."""
    assert SYSTEMD_ANALYZE is not None  # callers are marked needs_systemd_analyze
    unit_dir = root / "etc/systemd/system"
    for old in unit_dir.iterdir():
        old.unlink()
    for name, text_ in files.items():
        (unit_dir / name).write_text(text_)
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", f"--root={root}", "--man=no", "--generators=no", *files],
        cwd=unit_dir,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return result.returncode, (result.stdout + result.stderr).strip()


@needs_systemd_analyze
def test_units_pass_systemd_analyze_verify_without_a_single_warning(unit_root):
    rc, output = verify(unit_root, {name: path.read_text() for name, path in UNIT_PATHS.items()})
    assert rc == 0 and output == "", output


@needs_systemd_analyze
@pytest.mark.parametrize(
    "breakage, expected",
    [
        (("ProtectSystem=strict", "ProtectSystem=strickt"), "protect system"),
        (("KillSignal=SIGTERM", "KillSignal=SIGTREM"), "SIGTREM"),
        (("NoNewPrivileges=yes", "NoNewPrivilege=yes"), "Unknown key"),
        ((VENV_PYTHON, "/opt/helix/venv/bin/python"), "not executable"),
        (("[Service]", "[Servic]"), "Unknown section"),
    ],
)
def test_a_broken_unit_fails_verification(unit_root, breakage, expected):
    # The check above is only worth something if systemd-analyze catches these in this root.
    old, new = breakage
    text_ = UNIT_PATHS["helix-monitor-s.service"].read_text()
    assert old in text_
    rc, output = verify(unit_root, {"helix-monitor-s.service": text_.replace(old, new, 1)})
    assert output != "" or rc != 0
    assert expected.lower() in output.lower(), output


EXPOSURE_THRESHOLD = 30  # systemd-analyze's 0..100 scale: 3.0, "OK"; the units score about 1.5 to 1.7


def security(root: Path, name: str) -> subprocess.CompletedProcess:
    assert SYSTEMD_ANALYZE is not None  # callers are marked needs_systemd_analyze
    result = subprocess.run(
        [
            SYSTEMD_ANALYZE,
            "security",
            "--offline=yes",
            f"--root={root}",
            f"--threshold={EXPOSURE_THRESHOLD}",
            "--no-pager",
            name,
        ],
        cwd=root / "etc/systemd/system",
        capture_output=True,
        text=True,
        timeout=120,
    )
    if "Unknown command verb" in result.stderr or "unrecognized option" in result.stderr:
        pytest.skip(f"this systemd-analyze cannot score units offline: {result.stderr.strip()}")
    return result


@needs_systemd_analyze
@pytest.mark.parametrize("name", list(UNIT_PATHS))
def test_sandboxing_exposure_stays_low(unit_root, name):
    verify(unit_root, {n: p.read_text() for n, p in UNIT_PATHS.items()})
    result = security(unit_root, name)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    assert "Overall exposure level" in result.stdout


@needs_systemd_analyze
def test_an_unsandboxed_unit_fails_the_exposure_check(unit_root):
    plain = "\n".join(
        line
        for line in UNIT_PATHS["helix-monitor-s.service"].read_text().splitlines()
        if not line.startswith(
            (
                "Protect",
                "Private",
                "Restrict",
                "SystemCall",
                "Capability",
                "NoNewPrivileges",
                "LockPersonality",
                "DevicePolicy",
            )
        )
    )
    verify(unit_root, {"helix-monitor-s.service": plain})
    assert security(unit_root, "helix-monitor-s.service").returncode != 0


# ---------------------------------------------------------------------------------------------
# What the units must say (what systemd-analyze cannot know).


@pytest.mark.parametrize("name", list(UNIT_PATHS))
def test_every_unit_runs_from_the_venv_as_helix_and_stops_gracefully(name):
    u = unit(name)
    svc = u["Service"]
    assert one(svc, "ExecStart").startswith(f"{VENV_PYTHON} -m ")
    assert one(svc, "User") == "helix" and one(svc, "Group") == "helix"
    assert one(svc, "Restart") == "on-failure"
    assert float(one(svc, "RestartSec")) >= 1  # never a hot loop
    assert int(one(u["Unit"], "StartLimitBurst")) >= 1 and int(one(u["Unit"], "StartLimitIntervalSec")) > 0
    assert one(svc, "KillSignal") == "SIGTERM"
    assert 5 <= int(one(svc, "TimeoutStopSec")) <= 120
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp"):
        assert one(svc, key) == "yes", key
    assert one(svc, "ProtectSystem") == "strict"
    # The manager units tell systemd when they are ready and ping its watchdog (below).
    assert one(svc, "Type") == ("notify" if name in MANAGER_UNITS else "exec")
    assert one(u["Install"], "WantedBy") == "multi-user.target"
    assert "PYTHONPATH=/opt/helix" in words(svc, "Environment")


@pytest.mark.parametrize("name", MANAGER_UNITS + AGENT_UNITS)
def test_helix_units_read_the_env_file_and_nothing_else(name):
    svc = unit(name)["Service"]
    assert one(svc, "EnvironmentFile") == "/etc/helix/helix.env"  # no '-': a missing file is an error
    assert "HELIX_ENV_FILE=" in words(svc, "Environment")  # the loader reads no stray ./.env
    # Bad configuration exits 2 (shared.config.EXIT_BAD_CONFIG): restarting would only loop.
    from shared.config import EXIT_BAD_CONFIG

    assert one(svc, "RestartPreventExitStatus") == str(EXIT_BAD_CONFIG)
    # Defaults the units set must be settings the loader knows (an unknown HELIX_ key is fatal).
    from shared.config import OTHER_KEYS, settings

    known = {s.key for s in settings()} | OTHER_KEYS
    for word in words(svc, "Environment"):
        key = word.split("=", 1)[0]
        if key.startswith("HELIX_"):
            assert key in known, key


def test_manager_units_share_the_table():
    units = {name: unit(name)["Service"] for name in MANAGER_UNITS}
    users = {one(svc, "User") for svc in units.values()}
    assert len(users) == 1, "the table and its lock are mode 0600: both must run as one user"
    for name, svc in units.items():
        # Each of these would give the unit its own /dev/shm, or delete the table at stop.
        for key in (
            "PrivateIPC",
            "PrivateDevices",
            "TemporaryFileSystem",
            "InaccessiblePaths",
            "PrivateUsers",
            "RootDirectory",
            "RootImage",
            "DynamicUser",
        ):
            assert key not in svc, f"{name}: {key}= would hide the shared /dev/shm or its owner"
        assert one(svc, "RemoveIPC") == "no", name
        assert "/dev/shm" in words(svc, "ReadWritePaths"), name
        assert one(svc, "StateDirectory") == "helix", name
        assert one(svc, "WorkingDirectory") == "/var/lib/helix", name
        assert "HELIX_STATE_DIR=/var/lib/helix" in words(svc, "Environment"), name  # as helix.env.example says
    assert {one(svc, "ExecStart").split()[-1] for svc in units.values()} == {"monitor_s", "controller_asg"}


@pytest.mark.parametrize("name, watchdog", [("helix-monitor-s.service", 30), ("helix-controller-asg.service", 90)])
def test_manager_units_are_notify_with_a_watchdog(name, watchdog):
    """READY=1 from the main process only (shared/sdnotify.py), and a watchdog with margin: a ping
    goes out at most every WatchdogSec/2, after each poll cycle or control step (tests/test_watchdog.py)."""
    from shared.config import Config

    svc = unit(name)["Service"]
    assert one(svc, "Type") == "notify"
    assert one(svc, "NotifyAccess") == "main"
    assert int(one(svc, "WatchdogSec")) == watchdog
    # Far above the default interval (a poll cycle's deadline is at most 10 s, a stalled cloud
    # call's attempt 25 s), so only a hung loop misses its pings.
    assert watchdog >= 4 * max(Config().poll_interval, Config().effective_control_interval)
    assert watchdog / 2 > 10
    # A watchdog kill (SIGABRT) is a failure: it must be restarted, and must leave a stack trace.
    assert one(svc, "Restart") == "on-failure"
    assert "PYTHONFAULTHANDLER=1" in words(svc, "Environment")
    assert "WatchdogSignal" not in svc  # SIGABRT, the default: the fault handler's trigger
    start = one(svc, "TimeoutStartSec")
    if name == "helix-controller-asg.service":
        # READY only after the controller adopted its instances, which may wait for MonitorS's
        # table as long as MonitorS is down: no start timeout (its wait loops ping the watchdog).
        assert start == "infinity"
    else:
        assert 30 <= int(start) <= 300


def test_controller_starts_after_monitor_but_does_not_restart_with_it():
    ctl = unit("helix-controller-asg.service")["Unit"]
    assert "helix-monitor-s.service" in words(ctl, "After")
    assert "helix-monitor-s.service" in words(ctl, "Wants")
    # Requires=/BindsTo=/PartOf= propagate a stop or restart of MonitorS to the controller, which
    # must instead keep running and fail static on the stale table.
    for key in ("Requires", "Requisite", "BindsTo", "PartOf", "PropagatesStopTo", "StopPropagatedFrom"):
        assert "helix-monitor-s.service" not in words(ctl, key), key
    # ... and MonitorS does not depend on the controller at all.
    mon = unit("helix-monitor-s.service")["Unit"]
    assert not any("controller" in w for key in mon for w in words(mon, key))


def test_agent_unit_waits_for_cloud_init_without_deadlocking_runcmd():
    u = unit("helix-monitor-c.service")["Unit"]
    assert "cloud-init.service" in words(u, "After")
    # runcmd (in cloud-final) restarts the agent: ordering after cloud-final would deadlock that job.
    assert "cloud-final.service" not in words(u, "After")
    assert one(u, "ConditionPathExists") == "/etc/helix/helix.env"


def test_exec_start_modules_are_the_projects_packages():
    for name in UNIT_PATHS:
        module = one(unit(name)["Service"], "ExecStart").split()[2]
        assert (Path(ROOT) / module.replace(".", "/")).is_dir() or (
            Path(ROOT) / (module.replace(".", "/") + ".py")
        ).is_file(), module


# ---------------------------------------------------------------------------------------------
# Shell scripts: bash -n and shellcheck on every one of them; deploy/sysdeps.sh's behaviour.


def test_there_are_shell_scripts_to_check():
    names = {os.path.relpath(p, DEPLOY) for p in SHELL_SCRIPTS}
    assert {"sysdeps.sh", "ami/bake.sh"} <= names, names


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: os.path.relpath(p, DEPLOY))
def test_shell_script_parses(script):
    result = subprocess.run(["bash", "-n", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


@needs_shellcheck
@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: os.path.relpath(p, DEPLOY))
def test_shellcheck_is_clean(script):
    result = subprocess.run(
        [SHELLCHECK, "--shell=bash", "--severity=style", "--external-sources", script],
        cwd=os.path.dirname(script),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@needs_shellcheck
def test_shellcheck_catches_an_unquoted_variable(tmp_path):
    bad = tmp_path / "bad.sh"
    bad.write_text("#!/usr/bin/env bash\ndir=$1\nrm -rf $dir/cache\n")
    result = subprocess.run([SHELLCHECK, str(bad)], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "SC2086" in result.stdout


def sysdeps(path: str, *args: str) -> subprocess.CompletedProcess:
    env = {"PATH": path, "HOME": "/nonexistent", "LANG": "C.UTF-8"}
    return subprocess.run(
        ["/bin/bash", str(DEPLOY / "sysdeps.sh"), *args], env=env, capture_output=True, text=True, timeout=60
    )


def test_sysdeps_reports_what_is_missing_on_one_line_and_never_fails(tmp_path):
    # An empty PATH: no tool, and no apt-get either, so nothing can be installed (nothing is tried).
    empty = tmp_path / "empty"
    empty.mkdir()
    for args in ((), ("--check",)):
        result = sysdeps(str(empty), *args)
        assert result.returncode == 0, result.stderr
        lines = result.stdout.strip().splitlines()
        assert len(lines) == 1 and result.stderr == "", result.stdout + result.stderr
        for tool in ("shellcheck", "promtool", "systemd-analyze"):
            assert f"{tool} missing" in lines[0]
        assert "skip" in lines[0] and "sudo bash deploy/sysdeps.sh" in lines[0]


def test_sysdeps_is_silent_when_every_tool_is_present(tmp_path):
    tools = tmp_path / "tools"
    tools.mkdir()
    for tool in ("shellcheck", "promtool", "systemd-analyze"):
        (tools / tool).write_text("#!/bin/sh\nexit 0\n")
        (tools / tool).chmod(0o755)
    result = sysdeps(str(tools))
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


# ---------------------------------------------------------------------------------------------
# The AMI: bake.sh's command line, the Packer template that runs it, and the user data contract.

BAKE = DEPLOY / "ami" / "bake.sh"
PACKER = DEPLOY / "ami" / "helix-app.pkr.hcl"


def bake(*args: str, as_nobody: bool = False, script: Path = BAKE) -> subprocess.CompletedProcess:
    argv = ["bash", str(script), *args]
    if as_nobody:
        argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd="/")


def test_bake_help_describes_the_roles():
    result = bake("--help")
    assert result.returncode == 0
    assert "--role app|manager" in result.stdout and "cloud-init" in result.stdout


@pytest.mark.parametrize(
    "args, names",
    [
        (("--role", "db"), "--role=db"),
        (("--frobnicate",), "--frobnicate"),
        (("--source",), "--source"),
    ],
)
def test_bake_rejects_bad_arguments_in_one_line_before_touching_anything(args, names):
    result = bake(*args)
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1 and names in result.stderr, result.stderr
    assert result.stdout == ""


@pytest.mark.skipif(
    shutil.which("setpriv") is None or os.geteuid() != 0, reason="needs root and setpriv to drop to nobody"
)
def test_bake_refuses_to_run_without_root():
    # nobody may not be able to read the checkout (a clone under /root, any 0700 directory): run a
    # copy of the script from a directory everyone can enter, readable by everyone.
    with tempfile.TemporaryDirectory(prefix="helix-bake-") as public:
        os.chmod(public, 0o755)
        script = Path(public) / BAKE.name
        shutil.copyfile(BAKE, script)
        os.chmod(script, 0o644)
        result = bake("--role", "app", as_nobody=True, script=script)
    assert result.returncode == 1 and "run as root" in result.stderr, result.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="the source check runs after the root check")
def test_bake_checks_its_source_is_a_helix_project(tmp_path):
    result = bake("--no-apt", "--source", str(tmp_path))
    assert result.returncode == 1 and "expected a Helix project" in result.stderr
    assert not os.path.exists("/opt/helix.new")


def test_packer_template_runs_bake_with_arguments_it_accepts():
    text_ = PACKER.read_text()
    assert text_.count("{") == text_.count("}")
    assert re.search(r'source\s+"amazon-ebs"\s+"helix_app"', text_)
    assert 'script          = "${path.root}/bake.sh"' in text_
    assert "sudo env {{ .Vars }} bash {{ .Path }}" in text_
    assert 'imds_support = "v2.0"' in text_  # the agent reads instance metadata with IMDSv2 only
    # Every argument list the template can pass must parse (checked with --help, which exits 0
    # once the options parsed; an unknown option exits 1 before).
    arg_lists = re.findall(r'"(--role app[^"]*)"', text_)
    assert len(arg_lists) == 2, arg_lists
    uploaded = re.search(r'destination = "([^"]+)"', text_).group(1)
    for args in arg_lists:
        assert f"--source {uploaded}" in args
        result = bake(*args.split(), "--help")
        assert result.returncode == 0, result.stderr


def test_user_data_the_ec2_provider_renders_feeds_the_baked_agent(tmp_path):
    """The contract between the EC2 provider and this image: the #cloud-config parses, writes the
    file helix-monitor-c.service reads, restarts that unit, and the agent's loader accepts it."""
    yaml = pytest.importorskip("yaml")
    from dotenv import dotenv_values

    from controller_asg.providers import userdata
    from shared.config import Config, load_config
    from tests.procs import manager_pki

    cfg = Config().replace(provider="ec2", monitor_addr="10.0.0.5:50052", log_level="debug")
    token = 'tok "with" \\ quotes'
    ca_pem = (Path(manager_pki()) / "ca.crt").read_text()
    text_ = userdata.render_user_data(cfg, token, {"zone": "us-east-1a", "group": "helix"}, ca_pem)
    assert text_.startswith("#cloud-config\n")
    doc = yaml.safe_load(text_)

    agent_unit = unit("helix-monitor-c.service")
    env_path = one(agent_unit["Service"], "EnvironmentFile")
    files = [f for f in doc["write_files"] if f["path"] == env_path]
    assert len(files) == 1, doc["write_files"]
    assert int(files[0]["permissions"], 8) & 0o077 == 0, "the env file holds the token: root only"

    restarts = [cmd for cmd in doc["runcmd"] if list(cmd[:2]) == ["systemctl", "restart"]]
    assert restarts and all(cmd[2] == "helix-monitor-c.service" for cmd in restarts)
    assert (DEPLOY / "systemd" / restarts[0][2]).is_file()

    # The unit hands the file to the agent's environment (systemd's quoting rules match dotenv's
    # for these double-quoted values); the loader must accept all of it.
    env_file = tmp_path / "helix.env"
    env_file.write_text(files[0]["content"])
    environ = {k: v or "" for k, v in dotenv_values(env_file).items()}
    environ["HELIX_ENV_FILE"] = ""
    # cloud-init writes the CA file too; here it goes where this test may write.
    [ca_file] = [f for f in doc["write_files"] if f["path"] == environ.get("HELIX_TLS_CA")]
    assert ca_file["content"] == ca_pem and int(ca_file["permissions"], 8) == 0o644
    (tmp_path / "ca.crt").write_text(ca_file["content"])
    environ["HELIX_TLS_CA"] = str(tmp_path / "ca.crt")
    agent_cfg = load_config(environ)
    assert agent_cfg.monitor_addr == "10.0.0.5:50052"
    assert agent_cfg.resolved_token() == "" and agent_cfg.identity_document, "no fleet secret in user data"
    assert agent_cfg.effective_tls_mode == "ca", "TLS under the manager CA by default on EC2"
    # A MonitorS without a roster (monitoring only) still hands the agents the token.
    legacy = userdata.render_user_data(cfg.replace(roster="off", tls_mode="off"), token, {})
    legacy_file = tmp_path / "legacy.env"
    legacy_file.write_text(yaml.safe_load(legacy)["write_files"][0]["content"])
    legacy_env = {k: v or "" for k, v in dotenv_values(legacy_file).items()}
    assert load_config({**legacy_env, "HELIX_ENV_FILE": ""}).resolved_token() == token
    assert agent_cfg.labels == {"zone": "us-east-1a", "group": "helix"}
