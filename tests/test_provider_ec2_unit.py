"""The ec2 provider's call order and pending instances (a stubbed botocore client: moto starts
instances `running` at once), what it counts as its own, what it records, and its user data.
(The IAM policy is tested in tests/test_iam.py and against real calls in tests/test_provider_ec2.py.)"""

from __future__ import annotations

import base64
import datetime as dt
import logging

import boto3
import pytest
import yaml
from botocore.stub import ANY, Stubber

from controller_asg.providers.ec2 import CONFIG_TAG, GROUP_TAG, LAUNCH_TAG_KEYS, TOKEN_TAG, Ec2Provider
from controller_asg.providers.userdata import AGENT_UNIT, CA_PATH, ENV_PATH, render_user_data
from shared.config import load_config
from tests.procs import manager_pki

GROUP_FILTER = {"Name": f"tag:{GROUP_TAG}", "Values": ["g1"]}
NOW = dt.datetime(2026, 11, 26, 12, 0, tzinfo=dt.UTC)
OURS = {GROUP_TAG: "g1", TOKEN_TAG: "t-0"}  # what Helix launched: the group's tag and a launch token


def cfg(**extra):
    return load_config(
        {
            "HELIX_ENV_FILE": "",
            "HELIX_PROVIDER": "ec2",
            "HELIX_GROUP": "g1",
            "HELIX_TOKEN": "tok-12345678",
            "HELIX_EC2_AMI": "ami-1",
            "HELIX_EC2_SUBNETS": "subnet-a,subnet-b",
            "HELIX_AWS_REGION": "us-east-1",
            "HELIX_IMDS_URL": "",  # not on EC2: no metadata lookup
            "HELIX_PKI_DIR": manager_pki(),
            **extra,
        }
    )


def instance(iid, state="pending", subnet="subnet-a", zone="us-east-1a", tags=None):
    return {
        "InstanceId": iid,
        "State": {"Name": state},
        "SubnetId": subnet,
        "Placement": {"AvailabilityZone": zone},
        "LaunchTime": NOW,
        "PrivateIpAddress": "10.0.0.9",
        "Tags": [{"Key": k, "Value": v} for k, v in (tags if tags is not None else OURS).items()],
    }


@pytest.fixture
def stubbed():
    client = boto3.client("ec2", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
    sleeps: list[float] = []
    with Stubber(client) as stub:
        # One client for both roles, so the stubber checks the order of every call.
        prov = Ec2Provider(cfg(), client=client, launch_client=client, sleep=sleeps.append)
        yield prov, stub, sleeps
        stub.assert_no_pending_responses()


def run_params(subnet):
    return {
        "MinCount": 1,
        "MaxCount": 1,
        "ClientToken": ANY,
        "UserData": ANY,
        "TagSpecifications": ANY,
        "ImageId": "ami-1",
        "InstanceType": "t3.micro",
        "SubnetId": subnet,
    }


def test_launch_call_order_and_pending_instances(stubbed):
    prov, stub, sleeps = stubbed
    # 1. one lookup: the token's instances and the live ones (subnet-a already has one)
    stub.add_response(
        "describe_instances",
        {"Reservations": [{"Instances": [instance("i-old", "running")]}]},
        {"Filters": [GROUP_FILTER]},
    )
    # 2. the emptier subnet first, then the tie goes to the first configured; 3. nothing after:
    # no waiter for `instance_running`, no describe.
    stub.add_response(
        "run_instances", {"Instances": [instance("i-1", subnet="subnet-b", zone="us-east-1b")]}, run_params("subnet-b")
    )
    stub.add_response("run_instances", {"Instances": [instance("i-2")]}, run_params("subnet-a"))
    got = prov.launch(2, "t-1")
    assert [(i.instance_id, i.state, i.zone) for i in got] == [
        ("i-1", "pending", "us-east-1b"),
        ("i-2", "pending", "us-east-1a"),
    ]
    assert got[0].launched_at == NOW.timestamp() and sleeps == []


def test_run_instances_tags_and_client_token(stubbed):
    prov, stub, _ = stubbed
    seen = {}

    def capture(params, **_):
        seen.update(params)

    prov.client.meta.events.register("before-parameter-build.ec2.RunInstances", capture)
    stub.add_response("describe_instances", {"Reservations": []}, {"Filters": [GROUP_FILTER]})
    stub.add_response("run_instances", {"Instances": [instance("i-1")]}, run_params("subnet-a"))
    prov.launch(1, "t-2")
    tags = {t["Key"]: t["Value"] for t in seen["TagSpecifications"][0]["Tags"]}
    assert tags == {GROUP_TAG: "g1", "Name": "helix-g1", TOKEN_TAG: "t-2", CONFIG_TAG: prov.launch_config().digest}
    assert 1 <= len(seen["ClientToken"]) <= 64 and seen["ClientToken"].isascii()
    # botocore base64-encodes UserData before this hook sees it
    assert yaml.safe_load(base64.b64decode(seen["UserData"]))["write_files"][0]["path"] == ENV_PATH


def test_throttled_launch_looks_up_the_token_before_resending(stubbed):
    prov, stub, sleeps = stubbed
    stub.add_response("describe_instances", {"Reservations": []}, {"Filters": [GROUP_FILTER]})
    stub.add_client_error("run_instances", "RequestLimitExceeded", "slow down", expected_params=run_params("subnet-a"))
    stub.add_response(
        "describe_instances",
        {"Reservations": []},
        {"Filters": [GROUP_FILTER, {"Name": f"tag:{TOKEN_TAG}", "Values": ["t-3"]}]},
    )
    stub.add_response("run_instances", {"Instances": [instance("i-1")]}, run_params("subnet-a"))
    assert [i.instance_id for i in prov.launch(1, "t-3")] == ["i-1"]
    assert len(sleeps) == 1


def test_list_maps_states_and_drops_what_is_not_ours(stubbed):
    prov, stub, _ = stubbed
    reply = {
        "Reservations": [
            {
                "Instances": [
                    instance("i-p", "pending"),
                    instance("i-r", "running"),
                    instance("i-s", "shutting-down"),
                    instance("i-stopped", "stopped"),
                    instance("i-x", "running", tags={GROUP_TAG: "other", TOKEN_TAG: "t-0"}),
                    instance("i-y", "running", tags={}),
                    instance("i-prot", "running", tags={**OURS, "helix:protected": "true"}),
                    instance("i-no-token", "running", tags={GROUP_TAG: "g1", TOKEN_TAG: ""}),
                ]
            }
        ]
    }
    stub.add_response(
        "describe_instances",
        reply,
        {
            "Filters": [
                GROUP_FILTER,
                {
                    "Name": "instance-state-name",
                    "Values": ["pending", "running", "shutting-down", "stopping", "stopped"],
                },
            ]
        },
    )
    got = {i.instance_id: (i.state, i.protected) for i in prov.list_instances()}
    assert got == {
        "i-p": ("pending", False),
        "i-r": ("running", False),
        "i-s": ("terminating", False),
        "i-stopped": ("stopped", False),
        "i-prot": ("running", True),
    }


def test_terminate_asks_only_for_owned_ids(stubbed, caplog):
    prov, stub, _ = stubbed
    stub.add_response(
        "describe_instances",
        {
            "Reservations": [
                {"Instances": [instance("i-1", "running"), instance("i-tagged", "running", tags={GROUP_TAG: "g1"})]}
            ]
        },
        {"Filters": [GROUP_FILTER, {"Name": "instance-id", "Values": ["i-1", "i-foreign", "i-tagged"]}]},
    )
    stub.add_response("terminate_instances", {"TerminatingInstances": []}, {"InstanceIds": ["i-1"]})
    with caplog.at_level(logging.WARNING):
        prov.terminate(["i-1", "i-foreign", "i-1", "i-tagged"])
    lines = [r.getMessage() for r in caplog.records]
    assert "terminate refused for i-foreign: not an instance of group g1" in lines
    assert any(m.startswith("terminate refused for i-tagged:") and TOKEN_TAG in m for m in lines)


def test_the_manager_is_never_listed_nor_terminated(caplog):
    client = boto3.client("ec2", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
    prov = Ec2Provider(cfg(HELIX_EC2_MANAGER_INSTANCE_ID="i-manager"), client=client, launch_client=client)
    with Stubber(client) as stub, caplog.at_level(logging.INFO):
        reply = {"Reservations": [{"Instances": [instance("i-manager", "running"), instance("i-1", "running")]}]}
        stub.add_response("describe_instances", reply)
        assert [i.instance_id for i in prov.list_instances()] == ["i-1"]
        stub.add_response("describe_instances", {"Reservations": [{"Instances": [instance("i-manager", "running")]}]})
        prov.terminate(["i-manager"])  # no terminate_instances call follows: the stubber would fail
        stub.assert_no_pending_responses()
    lines = [r.getMessage() for r in caplog.records]
    assert "terminate refused for i-manager: the manager's own instance" in lines
    assert sum("i-manager" in m and "from HELIX_EC2_MANAGER_INSTANCE_ID" in m for m in lines) == 1


def test_every_request_is_recorded_without_user_data(stubbed):
    prov, stub, _ = stubbed
    stub.add_response("describe_instances", {"Reservations": []}, {"Filters": [GROUP_FILTER]})
    stub.add_response("run_instances", {"Instances": [instance("i-1")]}, run_params("subnet-a"))
    prov.launch(1, "t-4")
    assert [c.operation for c in prov.calls] == ["DescribeInstances", "RunInstances"]
    run = prov.calls[1]
    assert run.region == "us-east-1" and run.params["InstanceType"] == "t3.micro" and "UserData" not in run.params
    assert prov.calls.maxlen and prov.calls.maxlen >= 100  # bounded: the controller runs for months


def test_launch_tags_are_the_ones_the_policy_allows():
    prov = Ec2Provider.__new__(Ec2Provider)
    # A provider without a client: only the tags of its launch request are under test.
    prov.cfg, prov.group, prov._bearer, prov._ca_pem = cfg(), "g1", "t", ca_pem()  # noqa: SLF001
    specs = prov._run_params("subnet-a", 1, "tok", 0, prov.launch_config())["TagSpecifications"]  # noqa: SLF001
    assert {t["Key"] for spec in specs for t in spec["Tags"]} <= set(LAUNCH_TAG_KEYS)
    [instance_tags] = [spec["Tags"] for spec in specs if spec["ResourceType"] == "instance"]
    assert {t["Key"] for t in instance_tags} >= {
        GROUP_TAG,
        TOKEN_TAG,
        CONFIG_TAG,
    }  # ownership, and what a refresh compares


# --- user data ----------------------------------------------------------------------------------


def ca_pem() -> str:
    with open(f"{manager_pki()}/ca.crt", encoding="ascii") as fh:
        return fh.read()


def test_user_data_is_cloud_config_writing_the_agent_env():
    text = render_user_data(
        cfg(HELIX_MONITOR_ADDR="10.0.0.5:50052", HELIX_ROSTER="off"), 'to"k\\en', {"group": "g1"}, ca_pem()
    )
    assert text.startswith("#cloud-config\n")
    doc = yaml.safe_load(text)
    f, ca = doc["write_files"]
    assert f["path"] == ENV_PATH and f["permissions"] == "0600" and f["owner"] == "root:root"
    lines = f["content"].splitlines()
    assert 'HELIX_MONITOR_ADDR="10.0.0.5:50052"' in lines
    assert 'HELIX_TOKEN="to\\"k\\\\en"' in lines  # systemd EnvironmentFile quoting
    assert 'HELIX_LABELS="group=g1"' in lines
    assert not any(line.startswith("HELIX_APP_CHECK=") for line in lines)  # none configured
    assert ["systemctl", "restart", AGENT_UNIT] in doc["runcmd"]
    # TLS under the manager CA by default on EC2: its public certificate, never a key.
    assert 'HELIX_TLS_MODE="ca"' in lines and f'HELIX_TLS_CA="{CA_PATH}"' in lines
    assert ca["path"] == CA_PATH and ca["content"] == ca_pem() and "PRIVATE KEY" not in text
    probed = yaml.safe_load(
        render_user_data(cfg(HELIX_EC2_APP_CHECK="http://127.0.0.1:8080/health"), "t", {}, ca_pem())
    )
    assert 'HELIX_APP_CHECK="http://127.0.0.1:8080/health"' in probed["write_files"][0]["content"].splitlines()
    assert not any(line.startswith(("HELIX_LAUNCH_HOOK=", "HELIX_TERMINATE_HOOK=")) for line in lines)  # none set


def test_user_data_lists_every_managers_monitor():
    """Several managers (HELIX_MONITOR_ADDR lists each MonitorS): the agent is told all of them, in
    one line that its own configuration reads back as the same list."""
    several = cfg(HELIX_MONITOR_ADDR=" 10.0.0.5:50052 , 10.1.0.5:50052,[fd00::7]:50052", HELIX_ROSTER="off")
    content = yaml.safe_load(render_user_data(several, "t", {}, ca_pem()))["write_files"][0]["content"]
    [line] = [line for line in content.splitlines() if line.startswith("HELIX_MONITOR_ADDR=")]
    assert line == 'HELIX_MONITOR_ADDR="10.0.0.5:50052,10.1.0.5:50052,[fd00::7]:50052"'
    agent = load_config({"HELIX_ENV_FILE": "", "HELIX_MONITOR_ADDR": line.partition("=")[2].strip('"')})
    assert agent.monitor_addrs == ("10.0.0.5:50052", "10.1.0.5:50052", "[fd00::7]:50052")


def test_user_data_passes_the_managers_lifecycle_hooks():
    hooked = cfg(
        HELIX_LAUNCH_HOOK="/opt/app/warm-up --quick",
        HELIX_TERMINATE_HOOK="sh -c 'curl -s \"http://127.0.0.1/drain\" && sleep 5'",
    )
    lines = yaml.safe_load(render_user_data(hooked, "t", {}, ca_pem()))["write_files"][0]["content"].splitlines()
    assert 'HELIX_LAUNCH_HOOK="/opt/app/warm-up --quick"' in lines
    # systemd EnvironmentFile quoting: the agent gets the operator's words back exactly
    assert 'HELIX_TERMINATE_HOOK="sh -c \'curl -s \\"http://127.0.0.1/drain\\" && sleep 5\'"' in lines
    only_drain = cfg(HELIX_TERMINATE_HOOK="/opt/app/drain")
    content = yaml.safe_load(render_user_data(only_drain, "t", {}, ca_pem()))["write_files"][0]["content"]
    assert 'HELIX_TERMINATE_HOOK="/opt/app/drain"' in content and "HELIX_LAUNCH_HOOK" not in content
    with pytest.raises(ValueError, match="HELIX_LAUNCH_HOOK: expected a value without newlines"):
        render_user_data(cfg(HELIX_LAUNCH_HOOK="a\nb"), "t", {}, ca_pem())


def test_user_data_without_token_runs_the_agent_insecure_and_refuses_newlines():
    doc = yaml.safe_load(
        render_user_data(cfg(HELIX_TOKEN="", HELIX_INSECURE="1", HELIX_ROSTER="off"), "", {"group": "g1"}, ca_pem())
    )
    content = doc["write_files"][0]["content"]
    assert 'HELIX_INSECURE="1"' in content and "HELIX_TOKEN" not in content
    with pytest.raises(ValueError, match="HELIX_TOKEN"):
        render_user_data(cfg(HELIX_ROSTER="off"), "a\nb", {"group": "g1"}, ca_pem())
    with pytest.raises(ValueError, match="HELIX_TLS_MODE=ca: expected the manager CA"):
        render_user_data(cfg(), "t", {"group": "g1"}, "")
    plain = yaml.safe_load(render_user_data(cfg(HELIX_TLS_MODE="off"), "t", {"group": "g1"}))
    assert [f["path"] for f in plain["write_files"]] == [ENV_PATH]
    assert 'HELIX_TLS_MODE="off"' in plain["write_files"][0]["content"]


def test_user_data_carries_no_fleet_secret_with_the_roster_required():
    """Was: the bearer token in plain text in user data, readable by any process on the instance
    (IMDS) and by anyone allowed ec2:DescribeInstanceAttribute."""
    content = yaml.safe_load(render_user_data(cfg(), "s3cret-fleet-token", {"group": "g1"}, ca_pem()))["write_files"][
        0
    ]["content"]
    assert "s3cret-fleet-token" not in content and 'HELIX_IDENTITY_DOCUMENT="1"' in content


# --- packaging ------------------------------------------------------------------------------------


def test_local_provider_does_not_import_boto3(procs):
    proc = procs.python(
        "import-check",
        [
            "-c",
            (
                "import sys; from controller_asg.providers import make_provider; from shared.config import load_config; "
                "import tempfile; p = make_provider(load_config({'HELIX_ENV_FILE': '', 'HELIX_STATE_DIR': tempfile.mkdtemp()})); "
                "print(p.name, 'boto3' in sys.modules)"
            ),
        ],
    )
    assert proc.wait(60) == 0, proc.output()
    assert proc.output().strip().splitlines()[-1] == "local False"
