"""The least-privilege IAM policy generated from the configuration (`python -m controller_asg.iam`),
the committed deploy/iam-policy.json, and the small evaluator (tests/iam_eval.py) the checks use.
Real calls against the policy: tests/test_provider_ec2.py (EC2) and tests/test_elb.py (target groups)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from controller_asg.external import OPERATIONS as SQS_OPERATIONS
from controller_asg.iam import DEFAULT_POLICY_PATH, PolicyError, default_policy, main, policy_for, render
from controller_asg.lease import CREATE_OPERATIONS as LEASE_CREATE
from controller_asg.lease import OPERATIONS as LEASE_OPS
from controller_asg.providers.ec2 import GROUP_TAG, OPERATIONS, POOL_OPERATIONS, TOKEN_TAG
from controller_asg.providers.elb import OPERATIONS as ELB_OPERATIONS
from shared.config import load_config
from tests.iam_eval import Request, Unsupported, allowed, denied
from tests.procs import ROOT, base_env

ACCOUNT = "111122223333"
REGION = "eu-west-1"
ROLE = f"arn:aws:iam::{ACCOUNT}:role/helix-app"


def target_group(name, region=REGION, account=ACCOUNT, partition="aws"):
    return f"arn:{partition}:elasticloadbalancing:{region}:{account}:targetgroup/{name}/0123456789abcdef"


WEB_TG, ADMIN_TG = target_group("web"), target_group("admin")
QUEUE = f"https://sqs.{REGION}.amazonaws.com/{ACCOUNT}/jobs"


def external(spec, **extra):
    return {"HELIX_EXTERNAL_METRIC": spec, "HELIX_EXTERNAL_TARGET": "100", **extra}


def sqs(queue_arn, action="sqs:GetQueueAttributes", region=REGION):
    return Request(action, queue_arn, {"aws:RequestedRegion": region})


def cfg(**extra):
    return load_config(
        {
            "HELIX_ENV_FILE": "",
            "HELIX_GROUP": "web",
            "HELIX_AWS_REGION": REGION,
            "HELIX_EC2_AMI": "ami-0aaa",
            "HELIX_EC2_INSTANCE_TYPE": "c7g.large",
            "HELIX_EC2_SUBNETS": "subnet-1,subnet-2",
            "HELIX_EC2_SECURITY_GROUPS": "sg-1",
            **extra,
        }
    )


def arn(kind, name, region=REGION, account=ACCOUNT):
    return f"arn:aws:ec2:{region}:{account}:{kind}/{name}"


def launch(
    *,
    region=REGION,
    instance_type="c7g.large",
    image="ami-0aaa",
    subnet="subnet-1",
    groups=("sg-1",),
    key="",
    template="",
    tags=None,
    volume_tags=None,
):
    """The IAM requests of one RunInstances (as tests/iam_eval.py builds them from a real call)."""
    tags = {GROUP_TAG: "web", "Name": "helix-web", TOKEN_TAG: "tok"} if tags is None else tags
    volume_tags = {GROUP_TAG: "web", "Name": "helix-web"} if volume_tags is None else volume_tags
    base = {"aws:RequestedRegion": region, **({"ec2:LaunchTemplate": template} if template else {})}

    def tagged(t):
        return {**{f"aws:RequestTag/{k}": v for k, v in t.items()}, **({"aws:TagKeys": tuple(t)} if t else {})}

    return [
        Request(
            "ec2:RunInstances",
            arn("instance", "*", region),
            {**base, "ec2:InstanceType": instance_type, **tagged(tags)},
        ),
        Request("ec2:RunInstances", arn("volume", "*", region), {**base, **tagged(volume_tags)}),
        Request("ec2:RunInstances", f"arn:aws:ec2:{region}::image/{image}", base),
        Request("ec2:RunInstances", arn("subnet", subnet, region), base),
        Request("ec2:RunInstances", arn("network-interface", "*", region), base),
        *(Request("ec2:RunInstances", arn("security-group", g, region), base) for g in groups),
        *([Request("ec2:RunInstances", arn("key-pair", key, region), base)] if key else []),
        *([Request("ec2:RunInstances", template, base)] if template else []),
        Request(
            "ec2:CreateTags", arn("instance", "*", region), {**base, "ec2:CreateAction": "RunInstances", **tagged(tags)}
        ),
    ]


def refused(policy, requests):
    return [r.resource.split(":", 5)[5] for r in denied(policy, requests)]


def terminate(instance_id, tags, region=REGION):
    context = {"aws:RequestedRegion": region, **{f"aws:ResourceTag/{k}": v for k, v in tags.items()}}
    return Request("ec2:TerminateInstances", arn("instance", instance_id, region), context)


# --- the evaluator itself -----------------------------------------------------------------------


def doc(*statements):
    return {"Version": "2012-10-17", "Statement": list(statements)}


def allow(action="s3:GetObject", resource="*", condition=None, effect="Allow"):
    return {"Effect": effect, "Action": action, "Resource": resource, **({"Condition": condition} if condition else {})}


def test_evaluator_actions_resources_and_deny():
    policy = doc(allow("ec2:Describe*", "*"), allow("ec2:RunInstances", "arn:aws:ec2:*:*:instance/i-?"))
    assert allowed(policy, Request("EC2:describeinstances", "*"))  # actions are case-insensitive
    assert not allowed(policy, Request("ec2:TerminateInstances", "*"))  # implicit deny
    assert allowed(policy, Request("ec2:RunInstances", "arn:aws:ec2:eu-west-1:1:instance/i-1"))
    assert not allowed(
        policy, Request("ec2:RunInstances", "arn:aws:ec2:eu-west-1:1:instance/i-12")
    )  # ? is one character
    assert not allowed(
        policy, Request("ec2:RunInstances", "arn:aws:ec2:eu-west-1:1:Instance/i-1")
    )  # ARNs: case-sensitive
    # The account component must exist: a wildcard in one component never spans a colon.
    assert not allowed(policy, Request("ec2:RunInstances", "arn:aws:ec2:eu-west-1:instance/i-1"))
    assert not allowed(policy, Request("ec2:RunInstances", "arn:aws:ec2:eu-west-1:1:2:instance/i-1"))
    denying = doc(allow("ec2:*", "*"), allow("ec2:TerminateInstances", "*", effect="Deny"))
    assert allowed(denying, Request("ec2:RunInstances", "x")) and not allowed(
        denying, Request("ec2:TerminateInstances", "x")
    )


def test_evaluator_string_conditions():
    policy = doc(
        allow(
            condition={
                "StringEquals": {"aws:RequestedRegion": ["eu-west-1", "eu-west-2"], "ec2:InstanceType": "t3.micro"}
            }
        )
    )
    ok = {"aws:RequestedRegion": "eu-west-2", "ec2:InstanceType": "t3.micro"}
    assert allowed(policy, Request("s3:GetObject", "*", ok))  # values of one key: OR
    assert not allowed(policy, Request("s3:GetObject", "*", {**ok, "ec2:InstanceType": "T3.micro"}))  # case-sensitive
    assert not allowed(
        policy, Request("s3:GetObject", "*", {"aws:RequestedRegion": "eu-west-1"})
    )  # keys: AND; missing: false
    assert allowed(
        policy, Request("s3:GetObject", "*", {"AWS:RequestedRegion": "eu-west-1", "EC2:InstanceType": "t3.micro"})
    )
    like = doc(allow(condition={"StringLike": {"ec2:InstanceType": "t3.*"}}))
    assert allowed(like, Request("s3:GetObject", "*", {"ec2:InstanceType": "t3.nano"}))
    assert not allowed(like, Request("s3:GetObject", "*", {"ec2:InstanceType": "t3a.nano"}))
    exists = doc(allow(condition={"StringEqualsIfExists": {"ec2:InstanceType": "t3.micro"}}))
    assert allowed(exists, Request("s3:GetObject", "*", {}))
    assert not allowed(exists, Request("s3:GetObject", "*", {"ec2:InstanceType": "t3.large"}))


def test_evaluator_multivalued_null_and_arn_conditions():
    keys = doc(allow(condition={"ForAllValues:StringEquals": {"aws:TagKeys": ["a", "b"]}}))
    assert allowed(keys, Request("s3:GetObject", "*", {"aws:TagKeys": ("a",)}))
    assert not allowed(keys, Request("s3:GetObject", "*", {"aws:TagKeys": ("a", "c")}))
    assert allowed(keys, Request("s3:GetObject", "*", {}))  # AWS's pitfall: a missing key satisfies ForAllValues
    any_of = doc(allow(condition={"ForAnyValue:StringEquals": {"aws:TagKeys": ["a"]}}))
    assert allowed(any_of, Request("s3:GetObject", "*", {"aws:TagKeys": ("c", "a")}))
    assert not allowed(any_of, Request("s3:GetObject", "*", {}))
    present = doc(allow(condition={"Null": {"aws:ResourceTag/t": "false"}}))
    assert allowed(present, Request("s3:GetObject", "*", {"aws:ResourceTag/t": "x"}))
    assert not allowed(present, Request("s3:GetObject", "*", {}))
    absent = doc(allow(condition={"Null": {"aws:ResourceTag/t": "true"}}))
    assert allowed(absent, Request("s3:GetObject", "*", {})) and not allowed(
        absent, Request("s3:GetObject", "*", {"aws:ResourceTag/t": ""})
    )
    for operator in ("ArnLike", "ArnEquals"):
        lt = doc(allow(condition={operator: {"ec2:LaunchTemplate": "arn:aws:ec2:*:*:launch-template/lt-1*"}}))
        assert allowed(
            lt, Request("s3:GetObject", "*", {"ec2:LaunchTemplate": "arn:aws:ec2:r:1:launch-template/lt-12"})
        )
        assert not allowed(
            lt, Request("s3:GetObject", "*", {"ec2:LaunchTemplate": "arn:aws:ec2:r:1:launch-template/lt-2"})
        )


def test_evaluator_refuses_what_it_does_not_implement():
    request = Request("s3:GetObject", "*", {"k": "v", "m": ("a",)})
    for policy in (
        doc(allow(condition={"StringNotEquals": {"k": "v"}})),
        doc(allow(condition={"NumericLessThan": {"k": "1"}})),
        doc(allow(condition={"StringEquals": {"m": "a"}})),  # a multivalued key needs a qualifier
        doc(allow(condition={"StringEquals": {"k": "${aws:username}"}})),
        doc({"Effect": "Allow", "NotAction": "s3:*", "Resource": "*"}),
        {"Version": "2008-10-17", "Statement": [allow()]},
    ):
        with pytest.raises(Unsupported):
            allowed(policy, request)


# --- the generated policy -----------------------------------------------------------------------


def test_committed_policy_is_the_generated_one_for_the_defaults(tmp_path):
    with open(DEFAULT_POLICY_PATH, encoding="utf-8") as fh:
        committed = fh.read()
    assert committed == render(default_policy()), (
        "deploy/iam-policy.json is stale: python -m controller_asg.iam --write"
    )
    # and `--write PATH` writes exactly that
    assert main(["--write", str(tmp_path / "p.json")]) == 0
    assert (tmp_path / "p.json").read_text() == committed


def test_policy_allows_only_the_operations_the_provider_calls():
    elb_actions = {f"elasticloadbalancing:{op}" for op in ELB_OPERATIONS}
    sqs_actions = {f"sqs:{op}" for op in SQS_OPERATIONS}
    for config, with_groups, with_queue in (
        (cfg(), False, False),
        (cfg(HELIX_EC2_INSTANCE_PROFILE="p", HELIX_EC2_ROLE_ARN=ROLE), False, False),
        (load_config({"HELIX_ENV_FILE": ""}), False, False),
        (cfg(HELIX_EC2_TARGET_GROUPS=f"{WEB_TG},{ADMIN_TG}"), True, False),
        (cfg(**external(f"sqs:{QUEUE}")), False, True),
        (cfg(**external("command:echo 1")), False, False),  # another kind of metric: nothing about SQS
        (cfg(HELIX_WARM_POOL_SIZE="2"), False, False),
    ):
        policy = policy_for(config, ACCOUNT)
        actions = {s["Action"] for s in policy["Statement"]}
        pool_actions = {f"ec2:{op}" for op in POOL_OPERATIONS}
        # Stop and start only with a warm pool, and then both.
        assert (actions & pool_actions) == (pool_actions if config.warm_pool_size else set())
        # no wildcards, nothing extra
        assert actions <= {f"ec2:{op}" for op in OPERATIONS} | elb_actions | sqs_actions | pool_actions | {
            "iam:PassRole"
        }
        assert {f"ec2:{op}" for op in OPERATIONS} <= actions
        # Target groups only when configured, and then every operation TargetGroups calls.
        assert (actions & elb_actions) == (elb_actions if with_groups else set())
        # The queue only with an sqs: metric, and then every operation the metric calls.
        assert (actions & sqs_actions) == (sqs_actions if with_queue else set())
        assert all(s["Effect"] == "Allow" for s in policy["Statement"])
        # `*` only where EC2 or ELBv2 cannot scope: DescribeInstances, DescribeTargetHealth/Groups
        unscoped = [s["Action"] for s in policy["Statement"] if s["Resource"] == "*"]
        assert unscoped == ["ec2:DescribeInstances"] + (
            ["elasticloadbalancing:DescribeTargetHealth", "elasticloadbalancing:DescribeTargetGroups"]
            if with_groups
            else []
        )
    assert "iam:PassRole" not in json.dumps(policy_for(cfg(), ACCOUNT))  # no profile, no role to pass
    assert "elasticloadbalancing" not in json.dumps(default_policy())  # no groups, no ELB at all


def elb(operation, resource="*", region=REGION):
    return Request(f"elasticloadbalancing:{operation}", resource, {"aws:RequestedRegion": region})


def test_register_only_with_the_configured_target_groups():
    policy = policy_for(cfg(HELIX_EC2_TARGET_GROUPS=f"{WEB_TG},{ADMIN_TG}"), ACCOUNT)
    for operation in ("RegisterTargets", "DeregisterTargets"):
        assert allowed(policy, elb(operation, WEB_TG)) and allowed(policy, elb(operation, ADMIN_TG))
        for other in (
            target_group("other"),  # another group of the account
            WEB_TG.replace("0123456789abcdef", "0123456789abcdee"),  # the same name, another group
            target_group("web", account="999999999999"),
            target_group("web", region="us-east-1"),
        ):
            assert not allowed(policy, elb(operation, other)), (operation, other)
        assert not allowed(policy, elb(operation, WEB_TG, region="us-east-1"))
        assert not allowed(policy, elb(operation, "*"))
    for operation in ("DescribeTargetHealth", "DescribeTargetGroups"):
        assert allowed(policy, elb(operation)) and not allowed(policy, elb(operation, region="us-east-1"))
    # Nothing else about load balancers: no group or listener changes, no other ELB action.
    for operation in ("CreateTargetGroup", "ModifyTargetGroup", "DeleteTargetGroup", "ModifyListener", "AddTags"):
        assert not allowed(policy, elb(operation, WEB_TG)) and not allowed(policy, elb(operation))
    sids = {s["Action"]: s["Sid"] for s in policy["Statement"]}
    assert sids["elasticloadbalancing:DescribeTargetHealth"] == "HelixDescribeTargetHealthAnyResource"
    assert sids["elasticloadbalancing:DescribeTargetGroups"] == "HelixDescribeTargetGroupsAnyResource"
    assert sids["elasticloadbalancing:RegisterTargets"] == "HelixRegisterWithConfiguredTargetGroups"


def test_target_groups_without_a_region_or_account():
    policy = policy_for(cfg(HELIX_AWS_REGION="", HELIX_EC2_TARGET_GROUPS=WEB_TG))  # any account
    sids = {s["Action"]: s["Sid"] for s in policy["Statement"]}
    # The reads are open in every region, and say so; the ARNs still pin the writes.
    assert sids["elasticloadbalancing:DescribeTargetHealth"] == "HelixDescribeTargetHealthAnyResourceAnyRegion"
    assert sids["elasticloadbalancing:RegisterTargets"] == "HelixRegisterWithConfiguredTargetGroups"
    assert allowed(policy, elb("RegisterTargets", WEB_TG)) and not allowed(
        policy, elb("RegisterTargets", target_group("web", region="us-east-1"), region="us-east-1")
    )
    china = target_group("web", region="cn-north-1", partition="aws-cn")
    in_china = policy_for(cfg(HELIX_AWS_REGION="cn-north-1", HELIX_EC2_TARGET_GROUPS=china), ACCOUNT)
    assert allowed(in_china, elb("RegisterTargets", china, region="cn-north-1"))


def test_read_only_the_external_metric_queue():
    policy = policy_for(cfg(**external(f"sqs:{QUEUE}")), ACCOUNT)
    jobs = f"arn:aws:sqs:{REGION}:{ACCOUNT}:jobs"
    assert allowed(policy, sqs(jobs))
    for other in (
        f"arn:aws:sqs:{REGION}:{ACCOUNT}:jobs-dlq",  # another queue of the account
        f"arn:aws:sqs:{REGION}:{ACCOUNT}:job",
        f"arn:aws:sqs:{REGION}:999999999999:jobs",  # the same name in another account
        f"arn:aws:sqs:us-east-1:{ACCOUNT}:jobs",  # or region
        "*",
    ):
        assert not allowed(policy, sqs(other)), other
    # Reading the count only: never a message, never a change to the queue.
    for action in ("sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:SendMessage", "sqs:SetQueueAttributes"):
        assert not allowed(policy, sqs(jobs, action)), action
    statement = next(s for s in policy["Statement"] if s["Action"].startswith("sqs:"))
    assert statement["Sid"] == "HelixReadTheExternalMetricQueue" and statement["Resource"] == [jobs]


def test_external_metric_queue_is_where_its_url_says():
    # A queue in another region than the fleet: its client calls the queue's region (the URL's).
    elsewhere = f"https://sqs.us-east-1.amazonaws.com/{ACCOUNT}/jobs"
    policy = policy_for(cfg(**external(f"sqs:{elsewhere}")), ACCOUNT)
    queue = f"arn:aws:sqs:us-east-1:{ACCOUNT}:jobs"
    assert allowed(policy, sqs(queue, region="us-east-1"))
    assert not allowed(policy, sqs(f"arn:aws:sqs:{REGION}:{ACCOUNT}:jobs"))
    # In another account (its queue policy grants the read): the ARN is that account's, --account or not.
    shared = policy_for(cfg(**external("sqs:https://sqs.eu-west-1.amazonaws.com/999999999999/jobs")), ACCOUNT)
    assert allowed(shared, sqs("arn:aws:sqs:eu-west-1:999999999999:jobs"))
    china = policy_for(
        cfg(HELIX_AWS_REGION="", **external(f"sqs:https://sqs.cn-north-1.amazonaws.com.cn/{ACCOUNT}/q.fifo"))
    )
    assert allowed(china, sqs(f"arn:aws-cn:sqs:cn-north-1:{ACCOUNT}:q.fifo", region="cn-north-1"))
    # A stand-in endpoint's URL names no region: HELIX_AWS_REGION's, else any (and the Sid says so).
    local = f"sqs:http://127.0.0.1:4566/{ACCOUNT}/jobs"
    pinned = policy_for(cfg(HELIX_SQS_ENDPOINT_URL="http://127.0.0.1:4566", **external(local)), ACCOUNT)
    assert allowed(pinned, sqs(f"arn:aws:sqs:{REGION}:{ACCOUNT}:jobs"))
    assert not allowed(pinned, sqs(f"arn:aws:sqs:us-east-1:{ACCOUNT}:jobs", region="us-east-1"))
    anywhere = policy_for(cfg(HELIX_AWS_REGION="", HELIX_SQS_ENDPOINT_URL="http://127.0.0.1:4566", **external(local)))
    assert [s["Sid"] for s in anywhere["Statement"] if s["Action"].startswith("sqs:")] == [
        "HelixReadTheExternalMetricQueueAnyRegion"
    ]
    assert allowed(anywhere, sqs(f"arn:aws:sqs:ap-south-1:{ACCOUNT}:jobs", region="ap-south-1"))
    assert not allowed(anywhere, sqs(f"arn:aws:sqs:ap-south-1:{ACCOUNT}:other", region="ap-south-1"))


def test_configured_launch_is_allowed_and_its_neighbours_are_not():
    policy = policy_for(cfg(HELIX_EC2_KEY_NAME="ops"), ACCOUNT)
    assert denied(policy, launch(key="ops")) == []
    assert denied(policy, launch(subnet="subnet-2", key="ops")) == []
    assert refused(policy, launch(key="ops", instance_type="c7g.16xlarge")) == ["instance/*"]
    assert refused(policy, launch(key="ops", image="ami-0bbb")) == ["image/ami-0bbb"]
    assert refused(policy, launch(key="ops", subnet="subnet-3")) == ["subnet/subnet-3"]
    assert refused(policy, launch(key="ops", groups=("sg-1", "sg-2"))) == ["security-group/sg-2"]
    assert refused(policy, launch(key="other")) == ["key-pair/other"]
    assert refused(policy, launch()) == []  # no key pair at all is fine
    everything = launch(key="ops", region="us-east-1")
    assert len(denied(policy, everything)) == len(everything)  # another region: nothing
    # Another account's resources (the image ARN names no account: AMIs may be shared).
    assert refused(
        policy,
        [
            Request(
                "ec2:RunInstances", arn("subnet", "subnet-1", account="999999999999"), {"aws:RequestedRegion": REGION}
            )
        ],
    ) == ["subnet/subnet-1"]


def test_launch_only_tagged_for_the_group_with_a_token_and_no_other_tag_keys():
    policy = policy_for(cfg(), ACCOUNT)
    ours = {GROUP_TAG: "web", "Name": "helix-web", TOKEN_TAG: "tok"}
    assert refused(policy, launch(tags={**ours, GROUP_TAG: "api"})) == ["instance/*"]
    assert refused(policy, launch(tags={GROUP_TAG: "web", "Name": "helix-web"})) == ["instance/*"]  # no token
    assert refused(policy, launch(tags={**ours, "owner": "me"})) == ["instance/*"]
    assert refused(policy, launch(tags={})) == ["instance/*"]  # untagged
    assert refused(policy, launch(volume_tags={})) == ["volume/*"]
    assert refused(policy, launch(volume_tags={GROUP_TAG: "web", "x": "y"})) == ["volume/*"]
    # Tagging only while launching
    tag_later = Request(
        "ec2:CreateTags",
        arn("instance", "i-1"),
        {"aws:RequestedRegion": REGION, **{f"aws:RequestTag/{k}": v for k, v in ours.items()}},
    )
    assert not allowed(policy, tag_later)


def test_terminate_only_instances_helix_launched_in_the_region():
    policy = policy_for(cfg(), ACCOUNT)
    assert allowed(policy, terminate("i-1", {GROUP_TAG: "web", TOKEN_TAG: "tok"}))
    assert not allowed(policy, terminate("i-1", {}))  # foreign
    assert not allowed(policy, terminate("i-1", {GROUP_TAG: "api", TOKEN_TAG: "tok"}))  # another group
    assert not allowed(policy, terminate("i-1", {GROUP_TAG: "web", "Name": "helix-web"}))  # no launch evidence
    assert not allowed(policy, terminate("i-1", {GROUP_TAG: "web", TOKEN_TAG: "tok"}, region="us-east-1"))
    listing = Request("ec2:DescribeInstances", "*", {"aws:RequestedRegion": REGION})
    assert allowed(policy, listing) and not allowed(
        policy, Request("ec2:DescribeInstances", "*", {"aws:RequestedRegion": "us-east-1"})
    )


def test_launch_template_fixes_the_type_and_is_pinned_by_id():
    template = arn("launch-template", "lt-0abc")
    policy = policy_for(cfg(HELIX_EC2_LAUNCH_TEMPLATE="lt-0abc", HELIX_EC2_AMI="", HELIX_EC2_SUBNETS=""), ACCOUNT)
    # Any type the template says, any subnet/image it names; but only through this template.
    assert denied(policy, launch(template=template, instance_type="m7i.large", image="ami-x", subnet="subnet-9")) == []
    other = arn("launch-template", "lt-0other")
    assert sorted(refused(policy, launch(template=other))) == ["instance/*", "launch-template/lt-0other"]
    assert refused(policy, launch()) == ["instance/*"]  # no template at all: refused too
    sids = [s["Sid"] for s in policy["Statement"]]
    assert "HelixLaunchFromAnyImageAnySubnetAnyKeyPair" in sids  # what the template leaves open, said
    by_name = policy_for(cfg(HELIX_EC2_LAUNCH_TEMPLATE="helix-app"), ACCOUNT)
    assert denied(by_name, launch(template=other)) == []  # a name cannot be pinned (the ARN holds the id)...
    assert any("AnyLaunchTemplate" in s["Sid"] for s in by_name["Statement"])  # ...and the policy says so


def test_pass_role_exactly_the_configured_one_to_ec2_only():
    policy = policy_for(cfg(HELIX_EC2_INSTANCE_PROFILE="helix-app-profile", HELIX_EC2_ROLE_ARN=ROLE), ACCOUNT)
    to_ec2 = {"iam:PassedToService": "ec2.amazonaws.com"}
    assert allowed(policy, Request("iam:PassRole", ROLE, to_ec2))
    assert not allowed(policy, Request("iam:PassRole", f"arn:aws:iam::{ACCOUNT}:role/admin", to_ec2))
    assert not allowed(policy, Request("iam:PassRole", f"arn:aws:iam::{ACCOUNT}:role/helix-app-2", to_ec2))
    assert not allowed(policy, Request("iam:PassRole", ROLE, {"iam:PassedToService": "lambda.amazonaws.com"}))


def test_without_a_region_the_policy_says_any_region():
    policy = policy_for(cfg(HELIX_AWS_REGION=""))
    regional = [s for s in policy["Statement"] if s["Action"] != "iam:PassRole"]
    assert regional and all(s["Sid"].endswith("AnyRegion") for s in regional)
    assert "aws:RequestedRegion" not in json.dumps(policy)
    assert denied(policy, launch(region="ap-south-1")) == []
    cn = policy_for(cfg(HELIX_AWS_REGION="cn-north-1"), ACCOUNT)
    assert "arn:aws-cn:ec2:cn-north-1:" in json.dumps(cn) and "arn:aws:" not in json.dumps(cn)


@pytest.mark.parametrize(
    ("extra", "account", "message"),
    [
        ({}, "12345", "--account=12345: expected a 12-digit AWS account id or *"),
        (
            {"HELIX_EC2_INSTANCE_PROFILE": "p"},
            "*",
            "HELIX_EC2_ROLE_ARN=: expected the ARN of the role in HELIX_EC2_INSTANCE_PROFILE=p",
        ),
        (
            {"HELIX_EC2_ROLE_ARN": ROLE},
            "*",
            f"HELIX_EC2_ROLE_ARN={ROLE}: expected HELIX_EC2_INSTANCE_PROFILE to be set too",
        ),
        (
            {"HELIX_EC2_INSTANCE_PROFILE": "p", "HELIX_EC2_ROLE_ARN": "arn:aws:iam::*:role/*"},
            "*",
            "HELIX_EC2_ROLE_ARN=arn:aws:iam::*:role/*: expected a role ARN",
        ),
        ({"HELIX_EC2_SUBNETS": "subnet-1,subnet-*"}, "*", "HELIX_EC2_SUBNETS=subnet-*: expected subnet ids"),
        ({"HELIX_EC2_AMI": "ami-*"}, "*", "HELIX_EC2_AMI=ami-*: expected an AMI id"),
        ({"HELIX_EC2_INSTANCE_TYPE": "t3.*"}, "*", "HELIX_EC2_INSTANCE_TYPE=t3.*: expected an instance type"),
        ({"HELIX_GROUP": "${aws:username}"}, "*", "HELIX_GROUP=${aws:username}: expected 1 to 128 letters"),
        ({"HELIX_AWS_REGION": "*"}, "*", "HELIX_AWS_REGION=*: expected a region name"),
        (
            {"HELIX_EC2_TARGET_GROUPS": f"{WEB_TG},{target_group('admin', region='us-east-1')}"},
            "*",
            f"HELIX_EC2_TARGET_GROUPS={target_group('admin', region='us-east-1')}: expected a target group in "
            f"HELIX_AWS_REGION={REGION}",
        ),
        (
            {"HELIX_AWS_REGION": "cn-north-1", "HELIX_EC2_TARGET_GROUPS": target_group("web", region="cn-north-1")},
            "*",
            f"HELIX_EC2_TARGET_GROUPS={target_group('web', region='cn-north-1')}: expected a target group in "
            "HELIX_AWS_REGION=cn-north-1",  # arn:aws: where cn-north-1 is arn:aws-cn:
        ),
        (
            {"HELIX_EC2_TARGET_GROUPS": WEB_TG},
            "999999999999",
            f"HELIX_EC2_TARGET_GROUPS={WEB_TG}: expected a target group in account 999999999999 (--account)",
        ),
    ],
)
def test_values_that_cannot_be_pinned_are_refused_in_one_line(extra, account, message):
    with pytest.raises(PolicyError) as err:
        policy_for(cfg(**extra), account)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_a_hand_built_config_with_a_bad_queue_is_refused_in_one_line():
    # The loader refuses such a value; policy_for takes any Config, so it checks again.
    bad = cfg().replace(external_metric="sqs:https://sqs.eu-west-1.amazonaws.com/*/jobs", external_target=1.0)
    with pytest.raises(PolicyError) as err:
        policy_for(bad, ACCOUNT)
    assert str(err.value).startswith("HELIX_EXTERNAL_METRIC=sqs:https://sqs.eu-west-1.amazonaws.com/*/jobs: expected")
    assert "\n" not in str(err.value)


def run_iam(*args, **env):
    return subprocess.run(
        [sys.executable, "-m", "controller_asg.iam", *args],
        cwd=ROOT,
        env={**base_env(), "HELIX_ENV_FILE": "", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_prints_the_configured_policy_and_refuses_bad_input():
    env = {
        "HELIX_AWS_REGION": REGION,
        "HELIX_GROUP": "web",
        "HELIX_EC2_AMI": "ami-0aaa",
        "HELIX_EC2_SUBNETS": "subnet-1",
    }
    out = run_iam("--account", ACCOUNT, **env)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == policy_for(load_config({"HELIX_ENV_FILE": "", **env}), ACCOUNT)
    assert out.stdout == run_iam("--account", ACCOUNT, **env).stdout  # stable
    bad = run_iam("--account", "me", **env)
    assert bad.returncode == 2 and bad.stderr.strip() == "iam: --account=me: expected a 12-digit AWS account id or *"
    no_role = run_iam(HELIX_EC2_INSTANCE_PROFILE="p")
    assert (
        no_role.returncode == 2
        and len(no_role.stderr.strip().splitlines()) == 1
        and "HELIX_EC2_ROLE_ARN=" in no_role.stderr
    )
    bad_config = run_iam(HELIX_EC2_INSTANCE_TYPE="")
    assert bad_config.returncode == 2 and "HELIX_EC2_INSTANCE_TYPE=" in bad_config.stderr and bad_config.stdout == ""


def test_readme_tells_how_to_generate_and_regenerate():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
        readme = fh.read()
    assert "python -m controller_asg.iam --account" in readme and "python -m controller_asg.iam --write" in readme


# --- the leader lease's table (HELIX_LEASE): calls made against moto are checked in tests/test_lease.py


def dynamodb(operation, key=None, table="helix-lease", region=REGION, account=ACCOUNT):
    context = {"aws:RequestedRegion": region}
    if key is not None:
        context["dynamodb:LeadingKeys"] = (key,)
    return Request(f"dynamodb:{operation}", f"arn:aws:dynamodb:{region}:{account}:table/{table}", context)


def test_lease_table_only_with_a_lease_and_only_the_groups_items():
    assert "dynamodb" not in json.dumps(policy_for(cfg(), ACCOUNT)) and "dynamodb" not in json.dumps(default_policy())
    policy = policy_for(cfg(HELIX_LEASE="dynamodb:helix-lease"), ACCOUNT)
    lease = [s for s in policy["Statement"] if "dynamodb" in json.dumps(s["Action"])]
    assert [s["Sid"] for s in lease] == ["HelixLeaseAndStateItemsOfTheGroup", "HelixDescribeTheLeaseTable"]
    actions = {a for s in lease for a in s["Action"]}
    assert actions == {f"dynamodb:{op}" for op in LEASE_OPS}  # exactly what the code calls
    for operation in ("GetItem", "PutItem", "UpdateItem"):
        for key in ("lease#web", "state#web#state", "state#web#history"):
            assert allowed(policy, dynamodb(operation, key)), (operation, key)
        for key in ("lease#api", "state#api#state", "lease#web2", "state#web2#state", "lease#we", "x"):
            assert not allowed(policy, dynamodb(operation, key)), (operation, key)
        assert not allowed(policy, dynamodb(operation))  # no key in the request: not allowed
        assert not allowed(policy, dynamodb(operation, "lease#web", table="other"))
        assert not allowed(policy, dynamodb(operation, "lease#web", region="us-east-1"))
        assert not allowed(policy, dynamodb(operation, "lease#web", account="999999999999"))
    assert allowed(policy, dynamodb("DescribeTable")) and not allowed(policy, dynamodb("DescribeTable", table="x"))
    for operation in ("CreateTable", "DeleteTable", "DeleteItem", "Scan", "Query", "UpdateTable", "BatchWriteItem"):
        assert not allowed(policy, dynamodb(operation, "lease#web")) and not allowed(policy, dynamodb(operation))

    # CreateTable on that table only when allowed to create it.
    creating = policy_for(cfg(HELIX_LEASE="dynamodb:helix-lease", HELIX_LEASE_CREATE_TABLE="1"), ACCOUNT)
    assert allowed(creating, dynamodb("CreateTable")) and not allowed(creating, dynamodb("CreateTable", table="x"))
    sids = [s["Sid"] for s in creating["Statement"] if "dynamodb" in json.dumps(s["Action"])]
    assert sids == ["HelixLeaseAndStateItemsOfTheGroup", "HelixCreateAndDescribeTheLeaseTable"]
    assert {f"dynamodb:{op}" for op in LEASE_CREATE} <= {a for s in creating["Statement"] for a in _list(s["Action"])}

    # Without a region: any region, said in the Sids; the table name still pins it.
    anywhere = policy_for(cfg(HELIX_AWS_REGION="", HELIX_LEASE="dynamodb:helix-lease"))
    sids = [s["Sid"] for s in anywhere["Statement"] if "dynamodb" in json.dumps(s["Action"])]
    assert sids == ["HelixLeaseAndStateItemsOfTheGroupAnyRegion", "HelixDescribeTheLeaseTableAnyRegion"]
    assert allowed(anywhere, dynamodb("GetItem", "lease#web", region="ap-south-1", account="999999999999"))
    assert not allowed(anywhere, dynamodb("GetItem", "lease#web", table="other", region="ap-south-1"))


def _list(value):
    return value if isinstance(value, list) else [value]
