"""A small IAM policy evaluator for tests, and the IAM requests an EC2 call amounts to.

`allowed(policy, request)`: does an identity policy allow one request (action, resource ARN,
condition context)? The rules implemented, as AWS documents them:
  * a request is allowed when some Allow statement matches it and no Deny statement does;
  * a statement matches when its Action matches (case-insensitive, `*`/`?` wildcards), its Resource
    matches (`*`, or an ARN pattern compared component by component, case-sensitive, wildcards
    inside a component) and every condition holds;
  * conditions: every operator AND every key of an operator must hold; the values listed for one
    key are ORed. Operators: StringEquals, StringLike, ArnEquals/ArnLike (the same in IAM), Null,
    the `...IfExists` forms, and the ForAllValues:/ForAnyValue: qualifiers of the string ones. A
    single-valued operator on a missing key is false (IfExists: true); ForAllValues on a missing
    key is TRUE (AWS's own pitfall, kept: a policy must pair it with something else);
  * context keys are case-insensitive.
Anything else (NotAction, NotResource, negated operators, policy variables, other versions) raises
`Unsupported` instead of guessing, so a test can never pass on an unimplemented rule.

`ec2_requests(call, ...)`: the requests AWS authorizes for one EC2 call the provider recorded
(`Ec2Provider.calls`), following the EC2 service authorization reference: RunInstances is
authorized once per resource it touches (instance, volume, network interface, image, subnet,
security groups, key pair, launch template), with `ec2:InstanceType` on the instance, the request
tags on each resource type tagged, CreateTags for each tagged type (`ec2:CreateAction`), and
iam:PassRole for an instance profile; TerminateInstances once per instance with its tags.

`elb_requests(call)`: the same for one ELBv2 call TargetGroups recorded (controller_asg/providers/
elb.py), following the Elastic Load Balancing V2 authorization reference: RegisterTargets and
DeregisterTargets on the target group's ARN (resource type `targetgroup`); DescribeTargetHealth and
DescribeTargetGroups on `*` (no resource types: ELBv2 cannot scope them).

`sqs_requests(call)`: the same for one SQS call controller_asg/external.py recorded, following the
Amazon SQS authorization reference: GetQueueAttributes on the queue (resource type `queue`,
arn:aws:sqs:REGION:ACCOUNT:NAME), the region being the one the request went to, the account and
name the QueueUrl's path.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

Context = Mapping[str, "str | tuple[str, ...]"]


class Unsupported(ValueError):
    """The policy uses something this evaluator does not implement."""


@dataclass(frozen=True)
class Request:
    action: str
    resource: str
    context: Context = field(default_factory=dict)


def _list(value: Any) -> list:
    return list(value) if isinstance(value, list | tuple) else [value]


def _glob(pattern: str, value: str, *, fold: bool = False) -> bool:
    if "${" in pattern:
        raise Unsupported(f"policy variable in {pattern!r}")
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, value, re.DOTALL | (re.IGNORECASE if fold else 0)) is not None


def _arn_like(pattern: str, value: str) -> bool:
    # Six colon-separated components, each matched on its own (the last may hold colons).
    want, got = pattern.split(":", 5), value.split(":", 5)
    return len(want) == len(got) == 6 and all(_glob(w, g) for w, g in zip(want, got, strict=True))


def _string_equals(pattern: str, value: str) -> bool:
    if "${" in pattern:
        raise Unsupported(f"policy variable in {pattern!r}")
    return pattern == value


MATCHERS: dict[str, Callable[[str, str], bool]] = {
    "StringEquals": _string_equals,
    "StringLike": _glob,
    "ArnEquals": _arn_like,
    "ArnLike": _arn_like,
}


def _holds(operator: str, key: str, wanted: Any, context: Context) -> bool:
    values = [str(v) for v in _list(wanted)]
    found = {k.lower(): v for k, v in context.items()}.get(key.lower())
    qualifier, _, base = operator.rpartition(":")
    if base == "Null":
        if qualifier or values not in (["true"], ["false"]):
            raise Unsupported(f"{operator} {key}: {wanted!r}")
        return (found is None) == (values == ["true"])
    if_exists = base.endswith("IfExists")
    base = base.removesuffix("IfExists")
    if base not in MATCHERS:
        raise Unsupported(f"condition operator {operator}")
    match = MATCHERS[base]
    if qualifier == "ForAllValues":
        return found is None or all(any(match(w, v) for w in values) for v in _list(found))
    if qualifier == "ForAnyValue":
        return found is not None and any(match(w, v) for w in values for v in _list(found))
    if qualifier:
        raise Unsupported(f"condition qualifier {qualifier}")
    if found is None:
        return if_exists
    if not isinstance(found, str):
        raise Unsupported(f"{operator} on the multivalued key {key}: use ForAllValues or ForAnyValue")
    return any(match(w, found) for w in values)


def _matches(statement: Mapping[str, Any], request: Request) -> bool:
    unknown = set(statement) - {"Sid", "Effect", "Action", "Resource", "Condition"}
    if unknown:
        raise Unsupported(f"statement elements {sorted(unknown)}")
    if not any(_glob(a, request.action, fold=True) for a in _list(statement["Action"])):
        return False
    if not any(r == "*" or _arn_like(r, request.resource) for r in _list(statement["Resource"])):
        return False
    return all(
        _holds(operator, key, wanted, request.context)
        for operator, block in statement.get("Condition", {}).items()
        for key, wanted in block.items()
    )


def allowed(policy: Mapping[str, Any], request: Request) -> bool:
    if policy.get("Version") != "2012-10-17":
        raise Unsupported(f"policy version {policy.get('Version')!r}")
    effects = {s["Effect"] for s in _list(policy["Statement"]) if _matches(s, request)}
    if effects - {"Allow", "Deny"}:
        raise Unsupported(f"effects {effects}")
    return "Allow" in effects and "Deny" not in effects


def denied(policy: Mapping[str, Any], requests: Sequence[Request]) -> list[Request]:
    return [r for r in requests if not allowed(policy, r)]


# ---------------------------------------------------------------------------------------------
# What AWS authorizes for one recorded EC2 call (partition `aws`).


def _tag_context(tags: Mapping[str, str], prefix: str) -> dict[str, str | tuple[str, ...]]:
    out: dict[str, str | tuple[str, ...]] = {f"{prefix}/{k}": v for k, v in tags.items()}
    if prefix == "aws:RequestTag" and tags:
        out["aws:TagKeys"] = tuple(tags)
    return out


def ec2_requests(
    call: Any,
    account: str,
    *,
    launched: Callable[[str], list[dict]] = lambda token: [],
    tags_of: Callable[[str], dict[str, str]] = lambda iid: {},
    template_arn: Callable[[Mapping[str, str]], str] = lambda spec: "",
    role_of: Callable[[Mapping[str, str]], str] = lambda profile: "",
) -> list[Request]:
    """The IAM requests for `call` (operation, params, region).

    launched(client token): the instances that call launched (what AWS filled in from a launch
    template or a default); tags_of(id): an instance's tags when it was terminated;
    template_arn(LaunchTemplate param): the template's ARN; role_of(IamInstanceProfile param):
    the profile's role ARN."""
    region, params = call.region, call.params

    def arn(kind: str, name: str) -> str:
        return f"arn:aws:ec2:{region}:{account}:{kind}/{name}"

    where = {"aws:RequestedRegion": region}
    if call.operation == "DescribeInstances":
        return [Request("ec2:DescribeInstances", "*", where)]
    if call.operation in ("TerminateInstances", "StopInstances", "StartInstances"):
        return [
            Request(
                f"ec2:{call.operation}",
                arn("instance", iid),
                {**where, **_tag_context(tags_of(iid), "aws:ResourceTag")},
            )
            for iid in params["InstanceIds"]
        ]
    if call.operation != "RunInstances":
        raise Unsupported(f"EC2 operation {call.operation}")

    made = launched(params.get("ClientToken", ""))

    def effective(param: str, attribute: str) -> str:
        if params.get(param):
            return str(params[param])
        seen = {str(i[attribute]) for i in made if i.get(attribute)}
        if len(seen) != 1:
            raise ValueError(f"RunInstances {params.get('ClientToken')}: cannot tell its {param} (launched: {seen})")
        return seen.pop()

    base: dict[str, str | tuple[str, ...]] = dict(where)
    uses = []
    if params.get("LaunchTemplate"):
        base["ec2:LaunchTemplate"] = template_arn(params["LaunchTemplate"])
        uses.append(str(base["ec2:LaunchTemplate"]))
    tags = {
        spec["ResourceType"]: {t["Key"]: t["Value"] for t in spec["Tags"]}
        for spec in params.get("TagSpecifications", [])
    }
    groups = list(params.get("SecurityGroupIds") or {g["GroupId"] for i in made for g in i.get("SecurityGroups", [])})
    if not groups:
        raise ValueError(f"RunInstances {params.get('ClientToken')}: cannot tell its security groups")
    key = params.get("KeyName") or next((i["KeyName"] for i in made if i.get("KeyName")), "")
    uses += [
        f"arn:aws:ec2:{region}::image/{effective('ImageId', 'ImageId')}",
        arn("subnet", effective("SubnetId", "SubnetId")),
        arn("network-interface", "*"),
        *(arn("security-group", g) for g in groups),
        *([arn("key-pair", key)] if key else []),
    ]
    out = [
        Request(
            "ec2:RunInstances",
            arn("instance", "*"),
            {
                **base,
                "ec2:InstanceType": effective("InstanceType", "InstanceType"),
                **_tag_context(tags.get("instance", {}), "aws:RequestTag"),
            },
        ),
        Request(
            "ec2:RunInstances", arn("volume", "*"), {**base, **_tag_context(tags.get("volume", {}), "aws:RequestTag")}
        ),
        *(Request("ec2:RunInstances", resource, base) for resource in uses),
    ]
    for kind, kind_tags in tags.items():
        out.append(
            Request(
                "ec2:CreateTags",
                arn(kind, "*"),
                {**base, "ec2:CreateAction": "RunInstances", **_tag_context(kind_tags, "aws:RequestTag")},
            )
        )
    if params.get("IamInstanceProfile"):
        out.append(
            Request("iam:PassRole", role_of(params["IamInstanceProfile"]), {"iam:PassedToService": "ec2.amazonaws.com"})
        )
    return out


# ---------------------------------------------------------------------------------------------
# What AWS authorizes for one recorded ELBv2 call.

ELB_UNSCOPED = ("DescribeTargetHealth", "DescribeTargetGroups")
ELB_ON_TARGET_GROUP = ("RegisterTargets", "DeregisterTargets")


def elb_requests(call: Any) -> list[Request]:
    """The IAM requests for `call` (operation, params, region): one per call; the ARN it names
    is the resource, with its own account and region."""
    where = {"aws:RequestedRegion": call.region}
    if call.operation in ELB_UNSCOPED:
        return [Request(f"elasticloadbalancing:{call.operation}", "*", where)]
    if call.operation in ELB_ON_TARGET_GROUP:
        return [Request(f"elasticloadbalancing:{call.operation}", call.params["TargetGroupArn"], where)]
    raise Unsupported(f"ELBv2 operation {call.operation}")


# ---------------------------------------------------------------------------------------------
# What AWS authorizes for one recorded SQS call.

SQS_ON_QUEUE = ("GetQueueAttributes",)


def sqs_requests(call: Any) -> list[Request]:
    """The IAM requests for `call` (operation, params, region): one, on the queue its URL names."""
    if call.operation not in SQS_ON_QUEUE:
        raise Unsupported(f"SQS operation {call.operation}")
    account, name = urllib.parse.urlsplit(call.params["QueueUrl"]).path.strip("/").split("/")
    where = {"aws:RequestedRegion": call.region}
    return [Request(f"sqs:{call.operation}", f"arn:aws:sqs:{call.region}:{account}:{name}", where)]
