"""TargetGroups (controller_asg/providers/elb.py) against moto's server: ELBv2 target groups holding
EC2 instances, the states it reports, its errors, that it never touches a group it was not given,
and that the generated IAM policy allows every request it sends (and not its neighbours).

What moto does, from its source (moto/elbv2/models.py, FakeTargetGroup), and these tests assert:
  * RegisterTargets: the target is `healthy` at once. moto runs no health checks, so never
    `initial` (AWS: `initial` until the first checks pass);
  * DeregisterTargets: immediate. The target is dropped from the group there and then;
    `deregistration_delay.timeout_seconds` (300 by default) is stored but never applied. An
    unfiltered DescribeTargetHealth (what TargetGroups sends) stops listing it, so it reads
    UNUSED at once (AWS lists it `draining` for up to the delay). moto reports `draining` only for
    an instance terminated while registered, and only when asked about it by id;
  * DeregisterTargets of a target that is not registered: InvalidTarget, after deregistering the
    targets listed before it (not atomic).
States moto never reports (draining in one group, initial, unhealthy...) come from the fault proxy
rewriting moto's DescribeTargetHealth reply for one group.
"""

from __future__ import annotations

import dataclasses
import re

import pytest

from controller_asg.iam import policy_for
from controller_asg.providers import make_traffic
from controller_asg.providers.elb import OPERATIONS, TargetGroups, TrafficConfigError
from controller_asg.traffic import NoTraffic, TargetState, TrafficError
from shared.config import ConfigError, load_config
from tests.iam_eval import Request, allowed, denied, elb_requests
from tests.moto_server import CREDENTIALS, REGION, moto_client, reset_moto  # its fixtures come through conftest.py
from tests.procs import manager_pki

MOTO_AMI = "ami-12c6146b"
MOTO_ACCOUNT = "123456789012"  # the account moto answers as
PORT = 8080  # the web target group's port
ADMIN_PORT = 9090  # the admin one's: each target is registered on its group's port


@pytest.fixture
def world(moto_endpoint):
    """An empty account with a VPC, two subnets, four running instances, an ALB with two instance
    target groups behind listeners (`web`, `admin`), one Helix is never configured with (`other`)
    and one of target type `ip`."""
    reset_moto(moto_endpoint)
    ec2, elb = moto_client(moto_endpoint, "ec2"), moto_client(moto_endpoint, "elbv2")
    vpc = ec2.create_vpc(CidrBlock="10.9.0.0/16")["Vpc"]["VpcId"]
    subnets = [
        ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.9.{i}.0/24", AvailabilityZone=f"{REGION}{z}")["Subnet"]["SubnetId"]
        for i, z in enumerate("ab")
    ]
    sg = ec2.create_security_group(GroupName="helix-test", Description="t", VpcId=vpc)["GroupId"]
    instances = [
        i["InstanceId"]
        for i in ec2.run_instances(ImageId=MOTO_AMI, MinCount=4, MaxCount=4, SubnetId=subnets[0])["Instances"]
    ]

    def group(name, port, kind="instance"):
        made = elb.create_target_group(Name=name, Protocol="HTTP", Port=port, VpcId=vpc, TargetType=kind)
        return made["TargetGroups"][0]["TargetGroupArn"]

    web, admin, other, ip = group("web", PORT), group("admin", ADMIN_PORT), group("other", 80), group("ips", 80, "ip")
    alb = elb.create_load_balancer(Name="helix-alb", Subnets=subnets, SecurityGroups=[sg], Type="application")
    alb_arn = alb["LoadBalancers"][0]["LoadBalancerArn"]
    for port, arn in ((80, web), (81, admin), (82, other)):
        elb.create_listener(
            LoadBalancerArn=alb_arn,
            Protocol="HTTP",
            Port=port,
            DefaultActions=[{"Type": "forward", "TargetGroupArn": arn}],
        )
    return {
        "url": moto_endpoint,
        "ec2": ec2,
        "elb": elb,
        "vpc": vpc,
        "subnets": subnets,
        "sg": sg,
        "instances": instances,
        "web": web,
        "admin": admin,
        "other": other,
        "ip": ip,
    }


def environ(world, groups, endpoint=None, **extra):
    return {
        "HELIX_ENV_FILE": "",
        "HELIX_PROVIDER": "ec2",
        "HELIX_GROUP": "g1",
        "HELIX_TOKEN": "bearer-token-for-tests",
        "HELIX_MONITOR_ADDR": "10.9.0.5:50052",
        "HELIX_EC2_AMI": MOTO_AMI,
        "HELIX_EC2_SUBNETS": ",".join(world["subnets"]),
        "HELIX_EC2_SECURITY_GROUPS": world["sg"],
        "HELIX_EC2_ENDPOINT_URL": endpoint or world["url"],
        "HELIX_IMDS_URL": "",
        "HELIX_PKI_DIR": manager_pki(),
        "HELIX_EC2_TARGET_GROUPS": ",".join(groups),
        **CREDENTIALS,
        **extra,
    }


@pytest.fixture
def traffic():
    """Builds TargetGroups through make_traffic; at the end checks each called only OPERATIONS,
    only about its own groups, and that the policy `python -m controller_asg.iam` generates for its
    configuration allows every request it sent."""
    made: list[TargetGroups] = []

    def build(world, groups, endpoint=None, **extra):
        made_traffic = make_traffic(load_config(environ(world, groups, endpoint, **extra)))
        assert isinstance(made_traffic, TargetGroups)
        made.append(made_traffic)
        return made_traffic

    yield build
    for t in made:
        t.close()
        assert t.operations_called <= set(OPERATIONS), t.operations_called - set(OPERATIONS)
        assert t.calls and len(t.calls) < t.calls.maxlen  # none forgotten
        for call in t.calls:
            assert set(named_groups(call.params)) <= set(t.arns), f"{call.operation} {call.params}"
        policy = policy_for(t.cfg, MOTO_ACCOUNT)
        for call in t.calls:
            refused = denied(policy, elb_requests(call))
            assert not refused, f"{call.operation} {call.params}: the generated policy denies {refused}"


def named_groups(params) -> list[str]:
    """The target group ARNs a request names: boto3 params, or the wire's form params."""
    out = [v for k, v in params.items() if k == "TargetGroupArn" or re.fullmatch(r"TargetGroupArns(\.member\.\d+)?", k)]
    return [a for v in out for a in (v if isinstance(v, list) else [v])]


def health(world, arn) -> dict[str, tuple[str, int]]:
    """What moto itself says about a group: id -> (state, port), unfiltered."""
    found = world["elb"].describe_target_health(TargetGroupArn=arn)["TargetHealthDescriptions"]
    return {d["Target"]["Id"]: (d["TargetHealth"]["State"], d["Target"]["Port"]) for d in found}


def health_reply_as(arn, states):
    """A fault-proxy rule: DescribeTargetHealth of `arn` answers with `states` (id -> ELB state)
    in place of what moto said, the rest of moto's reply untouched."""

    def rule(action, params):
        if action != "DescribeTargetHealth" or params.get("TargetGroupArn") != arn:
            return None

        def rewrite(payload: bytes) -> bytes:
            text, done = payload.decode(), set()

            def member(m):
                block = m.group(0)
                iid = re.search(r"<Id>([^<]*)</Id>", block)
                if iid and iid.group(1) in states:
                    done.add(iid.group(1))
                    block = re.sub(r"<State>[^<]*</State>", f"<State>{states[iid.group(1)]}</State>", block)
                return block

            text = re.sub(r"<member>.*?</member>", member, text, flags=re.DOTALL)
            assert done == set(states), f"moto's reply did not list {set(states) - done}: {text}"
            return text.encode()

        return rewrite

    return rule


# --- what moto reports --------------------------------------------------------------------------


def test_registered_instances_are_healthy_at_once_in_moto(world, traffic):
    a, b, c, _ = world["instances"]
    t = traffic(world, [world["web"]])
    assert t.states([a, b, c]) == {a: TargetState.UNUSED, b: TargetState.UNUSED, c: TargetState.UNUSED}
    t.register([a, b])
    # moto: `healthy` at once, never `initial` (it runs no health checks).
    assert t.states([a, b, c]) == {a: TargetState.HEALTHY, b: TargetState.HEALTHY, c: TargetState.UNUSED}
    assert health(world, world["web"]) == {a: ("healthy", PORT), b: ("healthy", PORT)}  # instance targets, its port
    t.register([b, a, a])  # idempotent, duplicates once
    assert health(world, world["web"]) == {a: ("healthy", PORT), b: ("healthy", PORT)}
    sent = len(t.calls)
    assert t.states([]) == {} and t.register([]) is None and t.deregister([]) is None
    assert len(t.calls) == sent  # nothing asked, nothing sent


def test_deregistration_is_immediate_in_moto(world, traffic):
    a, b, _, _ = world["instances"]
    t = traffic(world, [world["web"], world["admin"]])
    t.register([a, b])
    assert health(world, world["admin"]) == {a: ("healthy", ADMIN_PORT), b: ("healthy", ADMIN_PORT)}
    t.deregister([a])
    # moto drops a deregistered target at once, deregistration delay (300 s here) or not: UNUSED,
    # where AWS would say DRAINING until the delay ran out or its connections closed.
    attributes = world["elb"].describe_target_group_attributes(TargetGroupArn=world["web"])["Attributes"]
    assert {"Key": "deregistration_delay.timeout_seconds", "Value": "300"} in attributes
    assert t.states([a, b]) == {a: TargetState.UNUSED, b: TargetState.HEALTHY}
    assert health(world, world["web"]) == {b: ("healthy", PORT)} and health(world, world["admin"]) == {
        b: ("healthy", ADMIN_PORT)
    }
    # Again, with `a` gone already: moto answers InvalidTarget (and stops at it); still idempotent,
    # and `b` leaves every group.
    t.deregister([a, b])
    assert t.states([a, b]) == {a: TargetState.UNUSED, b: TargetState.UNUSED}
    assert health(world, world["web"]) == {} and health(world, world["admin"]) == {}


@pytest.mark.parametrize(
    ("in_web", "in_admin", "expected"),
    [
        ("draining", "healthy", TargetState.DRAINING),  # draining in one of its two groups
        ("healthy", "draining", TargetState.DRAINING),
        ("unhealthy.draining", "healthy", TargetState.DRAINING),  # newer APIs' name
        ("unhealthy", "draining", TargetState.DRAINING),
        ("initial", "unhealthy", TargetState.UNHEALTHY),
        ("initial", "unavailable", TargetState.INITIAL),
        ("unavailable", "healthy", TargetState.UNAVAILABLE),
        ("unused", "healthy", TargetState.HEALTHY),  # listed unused (e.g. a zone not enabled): no traffic from it
        ("unused", "unused", TargetState.UNUSED),
        ("a-state-from-the-future", "healthy", TargetState.UNAVAILABLE),  # unknown
    ],
)
def test_worst_state_across_groups_wins(world, traffic, fault_proxy, in_web, in_admin, expected):
    a, b, _, _ = world["instances"]
    t = traffic(world, [world["web"], world["admin"]], endpoint=fault_proxy.url)
    t.register([a, b])
    fault_proxy.rules.append(health_reply_as(world["web"], {a: in_web}))
    fault_proxy.rules.append(health_reply_as(world["admin"], {a: in_admin}))
    assert t.states([a, b]) == {a: expected, b: TargetState.HEALTHY}
    assert fault_proxy.seen.count(("DescribeTargetHealth", "rewritten")) == 2


# --- failures -----------------------------------------------------------------------------------


def test_api_failures_are_one_line_traffic_errors(world, traffic, fault_proxy):
    a, b, _, _ = world["instances"]
    web, admin = world["web"], world["admin"]
    t = traffic(world, [web, admin], endpoint=fault_proxy.url)
    refuse = (
        400,
        "AccessDenied",
        "User: arn:aws:sts::123456789012:assumed-role/helix/i-1 is not authorized\n"
        "to perform: elasticloadbalancing:RegisterTargets",
    )
    fault_proxy.rules.append(
        lambda action, params: refuse if action == "RegisterTargets" and params["TargetGroupArn"] == admin else None
    )
    with pytest.raises(TrafficError) as err:
        t.register([a])
    message = str(err.value)
    assert "\n" not in message and type(err.value).__name__ != "ClientError"
    assert message.startswith(f"RegisterTargets on target group {admin} failed: AccessDenied: User: ")
    assert set(health(world, web)) == {a}  # the other group was not held back; register is retried whole

    # Throttled: botocore's standard mode retries, then gives up (3 attempts in all).
    fault_proxy.rules.append(
        lambda action, params: (
            (400, "Throttling", "Rate exceeded")
            if action == "DeregisterTargets" and params["TargetGroupArn"] == web
            else None
        )
    )
    with pytest.raises(TrafficError, match=f"^DeregisterTargets on target group {web} failed: Throttling: "):
        t.deregister([a])
    assert fault_proxy.seen.count(("DeregisterTargets", "Throttling")) == 3

    # The connection lost: no error code, the exception's class names it.
    fault_proxy.rules.insert(0, lambda action, params: "lose" if action == "DescribeTargetHealth" else None)
    with pytest.raises(TrafficError) as err:
        t.states([a, b])
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"DescribeTargetHealth on target group {web} failed: ")
    assert re.search(r"failed: \w+Error: ", message), message
    assert fault_proxy.seen.count(("DescribeTargetHealth", "lost")) == 3


def test_unusable_target_groups_are_one_line_config_errors(world, traffic, fault_proxy):
    gone = world["elb"].create_target_group(Name="gone", Protocol="HTTP", Port=80, VpcId=world["vpc"])
    gone_arn = gone["TargetGroups"][0]["TargetGroupArn"]
    world["elb"].delete_target_group(TargetGroupArn=gone_arn)
    elsewhere = world["web"].replace(f":{REGION}:", ":eu-west-1:")
    cases = {
        world["ip"]: "expected target type instance, the group has ip",
        gone_arn: "expected an existing target group in this account and region (DescribeTargetGroups: TargetGroupNotFound)",
        elsewhere: f"expected a target group in {REGION} (HELIX_AWS_REGION), not eu-west-1",
    }
    for arn, why in cases.items():
        with pytest.raises(TrafficConfigError) as err:
            traffic(world, [world["web"], arn])
        assert str(err.value) == f"HELIX_EC2_TARGET_GROUPS={arn}: {why}"
        assert isinstance(err.value, ConfigError) and err.value.errors == [str(err.value)]
    # The API failing while checking is not the setting's fault: a TrafficError.
    fault_proxy.rules.append(
        lambda action, params: (403, "AccessDenied", "not allowed") if action == "DescribeTargetGroups" else None
    )
    with pytest.raises(TrafficError) as err:
        traffic(world, [world["web"]], endpoint=fault_proxy.url)
    assert not isinstance(err.value, ConfigError)
    assert str(err.value).startswith(f"DescribeTargetGroups on target group {world['web']} failed: AccessDenied")


def test_only_instance_ids_are_taken(world, traffic):
    t = traffic(world, [world["web"]])
    sent = len(t.calls)
    for bad in (["10.9.0.7"], ["i-1"], [world["instances"][0], "arn:aws:ec2:us-east-1:1:instance/i-0abc12345"]):
        with pytest.raises(ValueError, match="expected an EC2 instance id"):
            t.register(bad)
    assert len(t.calls) == sent


# --- other groups, other targets, and the policy ------------------------------------------------


def test_never_touches_other_groups_or_targets(world, traffic, fault_proxy):
    a, b, c, d = world["instances"]
    web, admin, other = world["web"], world["admin"], world["other"]
    # Someone else's: `a` also in a group Helix is not given, `d` in Helix's web group.
    world["elb"].register_targets(TargetGroupArn=other, Targets=[{"Id": a}, {"Id": d}])
    world["elb"].register_targets(TargetGroupArn=web, Targets=[{"Id": d}])
    before = len(fault_proxy.requests)
    t = traffic(world, [web, admin], endpoint=fault_proxy.url)
    t.register([a, b])
    assert t.states([a, b, c]) == {a: TargetState.HEALTHY, b: TargetState.HEALTHY, c: TargetState.UNUSED}
    t.deregister([a, b, c])
    assert t.states([a, b, c]) == dict.fromkeys((a, b, c), TargetState.UNUSED)
    assert health(world, other) == {a: ("healthy", 80), d: ("healthy", 80)}  # untouched
    assert health(world, web) == {d: ("healthy", PORT)}  # its own, asked-for targets only
    sent = fault_proxy.requests[before:]
    assert {(service, action) for service, action, _ in sent} == {("elasticloadbalancing", op) for op in OPERATIONS}
    for _, action, params in sent:
        assert named_groups(params) and set(named_groups(params)) <= {web, admin}, (action, params)


def test_generated_policy_allows_the_real_calls_and_not_their_neighbours(world, traffic):
    a, _, _, _ = world["instances"]
    t = traffic(world, [world["web"]])
    t.register([a])
    t.states([a])
    t.deregister([a])
    policy = policy_for(t.cfg, MOTO_ACCOUNT)
    by_operation = {c.operation: c for c in t.calls}
    assert set(by_operation) == set(OPERATIONS)
    for call in by_operation.values():  # (the fixture checks every call too)
        assert denied(policy, elb_requests(call)) == []
    for operation in ("RegisterTargets", "DeregisterTargets"):
        real = by_operation[operation]
        for arn in (world["other"], world["admin"]):  # another group, even one of the same load balancer
            moved = dataclasses.replace(real, params={**real.params, "TargetGroupArn": arn})
            assert not allowed(policy, elb_requests(moved)[0]), (operation, arn)
        elsewhere = dataclasses.replace(real, region="eu-west-1")
        assert not allowed(policy, elb_requests(elsewhere)[0])
    describe = Request("elasticloadbalancing:DescribeTargetHealth", "*", {"aws:RequestedRegion": "eu-west-1"})
    assert not allowed(policy, describe)  # the unscoped reads: only in the configured region


# --- the factory --------------------------------------------------------------------------------


def test_make_traffic_without_target_groups_is_no_traffic(world):
    assert isinstance(make_traffic(load_config(environ(world, []))), NoTraffic)
    local = {"HELIX_ENV_FILE": "", "HELIX_EC2_TARGET_GROUPS": world["web"]}  # set, but not the ec2 provider
    assert isinstance(make_traffic(load_config(local)), NoTraffic)


def test_local_provider_traffic_does_not_import_boto3(procs):
    proc = procs.python(
        "import-check",
        [
            "-c",
            (
                "import sys; from controller_asg.providers import make_traffic; from shared.config import load_config; "
                "t = make_traffic(load_config({'HELIX_ENV_FILE': ''})); "
                "print(t.name, t.enabled, 'boto3' in sys.modules, 'controller_asg.providers.elb' in sys.modules)"
            ),
        ],
    )
    assert proc.wait(60) == 0, proc.output()
    assert proc.output().strip().splitlines()[-1] == "none False False False"
