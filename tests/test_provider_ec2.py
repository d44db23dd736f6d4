"""The ec2 provider against moto's EC2 server (a real HTTP endpoint started by the tests)."""

from __future__ import annotations

import base64
import dataclasses
import json
import logging

import pytest
import yaml

from controller_asg.iam import policy_for
from controller_asg.providers import make_provider
from controller_asg.providers.base import LaunchError
from controller_asg.providers.ec2 import (
    GROUP_TAG,
    OPERATIONS,
    POOL_OPERATIONS,
    PROTECTED_TAG,
    TOKEN_TAG,
    Ec2Provider,
    LaunchInDoubt,
)
from shared.config import load_config
from tests.fake_imds import serve_imds
from tests.iam_eval import Request, allowed, denied, ec2_requests
from tests.moto_server import CREDENTIALS, REGION, moto_client, reset_moto  # its fixtures come through conftest.py
from tests.procs import manager_pki

TOKEN = "bearer-token-for-tests"
MOTO_AMI = "ami-12c6146b"
MOTO_AMI_2 = "ami-1b8a7d15"  # another of the AMIs moto ships
MOTO_ACCOUNT = "123456789012"  # the account moto answers as
EVERY_STATE = ("pending", "running", "shutting-down", "stopping", "stopped", "terminated")


@pytest.fixture
def world(moto_endpoint):
    """An empty account with a VPC, two subnets in two zones, a security group and an AMI."""
    reset_moto(moto_endpoint)
    ec2 = moto_client(moto_endpoint, "ec2")
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
    """Builds providers; at the end checks each called only the operations in OPERATIONS, and that
    the policy `python -m controller_asg.iam` generates for its configuration allows every request
    it sent (each IAM request AWS would authorize for it, built from what moto holds)."""
    made: list[tuple[Ec2Provider, dict]] = []

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
            "HELIX_IMDS_URL": "",  # not on EC2 unless a test says so
            "HELIX_PKI_DIR": manager_pki(),
            **CREDENTIALS,
            **extra,
        }
        prov = make_provider(load_config(environ))
        assert isinstance(prov, Ec2Provider)
        prov.sleep = lambda s: None  # retries back off for real in production; not here
        made.append((prov, world))
        return prov

    yield build
    for prov, world in made:
        prov.close()
        allowed_ops = set(OPERATIONS) | set(POOL_OPERATIONS)
        assert prov.operations_called <= allowed_ops, prov.operations_called - allowed_ops
        assert prov.calls and len(prov.calls) < prov.calls.maxlen  # none forgotten
        policy = policy_for(prov.cfg, MOTO_ACCOUNT)
        for call in prov.calls:
            refused = denied(policy, iam_requests(world, call))
            assert not refused, f"{call.operation} {call.params}: the generated policy denies {refused}"


def iam_requests(world, call) -> list[Request]:
    """The IAM requests AWS authorizes for one recorded call, filled in from moto's state."""
    ec2 = world["ec2"]
    everything = all_instances(ec2, EVERY_STATE)

    def template_arn(spec):
        if "LaunchTemplateId" in spec:
            found = ec2.describe_launch_templates(LaunchTemplateIds=[spec["LaunchTemplateId"]])
        else:
            found = ec2.describe_launch_templates(LaunchTemplateNames=[spec["LaunchTemplateName"]])
        [template] = found["LaunchTemplates"]
        return f"arn:aws:ec2:{REGION}:{MOTO_ACCOUNT}:launch-template/{template['LaunchTemplateId']}"

    def role_of(profile):
        name = profile.get("Name") or profile["Arn"].rsplit("/", 1)[1]
        [role] = iam_client(world).get_instance_profile(InstanceProfileName=name)["InstanceProfile"]["Roles"]
        return role["Arn"]

    return ec2_requests(
        call,
        MOTO_ACCOUNT,
        launched=lambda token: [i for i in everything if i.get("ClientToken") == token],
        tags_of=lambda iid: next((tags(i) for i in everything if i["InstanceId"] == iid), {}),
        template_arn=template_arn,
        role_of=role_of,
    )


def iam_client(world):
    return moto_client(world["url"], "iam")


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
    assert 'HELIX_MONITOR_ADDR="10.9.0.5:50052"' in env and 'HELIX_IDENTITY_DOCUMENT="1"' in env
    assert TOKEN not in env and "HELIX_TOKEN" not in env, "no fleet secret in user data"

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


def test_warm_pool_instances_stop_and_start_and_only_ours(world, providers):
    """StopInstances/StartInstances for the warm pool: only instances Helix launched, listed as
    "stopped" while stopped (billed for disks only); the generated policy allows exactly these."""
    ec2 = world["ec2"]
    foreign = ec2.run_instances(ImageId=world["ami"], MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]
    prov = providers(world, HELIX_WARM_POOL_SIZE="1")
    [mine] = [i.instance_id for i in prov.launch(1, "warm")]
    prov.stop([mine, foreign])
    assert [(i.instance_id, i.state) for i in prov.list_instances()] == [(mine, "stopped")]
    states = {
        i["InstanceId"]: i["State"]["Name"] for i in all_instances(ec2, ("pending", "running", "stopping", "stopped"))
    }
    assert states[foreign] == "running", "never someone else's"
    prov.start([mine])
    assert [i.state for i in prov.list_instances()] in (["pending"], ["running"])
    policy = policy_for(prov.cfg, MOTO_ACCOUNT)
    assert {"ec2:StopInstances", "ec2:StartInstances"} <= {s["Action"] for s in policy["Statement"]}
    no_pool = policy_for(prov.cfg.replace(warm_pool_size=0), MOTO_ACCOUNT)
    assert not any("StopInstances" in json.dumps(s) for s in no_pool["Statement"]), "only with a warm pool"


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


# --- ownership: launch evidence and the manager's own instance --------------------------------


@pytest.fixture
def imds():
    """EC2's instance metadata (tests/fake_imds.py). `imds.meta(instance_id=...)` sets what it answers."""
    with serve_imds() as fake:
        yield fake


def run_one(world, tag_pairs, instance_type="t3.micro"):
    """An instance made directly in moto (not by Helix), with these tags."""
    spec = [{"ResourceType": "instance", "Tags": [{"Key": k, "Value": v} for k, v in tag_pairs.items()]}]
    return world["ec2"].run_instances(
        ImageId=world["ami"],
        InstanceType=instance_type,
        MinCount=1,
        MaxCount=1,
        SubnetId=world["subnets"][0],
        **({"TagSpecifications": spec} if tag_pairs else {}),
    )["Instances"][0]["InstanceId"]


def states(world) -> dict[str, str]:
    return {i["InstanceId"]: i["State"]["Name"] for i in all_instances(world["ec2"], EVERY_STATE)}


def terminate_request(world, iid) -> Request:
    [inst] = [i for i in all_instances(world["ec2"], EVERY_STATE) if i["InstanceId"] == iid]
    context = {"aws:RequestedRegion": REGION, **{f"aws:ResourceTag/{k}": v for k, v in tags(inst).items()}}
    return Request("ec2:TerminateInstances", f"arn:aws:ec2:{REGION}:{MOTO_ACCOUNT}:instance/{iid}", context)


def test_only_instances_with_launch_evidence_are_ours_and_never_the_manager(world, providers, imds, caplog):
    untagged = run_one(world, {})
    other = run_one(world, {GROUP_TAG: "g2", TOKEN_TAG: "theirs"})
    # Someone tagged it for our group, but Helix never launched it: no launch token.
    tokenless = run_one(world, {GROUP_TAG: "g1", "Name": "helix-g1"})
    # The manager itself, looking exactly like one of ours (the worst case).
    manager = run_one(world, {GROUP_TAG: "g1", "Name": "helix-g1", TOKEN_TAG: "boot"})
    imds.meta(instance_id=manager)
    prov = providers(world, HELIX_IMDS_URL=imds.url)
    with caplog.at_level(logging.INFO, logger="controller_asg.providers.ec2"):
        [mine] = [i.instance_id for i in prov.launch(1, "boot")]  # the manager's token: still not adopted
        assert [i.instance_id for i in prov.list_instances()] == [mine]
        assert [i.instance_id for i in prov.list_instances()] == [mine]
        prov.terminate([untagged, other, tokenless, manager, mine])
    after = states(world)
    assert after[mine] in ("shutting-down", "terminated")
    assert {after[i] for i in (untagged, other, tokenless, manager)} == {"running"}
    terminated = [c.params["InstanceIds"] for c in prov.calls if c.operation == "TerminateInstances"]
    assert terminated == [[mine]]
    assert imds.requests.count("PUT /latest/api/token") == 1  # learned once
    messages = [r.getMessage() for r in caplog.records]
    assert sum(f"ignoring {tokenless}" in m for m in messages) == 1  # once per id, however often listed
    assert sum(f"ignoring {manager}" in m for m in messages) == 1
    assert any(f"manager instance is {manager}" in m for m in messages)

    def refusal(iid):
        [line] = [m for m in messages if m.startswith("terminate refused for") and iid in m]
        return line

    assert "manager's own instance" in refusal(manager)
    assert "no evidence Helix launched it" in refusal(tokenless) and TOKEN_TAG in refusal(tokenless)
    assert "not an instance of group g1" in refusal(untagged) and "not an instance of group g1" in refusal(other)

    # The policy alone refuses the foreign, the other group's and the token-less instance (AWS
    # would answer UnauthorizedOperation); it cannot tell the manager from one of ours: there the
    # provider's own refusal above is the guard.
    policy = policy_for(prov.cfg, MOTO_ACCOUNT)
    assert allowed(policy, terminate_request(world, mine))
    for iid in (untagged, other, tokenless):
        assert not allowed(policy, terminate_request(world, iid)), iid
    assert allowed(policy, terminate_request(world, manager))


def test_manager_id_from_the_setting_and_no_metadata_means_not_on_ec2(world, providers, imds):
    manager = run_one(world, {GROUP_TAG: "g1", "Name": "helix-g1", TOKEN_TAG: "old"})
    imds.meta(instance_id="i-0somebodyelse")
    prov = providers(world, HELIX_IMDS_URL=imds.url, HELIX_EC2_MANAGER_INSTANCE_ID=manager)
    assert prov.list_instances() == []
    prov.terminate([manager])
    assert states(world)[manager] == "running" and imds.requests == []  # the setting wins: IMDS not asked
    # Metadata that does not answer: not on EC2, so nothing is the manager.
    imds.answers.clear()
    elsewhere = providers(world, HELIX_IMDS_URL=imds.url)
    assert elsewhere.manager_instance_id() == "" and [i.instance_id for i in elsewhere.list_instances()] == [manager]
    elsewhere.terminate([manager])
    assert states(world)[manager] in ("shutting-down", "terminated")


# --- the generated IAM policy against real calls -----------------------------------------------


def test_generated_policy_allows_the_real_launch_and_nothing_next_to_it(world, providers):
    ec2 = world["ec2"]
    ec2.create_key_pair(KeyName="ops")
    vpc = ec2.describe_subnets(SubnetIds=world["subnets"][:1])["Subnets"][0]["VpcId"]
    stray_subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.9.7.0/24")["Subnet"]["SubnetId"]
    stray_sg = ec2.create_security_group(GroupName="not-helix", Description="t", VpcId=vpc)["GroupId"]
    prov = providers(world, HELIX_EC2_KEY_NAME="ops", HELIX_EC2_SUBNETS=world["subnets"][0])
    prov.launch(1, "real")
    [run] = [c for c in prov.calls if c.operation == "RunInstances"]
    policy = policy_for(prov.cfg, MOTO_ACCOUNT)
    assert denied(policy, iam_requests(world, run)) == []  # (the fixture checks every call too)

    def refused(**changes):
        """The resources (kind/name) the policy refuses once the real call is changed so."""
        region = changes.pop("region", run.region)
        call = dataclasses.replace(run, params={**run.params, **changes}, region=region)
        return sorted(r.resource.split(":", 5)[5] for r in denied(policy, iam_requests(world, call)))

    def with_tags(**instance_tags):
        spec = [{"ResourceType": "instance", "Tags": [{"Key": k, "Value": v} for k, v in instance_tags.items()]}]
        return spec + [s for s in run.params["TagSpecifications"] if s["ResourceType"] != "instance"]

    assert refused(InstanceType="t3.large") == ["instance/*"]
    assert refused(ImageId=MOTO_AMI_2) == [f"image/{MOTO_AMI_2}"]
    assert refused(SubnetId=stray_subnet) == [f"subnet/{stray_subnet}"]
    assert refused(SubnetId=world["subnets"][1]) == [f"subnet/{world['subnets'][1]}"]  # not configured here
    assert refused(SecurityGroupIds=[world["sg"], stray_sg]) == [f"security-group/{stray_sg}"]
    assert refused(KeyName="someone-elses") == ["key-pair/someone-elses"]
    # Another region: every regional resource, and the request itself, is out.
    assert len(refused(region="us-west-2")) == len(iam_requests(world, run))
    # Instances only with this group's tag and a launch token, and no tag keys Helix does not set.
    assert refused(TagSpecifications=with_tags(**{GROUP_TAG: "g2", TOKEN_TAG: "t"})) == ["instance/*"]
    assert refused(TagSpecifications=with_tags(**{GROUP_TAG: "g1"})) == ["instance/*"]
    assert refused(TagSpecifications=with_tags(**{GROUP_TAG: "g1", TOKEN_TAG: "t", "owner": "x"})) == ["instance/*"]


def test_launch_with_an_instance_profile_passes_exactly_its_role(world, providers):
    iam = iam_client(world)
    role = iam.create_role(RoleName="helix-app", AssumeRolePolicyDocument="{}")["Role"]["Arn"]
    other = iam.create_role(RoleName="admin", AssumeRolePolicyDocument="{}")["Role"]["Arn"]
    iam.create_instance_profile(InstanceProfileName="helix-app-profile")
    iam.add_role_to_instance_profile(InstanceProfileName="helix-app-profile", RoleName="helix-app")
    prov = providers(world, HELIX_EC2_INSTANCE_PROFILE="helix-app-profile", HELIX_EC2_ROLE_ARN=role)
    prov.launch(1, "with-role")
    [run] = [c for c in prov.calls if c.operation == "RunInstances"]
    [passed] = [r for r in iam_requests(world, run) if r.action == "iam:PassRole"]
    assert passed.resource == role
    policy = policy_for(prov.cfg, MOTO_ACCOUNT)
    assert allowed(policy, passed)  # (and the fixture checks the whole call)
    assert not allowed(policy, dataclasses.replace(passed, resource=other))
    assert not allowed(policy, dataclasses.replace(passed, context={"iam:PassedToService": "lambda.amazonaws.com"}))
