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
            "HELIX_MIN_INSTANCE=<hidden, 1 characters>: expected a known HELIX_ setting "
            "(did you mean HELIX_MIN_INSTANCES?)",
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
    token_file.chmod(0o600)
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
    created = set(os.listdir("/dev/shm")) - before  # (other processes on the machine may come and go)
    assert not any(n.startswith(f"helix-cfgtest-{os.getpid()}") for n in created), created


# -- secrets stay secret ------------------------------------------------------------------------


def private(path, text: str, mode: int = 0o600) -> str:
    path.write_text(text)
    path.chmod(mode)
    return str(path)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o620, 0o602, 0o700 | 0o004])
@pytest.mark.parametrize(
    "key", ["HELIX_TOKEN_FILE", "HELIX_TLS_KEY", "HELIX_METRICS_TLS_KEY", "HELIX_METRICS_BASIC_AUTH_FILE"]
)
def test_secret_files_others_can_read_or_write_are_refused(tmp_path, key, mode):
    path = private(tmp_path / "secret", "user:a-long-password\n", mode)
    env = {key: path}
    if key == "HELIX_TLS_KEY":
        env["HELIX_TLS_CERT"] = private(tmp_path / "cert.pem", "cert", 0o644)
    if key == "HELIX_METRICS_TLS_KEY":
        env["HELIX_METRICS_TLS_CERT"] = private(tmp_path / "cert.pem", "cert", 0o644)
    assert errors_of(env) == [f"{key}={path}: expected a file only its owner can read (mode {mode:04o}; chmod 600 it)"]


@pytest.mark.parametrize("key", ["HELIX_TOKEN_FILE", "HELIX_METRICS_BASIC_AUTH_FILE"])
def test_secret_files_must_be_regular_files(tmp_path, key):
    folder = tmp_path / "dir"
    folder.mkdir(mode=0o700)
    assert errors_of({key: str(folder)}) == [f"{key}={folder}: expected a regular file"]


def test_owner_only_secret_files_are_accepted(tmp_path):
    token = private(tmp_path / "token", "tok-0123456789\n", 0o400)
    auth = private(tmp_path / "auth", "prom:a-long-password\n")
    cfg = load({"HELIX_TOKEN_FILE": token, "HELIX_METRICS_BASIC_AUTH_FILE": auth})
    assert cfg.resolved_token() == "tok-0123456789"
    assert cfg.metrics_basic_auth() == ("prom", "a-long-password")


def test_unknown_keys_never_echo_their_value():
    errors = errors_of({"HELIX_TOKN": "s3cr3t-value"})
    assert errors == ["HELIX_TOKN=<hidden, 12 characters>: expected a known HELIX_ setting (did you mean HELIX_TOKEN?)"]


def test_misspelt_secret_is_never_printed_by_a_process(tmp_path):
    """`python -m shared.config` and `python -m monitor_s` both stop with exit 2, and neither the
    misspelt key's value nor a malformed .env line (both may be secrets) is anywhere in their output."""
    before = set(os.listdir("/dev/shm"))
    env_file = tmp_path / "helix.env"
    env_file.write_text('HELIX_LOG_LEVEL=info\nHELIX_TOKEN_FILE "hunter2-env-secret\n')
    env = base_env(HELIX_TOKN="s3cr3t-value", HELIX_SHM_NAME=f"helix-cfgtest-{os.getpid()}")
    for argv in (["-m", "shared.config"], ["-m", "monitor_s"]):
        for extra in ({}, {"HELIX_ENV_FILE": str(env_file)}):
            result = subprocess.run(
                [sys.executable, *argv], env={**env, **extra}, cwd=ROOT, capture_output=True, text=True, timeout=60
            )
            output = result.stdout + result.stderr
            assert result.returncode == 2, output
            assert "HELIX_TOKN=<hidden, 12 characters>: expected a known HELIX_ setting" in output
            assert "s3cr3t" not in output and "hunter2" not in output, output
            if extra:
                assert f"HELIX_ENV_FILE={env_file}: line 2: expected KEY=VALUE" in output
    # Only this test's segment is looked for: other processes on the machine may come and go.
    created = set(os.listdir("/dev/shm")) - before
    assert not any(n.startswith(f"helix-cfgtest-{os.getpid()}") for n in created), created


# -- the .env file ------------------------------------------------------------------------------


def test_env_file_accepts_what_dotenv_accepts(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text(
        "# a comment\n"
        "\n"
        "HELIX_MIN_INSTANCES=2\n"
        "export HELIX_MAX_INSTANCES=7\n"
        'HELIX_GROUP="my fleet" # trailing comment\n'
        "HELIX_LOCAL_HOST='127.0.0.1'\n"
        "   HELIX_LOG_LEVEL = debug\n"
        "HELIX_LABELS=zone=z1,app=web\n"
    )
    cfg = load({}, str(env_file))
    assert (cfg.min_instances, cfg.max_instances, cfg.group_name, cfg.local_host) == (2, 7, "my fleet", "127.0.0.1")
    assert cfg.log_level == "debug" and cfg.labels == {"zone": "z1", "app": "web"}


@pytest.mark.parametrize(
    "content, lines",
    [
        ("HELIX_MIN_INSTANCES=2\nHELIX_TOKEN secret-token-value\n", [2]),  # no '='
        ("HELIX_TOKEN\n", [1]),  # a key alone
        ('HELIX_TOKEN="secret-token-value\nHELIX_MIN_INSTANCES=1\n', [1]),  # a quote never closed
        ("# ok\n\n=secret-token-value\nHELIX_MIN_INSTANCES=1\nbad key=secret-token-value\n", [3, 5]),
        ("HELIX_TOKEN='secret-token-value' junk\n", [1]),
    ],
)
def test_malformed_env_lines_are_errors_that_never_show_the_line(tmp_path, content, lines):
    env_file = tmp_path / ".env"
    env_file.write_text(content)
    errors = errors_of({}, str(env_file))
    assert errors == [
        f"HELIX_ENV_FILE={env_file}: line {n}: expected KEY=VALUE, export KEY=VALUE, a # comment or a blank line "
        "(the line is not shown: it may hold a secret)"
        for n in lines
    ]
    assert not any("secret-token-value" in e for e in errors)


# -- the Prometheus endpoint --------------------------------------------------------------------


def test_metrics_listen_defaults_to_loopback_and_can_be_turned_off():
    assert load({}).effective_metrics_listen == "127.0.0.1:9464"
    assert load({"HELIX_METRICS_LISTEN": "0.0.0.0:9100"}).effective_metrics_listen == "0.0.0.0:9100"
    assert load({"HELIX_METRICS_LISTEN": "[::1]:9100"}).effective_metrics_listen == "[::1]:9100"
    for off in ("", "0", "off", " OFF "):
        assert load({"HELIX_METRICS_LISTEN": off}).effective_metrics_listen == "", off


def test_deprecated_metrics_port_means_loopback_and_conflicts_with_listen():
    assert load({"HELIX_METRICS_PORT": "9100"}).effective_metrics_listen == "127.0.0.1:9100"
    assert load({"HELIX_METRICS_PORT": "0"}).effective_metrics_listen == ""
    assert load({"HELIX_METRICS_PORT": ""}).effective_metrics_listen == "127.0.0.1:9464"  # not given
    for listen in ("127.0.0.1:9464", ""):  # even the default, even off: one key says it
        assert errors_of({"HELIX_METRICS_PORT": "9100", "HELIX_METRICS_LISTEN": listen}) == [
            "HELIX_METRICS_PORT=9100: expected only one of HELIX_METRICS_LISTEN and the deprecated "
            "HELIX_METRICS_PORT to be set"
        ]


@pytest.mark.parametrize(
    "env, error",
    [
        (
            {"HELIX_METRICS_LISTEN": "9464"},
            "HELIX_METRICS_LISTEN=9464: expected host:port with a port from 1 to 65535 (IPv6 as [addr]:port), "
            "or empty, 0 or off",
        ),
        ({"HELIX_METRICS_PORT": "http"}, "HELIX_METRICS_PORT=http: expected an integer from 0 to 65535, or empty"),
        (
            {"HELIX_METRICS_TLS_CERT": "/etc/hostname"},
            "HELIX_METRICS_TLS_KEY=: expected HELIX_METRICS_TLS_CERT and HELIX_METRICS_TLS_KEY to be set together",
        ),
        (
            {"HELIX_METRICS_BASIC_AUTH_FILE": "/nonexistent/auth"},
            "HELIX_METRICS_BASIC_AUTH_FILE=/nonexistent/auth: expected a readable file (No such file or directory)",
        ),
    ],
)
def test_bad_metrics_settings(env, error):
    assert errors_of(env) == [error]


@pytest.mark.parametrize(
    "content", ["", "\n", "prom\n", "prom:short\n", ":a-long-password\n", "prom:a-long\x07password\n"]
)
def test_basic_auth_file_needs_user_and_a_long_password_and_is_never_shown(tmp_path, content):
    path = private(tmp_path / "auth", content)
    assert errors_of({"HELIX_METRICS_BASIC_AUTH_FILE": path}) == [
        f"HELIX_METRICS_BASIC_AUTH_FILE={path}: expected a file whose first line is user:password, the password "
        "at least 8 printable characters"
    ]


def test_metrics_tls_pair_must_load(tmp_path):
    from tests.test_monitor_e2e import self_signed_tls

    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    cert, key = self_signed_tls(one)
    _, other_key = self_signed_tls(two)
    cfg = load({"HELIX_METRICS_TLS_CERT": cert, "HELIX_METRICS_TLS_KEY": key})
    assert (cfg.metrics_tls_cert, cfg.metrics_tls_key) == (cert, key)
    (error,) = errors_of({"HELIX_METRICS_TLS_CERT": cert, "HELIX_METRICS_TLS_KEY": other_key})
    assert error.startswith(
        f"HELIX_METRICS_TLS_CERT={cert}: expected a PEM certificate whose key is the unencrypted PEM key in "
        "HELIX_METRICS_TLS_KEY ("
    )
    not_pem = private(tmp_path / "key.pem", "not a key\n")
    (error,) = errors_of({"HELIX_METRICS_TLS_CERT": cert, "HELIX_METRICS_TLS_KEY": not_pem})
    assert error.startswith(f"HELIX_METRICS_TLS_CERT={cert}: expected a PEM certificate")
