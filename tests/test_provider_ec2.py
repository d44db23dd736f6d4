"""The ec2 provider against moto's EC2 server (a real HTTP endpoint started by the tests)."""

from __future__ import annotations

import base64
import logging

import boto3
import pytest
import yaml

from controller_asg.providers import make_provider
from controller_asg.providers.base import LaunchError
from controller_asg.providers.ec2 import GROUP_TAG, OPERATIONS, PROTECTED_TAG, TOKEN_TAG, Ec2Provider, LaunchInDoubt
from shared.config import load_config
from tests.moto_server import CREDENTIALS, REGION, reset_moto  # its fixtures come through conftest.py

TOKEN = "bearer-token-for-tests"
MOTO_AMI = "ami-12c6146b"


@pytest.fixture
def world(moto_endpoint):
    """An empty account with a VPC, two subnets in two zones, a security group and an AMI."""
    reset_moto(moto_endpoint)
    ec2 = boto3.client(
        "ec2",
        endpoint_url=moto_endpoint,
        region_name=REGION,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    vpc = ec2.create_vpc(CidrBlock="10.9.0.0/16")["Vpc"]["VpcId"]
    subnets = [
        ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.9.{i}.0/24", AvailabilityZone=f"{REGION}{z}")["Subnet"]["SubnetId"]
        for i, z in enumerate("ab")
    ]
    sg = ec2.create_security_group(GroupName="helix-test", Description="t", VpcId=vpc)["GroupId"]
    # One of the AMIs moto ships (listing them all takes seconds).
    [ami] = [i["ImageId"] for i in ec2.describe_images(ImageIds=[MOTO_AMI])["Images"]]
    return {"ec2": ec2, "url": moto_endpoint, "subnets": subnets, "sg": sg, "ami": ami}


@pytest.fixture
def providers():
    """Builds providers; at the end checks each called only the operations the IAM policy covers."""
    made: list[Ec2Provider] = []

    def build(world, endpoint=None, **extra):
        environ = {
            "HELIX_ENV_FILE": "",
            "HELIX_PROVIDER": "ec2",
            "HELIX_GROUP": "g1",
            "HELIX_TOKEN": TOKEN,
            "HELIX_MONITOR_ADDR": "10.9.0.5:50052",
            "HELIX_EC2_AMI": world["ami"],
            "HELIX_EC2_SUBNETS": ",".join(world["subnets"]),
            "HELIX_EC2_SECURITY_GROUPS": world["sg"],
            "HELIX_EC2_ENDPOINT_URL": endpoint or world["url"],
            **CREDENTIALS,
            **extra,
        }
        prov = make_provider(load_config(environ))
        assert isinstance(prov, Ec2Provider)
        prov.sleep = lambda s: None  # retries back off for real in production; not here
        made.append(prov)
        return prov

    yield build
    for prov in made:
        prov.close()
        assert prov.operations_called <= set(OPERATIONS), prov.operations_called - set(OPERATIONS)


def all_instances(ec2, states=("pending", "running")) -> list[dict]:
    pages = ec2.get_paginator("describe_instances").paginate(
        Filters=[{"Name": "instance-state-name", "Values": list(states)}]
    )
    return [i for p in pages for r in p["Reservations"] for i in r["Instances"]]


def tags(inst: dict) -> dict:
    return {t["Key"]: t["Value"] for t in inst.get("Tags", [])}


def test_min_instances_launched_tagged_spread_with_user_data(world, providers):
    prov = providers(world)
    launched = prov.launch(3, "boot-1")
    assert len(launched) == 3
    insts = all_instances(world["ec2"])
    assert {i["InstanceId"] for i in insts} == {i.instance_id for i in launched}
    for inst in insts:
        assert tags(inst)[GROUP_TAG] == "g1" and tags(inst)["Name"] == "helix-g1" and tags(inst)[TOKEN_TAG] == "boot-1"
        assert inst["ImageId"] == world["ami"] and inst["InstanceType"] == "t3.micro"
        assert [g["GroupId"] for g in inst["SecurityGroups"]] == [world["sg"]]
    per_subnet = sorted(sum(i["SubnetId"] == s for i in insts) for s in world["subnets"])
    assert per_subnet == [1, 2]
    assert {i.zone for i in launched} == {f"{REGION}a", f"{REGION}b"}

    raw = world["ec2"].describe_instance_attribute(InstanceId=insts[0]["InstanceId"], Attribute="userData")
    doc = yaml.safe_load(base64.b64decode(raw["UserData"]["Value"]))
    env = doc["write_files"][0]["content"]
    assert 'HELIX_MONITOR_ADDR="10.9.0.5:50052"' in env and f'HELIX_TOKEN="{TOKEN}"' in env

    listed = prov.list_instances()
    assert sorted(i.instance_id for i in listed) == sorted(i.instance_id for i in launched)
    assert all(i.address and i.launched_at > 0 for i in listed)


def test_restart_adopts_without_duplicates(world, providers):
    first = providers(world)
    ids = {i.instance_id for i in first.launch(2, "boot")}
    first.close()
    second = providers(world)  # a restarted controller: fresh clients, no memory
    assert {i.instance_id for i in second.list_instances()} == ids
    # ...that retries the launch it was in the middle of
    assert {i.instance_id for i in second.launch(2, "boot")} == ids
    assert len(all_instances(world["ec2"])) == 2
    # a partly done launch only adds what is missing
    assert len(second.launch(3, "boot")) == 3 and len(all_instances(world["ec2"])) == 3


def test_foreign_instances_survive_everything(world, providers):
    ec2 = world["ec2"]
    untagged = ec2.run_instances(ImageId=world["ami"], MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]
    other = ec2.run_instances(
        ImageId=world["ami"],
        MinCount=1,
        MaxCount=1,
        TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": GROUP_TAG, "Value": "other"}]}],
    )["Instances"][0]["InstanceId"]
    prov = providers(world)
    mine = [i.instance_id for i in prov.launch(2, "t")]
    assert sorted(i.instance_id for i in prov.list_instances()) == sorted(mine)
    prov.terminate([untagged, other, mine[0], "i-0123456789abcdef0"])
    states = {
        i["InstanceId"]: i["State"]["Name"]
        for i in all_instances(ec2, ("pending", "running", "shutting-down", "terminated"))
    }
    assert states[untagged] == "running" and states[other] == "running" and states[mine[1]] == "running"
    assert states[mine[0]] in ("shutting-down", "terminated")
    assert [i.instance_id for i in prov.list_instances()] == [mine[1]]
    prov.launch(1, "t2")
    prov.terminate([i.instance_id for i in prov.list_instances()])
    assert prov.list_instances() == []
    running = {i["InstanceId"] for i in all_instances(ec2)}
    assert running == {untagged, other}


def test_terminate_only_what_was_asked_and_protection_tag(world, providers):
    prov = providers(world)
    a, b, c = (i.instance_id for i in prov.launch(3, "t"))
    world["ec2"].create_tags(Resources=[b], Tags=[{"Key": PROTECTED_TAG, "Value": "true"}])
    assert {i.instance_id: i.protected for i in prov.list_instances()} == {a: False, b: True, c: False}
    prov.terminate([c])
    assert {i["InstanceId"] for i in all_instances(world["ec2"])} == {a, b}


def test_launch_retried_after_lost_reply_does_not_double(world, providers, fault_proxy):
    dropped = []

    def drop_first_run(action, params):
        if action == "RunInstances" and not dropped:
            dropped.append(params["ClientToken"])
            return "drop"
        return None

    fault_proxy.rules.append(drop_first_run)
    prov = providers(world, endpoint=fault_proxy.url)
    launched = prov.launch(2, "lost")  # the first RunInstances' reply is lost on the way back
    assert ("RunInstances", "dropped") in fault_proxy.seen
    insts = all_instances(world["ec2"])
    assert len(insts) == 2 and {i["InstanceId"] for i in insts} == {i.instance_id for i in launched}
    # and the controller retrying the whole launch (same token) gets the same instances
    assert {i.instance_id for i in prov.launch(2, "lost")} == {i["InstanceId"] for i in insts}
    assert len(all_instances(world["ec2"])) == 2


def test_launch_lost_twice_then_retried_by_a_restarted_controller(world, providers, fault_proxy):
    # From the first RunInstances on, every reply to this controller is lost (the lookups' too).
    cut = []

    def cut_off(action, params):
        if action == "RunInstances":
            cut.append(action)
        return "drop" if cut else None

    fault_proxy.rules.append(cut_off)
    prov = providers(world, endpoint=fault_proxy.url, HELIX_EC2_SUBNETS=world["subnets"][0])
    with pytest.raises(Exception) as err:
        prov.launch(1, "crash")
    assert not isinstance(err.value, LaunchError)  # in doubt: the controller must retry with this token
    first = all_instances(world["ec2"])
    assert len(first) == 1  # the lost RunInstances did launch one
    later = providers(world)  # restarted, the network is back
    assert [i.instance_id for i in later.launch(1, "crash")] == [first[0]["InstanceId"]]
    assert len(all_instances(world["ec2"])) == 1


def test_lost_requests_leave_the_launch_in_doubt_for_a_retry(world, providers, fault_proxy):
    lose = [True]
    fault_proxy.rules.append(lambda action, params: "lose" if action == "RunInstances" and lose[0] else None)
    prov = providers(world, endpoint=fault_proxy.url)
    with pytest.raises(LaunchInDoubt, match="doubt-1"):
        prov.launch(1, "doubt-1")
    assert fault_proxy.seen.count(("RunInstances", "lost")) == 3 and all_instances(world["ec2"]) == []
    lose[0] = False
    [inst] = prov.launch(1, "doubt-1")  # the controller retries with the same token
    assert [i["InstanceId"] for i in all_instances(world["ec2"])] == [inst.instance_id]


def test_failing_subnet_falls_back_to_another(world, providers, fault_proxy, caplog):
    bad, good = world["subnets"]
    fault_proxy.rules.append(
        lambda action, params: (
            (500, "InsufficientInstanceCapacity", "no t3.micro here")
            if action == "RunInstances" and params.get("SubnetId") == bad
            else None
        )
    )
    prov = providers(world, endpoint=fault_proxy.url)
    with caplog.at_level(logging.WARNING):
        launched = prov.launch(3, "ice")
    assert len(launched) == 3
    insts = all_instances(world["ec2"])
    assert len(insts) == 3 and {i["SubnetId"] for i in insts} == {good}
    assert ("RunInstances", "InsufficientInstanceCapacity") in fault_proxy.seen
    assert any(bad in r.getMessage() and "InsufficientInstanceCapacity" in r.getMessage() for r in caplog.records)


def test_every_subnet_failing_raises_and_launches_nothing(world, providers, fault_proxy):
    fault_proxy.rules.append(
        lambda action, params: (
            (500, "InsufficientInstanceCapacity", "none anywhere") if action == "RunInstances" else None
        )
    )
    prov = providers(world, endpoint=fault_proxy.url)
    with pytest.raises(LaunchError, match="every subnet refused") as err:
        prov.launch(2, "ice")
    assert "\n" not in str(err.value)
    assert all_instances(world["ec2"]) == []


def test_launch_template_by_name(world, providers):
    world["ec2"].create_launch_template(
        LaunchTemplateName="helix-app", LaunchTemplateData={"ImageId": world["ami"], "InstanceType": "t3.small"}
    )
    prov = providers(world, HELIX_EC2_LAUNCH_TEMPLATE="helix-app", HELIX_EC2_AMI="", HELIX_EC2_SUBNETS="")
    [inst] = prov.launch(1, "lt")
    [raw] = all_instances(world["ec2"])
    assert raw["InstanceId"] == inst.instance_id and raw["InstanceType"] == "t3.small"
    assert tags(raw)[GROUP_TAG] == "g1"


def test_refused_launch_is_a_one_line_error_without_fallback(world, providers, fault_proxy):
    fault_proxy.rules.append(
        lambda action, params: (403, "UnauthorizedOperation", "not allowed") if action == "RunInstances" else None
    )
    prov = providers(world, endpoint=fault_proxy.url)
    with pytest.raises(LaunchError, match="UnauthorizedOperation") as err:
        prov.launch(2, "denied")
    assert "\n" not in str(err.value)
    assert fault_proxy.seen.count(("RunInstances", "UnauthorizedOperation")) == 1  # not a zone problem: no retry
    assert all_instances(world["ec2"]) == []
