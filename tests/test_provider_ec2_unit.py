"""The ec2 provider's call order and pending instances (a stubbed botocore client: moto starts
instances `running` at once), its user data, and the IAM policy that must allow what it calls."""

from __future__ import annotations

import base64
import datetime as dt
import fnmatch
import json
import os

import boto3
import pytest
import yaml
from botocore.stub import ANY, Stubber

from controller_asg.providers.ec2 import GROUP_TAG, OPERATIONS, TOKEN_TAG, Ec2Provider
from controller_asg.providers.userdata import AGENT_UNIT, ENV_PATH, render_user_data
from shared.config import load_config
from tests.procs import ROOT

GROUP_FILTER = {"Name": f"tag:{GROUP_TAG}", "Values": ["g1"]}
NOW = dt.datetime(2026, 11, 26, 12, 0, tzinfo=dt.UTC)


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
        "Tags": [{"Key": k, "Value": v} for k, v in (tags if tags is not None else {GROUP_TAG: "g1"}).items()],
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
    assert tags == {GROUP_TAG: "g1", "Name": "helix-g1", TOKEN_TAG: "t-2"}
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
                    instance("i-x", "running", tags={GROUP_TAG: "other"}),
                    instance("i-y", "running", tags={}),
                    instance("i-prot", "running", tags={GROUP_TAG: "g1", "helix:protected": "true"}),
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
        "i-stopped": ("running", False),
        "i-prot": ("running", True),
    }


def test_terminate_asks_only_for_owned_ids(stubbed):
    prov, stub, _ = stubbed
    stub.add_response(
        "describe_instances",
        {"Reservations": [{"Instances": [instance("i-1", "running")]}]},
        {"Filters": [GROUP_FILTER, {"Name": "instance-id", "Values": ["i-1", "i-foreign"]}]},
    )
    stub.add_response("terminate_instances", {"TerminatingInstances": []}, {"InstanceIds": ["i-1"]})
    prov.terminate(["i-1", "i-foreign", "i-1"])


# --- user data ----------------------------------------------------------------------------------


def test_user_data_is_cloud_config_writing_the_agent_env():
    text = render_user_data(cfg(HELIX_MONITOR_ADDR="10.0.0.5:50052"), 'to"k\\en', {"group": "g1"})
    assert text.startswith("#cloud-config\n")
    doc = yaml.safe_load(text)
    [f] = doc["write_files"]
    assert f["path"] == ENV_PATH and f["permissions"] == "0600" and f["owner"] == "root:root"
    lines = f["content"].splitlines()
    assert 'HELIX_MONITOR_ADDR="10.0.0.5:50052"' in lines
    assert 'HELIX_TOKEN="to\\"k\\\\en"' in lines  # systemd EnvironmentFile quoting
    assert 'HELIX_LABELS="group=g1"' in lines
    assert not any(line.startswith("HELIX_APP_CHECK=") for line in lines)  # none configured
    assert ["systemctl", "restart", AGENT_UNIT] in doc["runcmd"]
    probed = yaml.safe_load(render_user_data(cfg(HELIX_EC2_APP_CHECK="http://127.0.0.1:8080/health"), "t", {}))
    assert 'HELIX_APP_CHECK="http://127.0.0.1:8080/health"' in probed["write_files"][0]["content"].splitlines()


def test_user_data_without_token_runs_the_agent_insecure_and_refuses_newlines():
    doc = yaml.safe_load(render_user_data(cfg(HELIX_TOKEN="", HELIX_INSECURE="1"), "", {"group": "g1"}))
    content = doc["write_files"][0]["content"]
    assert 'HELIX_INSECURE="1"' in content and "HELIX_TOKEN" not in content
    with pytest.raises(ValueError, match="HELIX_TOKEN"):
        render_user_data(cfg(), "a\nb", {"group": "g1"})


# --- IAM policy -------------------------------------------------------------------------------------


def load_policy():
    with open(os.path.join(ROOT, "deploy", "iam-policy.json"), encoding="utf-8") as fh:
        return json.load(fh)


def as_list(value):
    return value if isinstance(value, list) else [value]


def allowing(policy, action):
    return [
        s
        for s in policy["Statement"]
        if s["Effect"] == "Allow" and any(fnmatch.fnmatchcase(action.lower(), a.lower()) for a in as_list(s["Action"]))
    ]


def test_iam_policy_allows_every_operation_the_provider_calls_and_no_more():
    policy = load_policy()
    assert policy["Version"] == "2012-10-17"
    for op in OPERATIONS:
        assert allowing(policy, f"ec2:{op}"), f"ec2:{op} is not allowed by deploy/iam-policy.json"
    actions = {a for s in policy["Statement"] for a in as_list(s["Action"])}
    assert actions == {f"ec2:{op}" for op in OPERATIONS} | {"iam:PassRole"}  # no wildcards, nothing extra
    for s in policy["Statement"]:
        if s["Resource"] == "*":
            assert as_list(s["Action"]) == ["ec2:DescribeInstances"]  # the one API without resource-level rules


def test_iam_policy_conditions_terminate_and_launch_on_the_group_tag():
    policy = load_policy()
    [term] = allowing(policy, "ec2:TerminateInstances")
    assert term["Condition"]["StringEquals"]["ec2:ResourceTag/helix:group"] == "helix"
    on_instances = [
        s for s in allowing(policy, "ec2:RunInstances") if "arn:aws:ec2:*:*:instance/*" in as_list(s["Resource"])
    ]
    assert [s["Condition"]["StringEquals"]["aws:RequestTag/helix:group"] for s in on_instances] == ["helix"]
    allowed_keys = set(on_instances[0]["Condition"]["ForAllValues:StringEquals"]["aws:TagKeys"])
    prov = Ec2Provider.__new__(Ec2Provider)
    # A provider without a client: only the tags of its launch request are under test.
    prov.cfg, prov.group, prov._bearer = cfg(HELIX_GROUP="helix"), "helix", "t"  # noqa: SLF001
    tags = prov._run_params("subnet-a", 1, "tok", 0)["TagSpecifications"]  # noqa: SLF001
    assert {t["Key"] for spec in tags for t in spec["Tags"]} <= allowed_keys
    [tag] = allowing(policy, "ec2:CreateTags")
    assert tag["Condition"]["StringEquals"]["ec2:CreateAction"] == "RunInstances"


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
