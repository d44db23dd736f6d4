from __future__ import annotations

import os
import subprocess
import sys

import pytest

from shared.config import Config, ConfigError, load_config, settings
from tests.procs import ROOT, base_env


def load(env: dict[str, str], env_file: str = "") -> Config:
    return load_config({"HELIX_ENV_FILE": env_file, **env})


def errors_of(env: dict[str, str], env_file: str = "") -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(env, env_file)
    return info.value.errors


def test_defaults_load_and_match_the_declaration():
    cfg = load({})
    assert cfg.shm_name == "helix-metrics" and cfg.shm_capacity == 1024
    assert cfg.poll_interval == 1.0 and cfg.effective_control_interval == 1.0
    assert cfg.policy in {"target", "threshold"} or cfg.policy
    assert cfg.effective_health_grace == 30.0
    for info in settings():
        assert info.key.startswith("HELIX_"), info.key
        assert info.doc, f"{info.key} has no documentation"


def test_environment_wins_over_file_and_helix_key_wins_over_alias(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("HELIX_MIN_INSTANCES=2\nHELIX_MAX_INSTANCES=7\nCPU_UPPER_LIMIT=0.8\n")
    cfg = load({"HELIX_MAX_INSTANCES": "9"}, str(env_file))
    assert (cfg.min_instances, cfg.max_instances, cfg.cpu_upper) == (2, 9, 0.8)
    cfg = load({"MIN_INSTANCES": "3", "HELIX_MIN_INSTANCES": "4"})
    assert cfg.min_instances == 4
    # An alias in the environment beats the HELIX_ key in the file: the environment wins.
    cfg = load({"MIN_INSTANCES": "5"}, str(env_file))
    assert cfg.min_instances == 5


def test_seed_env_file_works_unchanged(tmp_path):
    env_file = tmp_path / "seed.env"
    env_file.write_text(
        "AWS_ACCESS_KEY=AKIAEXAMPLE\nAWS_SECRET_KEY=secret\nAWS_SESSION_TOKEN=tok\nREGION=eu-west-1\n"
        "CPU_LOWER_LIMIT=20e-2\nCPU_UPPER_LIMIT=0.75\nMIN_INSTANCES=1\nMAX_INSTANCES=5\n"
    )
    cfg = load({}, str(env_file))
    assert (cfg.aws_access_key, cfg.aws_secret_key, cfg.aws_session_token, cfg.aws_region) == (
        "AKIAEXAMPLE",
        "secret",
        "tok",
        "eu-west-1",
    )
    assert (cfg.cpu_lower, cfg.cpu_upper, cfg.min_instances, cfg.max_instances) == (0.2, 0.75, 1, 5)


def test_every_bad_key_is_reported_at_once_with_key_value_and_expectation():
    errors = errors_of(
        {
            "HELIX_POLL_INTERVAL": "fast",
            "HELIX_MAX_INSTANCES": "-1",
            "HELIX_POLICY": "magic",
            "HELIX_AGENT_LISTEN": "localhost",
            "HELIX_SHM_NAME": "a/b",
        }
    )
    assert len(errors) == 5
    joined = "\n".join(errors)
    for needle in (
        "HELIX_POLL_INTERVAL=fast: expected a number",
        "HELIX_MAX_INSTANCES=-1: expected an integer from 1",
        "HELIX_POLICY=magic: expected one of",
        "HELIX_AGENT_LISTEN=localhost: expected host:port",
        "HELIX_SHM_NAME=a/b: expected a segment name",
    ):
        assert needle in joined
    assert all("\n" not in e for e in errors)


@pytest.mark.parametrize(
    "env, needle",
    [
        (
            {"HELIX_MIN_INSTANCES": "5", "HELIX_MAX_INSTANCES": "3"},
            "HELIX_MIN_INSTANCES=5: expected at most HELIX_MAX_INSTANCES=3",
        ),
        (
            {"HELIX_CPU_LOWER": "0.7", "HELIX_CPU_UPPER": "0.7"},
            "HELIX_CPU_LOWER=0.7: expected less than HELIX_CPU_UPPER=0.7",
        ),
        ({"HELIX_MAX_UNHEALTHY_FRACTION": "1.5"}, "HELIX_MAX_UNHEALTHY_FRACTION=1.5: expected a number from 0 to 1"),
        ({"HELIX_CPU_TARGET": "0"}, "HELIX_CPU_TARGET=0: expected a number greater than 0 to 1"),
        (
            {"HELIX_TOKEN": "x", "HELIX_TOKEN_FILE": "/etc/hostname"},
            "expected only one of HELIX_TOKEN and HELIX_TOKEN_FILE",
        ),
        ({"HELIX_TOKEN_FILE": "/nonexistent/token"}, "HELIX_TOKEN_FILE=/nonexistent/token: expected a readable file"),
        ({"HELIX_PROVIDER": "ec2"}, "HELIX_PROVIDER=ec2: expected HELIX_EC2_LAUNCH_TEMPLATE"),
        (
            {"HELIX_MIN_INSTANCE": "2"},
            "HELIX_MIN_INSTANCE=2: expected a known HELIX_ setting (did you mean HELIX_MIN_INSTANCES?)",
        ),
        ({"HELIX_CPU_SOURCE": "tree:abc"}, "HELIX_CPU_SOURCE=tree:abc: expected 'host', 'tree:<pid>'"),
        ({"HELIX_APP_CHECK": "ftp://x"}, "HELIX_APP_CHECK=ftp://x: expected empty"),
    ],
)
def test_contradictions_and_typos_are_bad(env, needle):
    assert any(needle in e for e in errors_of(env)), errors_of(env)


def test_secrets_are_never_echoed():
    errors = errors_of({"HELIX_AWS_SECRET_KEY": "s" * 300})
    assert errors == ["HELIX_AWS_SECRET_KEY=<hidden, 300 characters>: expected at most 256 characters"]


def test_explicit_env_file_must_exist(tmp_path):
    missing = str(tmp_path / "nope.env")
    assert errors_of({}, missing) == [f"HELIX_ENV_FILE={missing}: expected an existing .env file"]


def test_token_file_first_line(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\nignored\n")
    assert load({"HELIX_TOKEN_FILE": str(token_file)}).resolved_token() == "s3cret"


def test_process_exits_2_listing_every_bad_key_and_touches_nothing(tmp_path):
    before = set(os.listdir("/dev/shm"))
    env = base_env(
        HELIX_MIN_INSTANCES="9",
        HELIX_MAX_INSTANCES="2",
        HELIX_POLL_INTERVAL="-1",
        HELIX_SHM_NAME=f"helix-cfgtest-{os.getpid()}",
    )
    result = subprocess.run(
        [sys.executable, "-m", "shared.config"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "config: bad configuration: HELIX_POLL_INTERVAL=-1: expected a number from 0.05 to 3600 seconds",
        "config: bad configuration: HELIX_MIN_INSTANCES=9: expected at most HELIX_MAX_INSTANCES=2",
    ]
    assert result.stdout == ""
    assert set(os.listdir("/dev/shm")) == before
