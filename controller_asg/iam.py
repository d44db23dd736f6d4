"""`python -m controller_asg.iam [--account ID]`: the least-privilege IAM policy for the ec2 provider,
made from the configuration (HELIX_ENV_FILE / the environment, as every Helix process reads it).

What the policy allows, and nothing else:
  * ec2:DescribeInstances on `*` (EC2 has no resource-level permissions for it);
  * ec2:RunInstances creating only instances tagged `helix:group=<HELIX_GROUP>` with a launch
    token, of HELIX_EC2_INSTANCE_TYPE (or, with HELIX_EC2_LAUNCH_TEMPLATE, only from that template,
    which fixes the type), with no tag keys but the ones Helix sets, from the configured image,
    subnets, security groups, key pair and launch template;
  * ec2:CreateTags only as part of that launch (`ec2:CreateAction=RunInstances`);
  * ec2:TerminateInstances only of instances carrying this group's tag and a launch token (and,
    with HELIX_WARM_POOL_SIZE, ec2:StopInstances and ec2:StartInstances on the same condition);
  * iam:PassRole on exactly HELIX_EC2_ROLE_ARN, only to EC2, only when an instance profile is set;
  * with HELIX_EC2_TARGET_GROUPS (controller_asg/providers/elb.py): elasticloadbalancing:
    RegisterTargets and DeregisterTargets on exactly those target group ARNs, and
    DescribeTargetHealth and DescribeTargetGroups on `*` (ELBv2 has no resource-level permissions
    for them; their Sids end in `AnyResource`). Nothing about target groups without the setting;
  * with an `sqs:` HELIX_EXTERNAL_METRIC (controller_asg/external.py): sqs:GetQueueAttributes on
    exactly that queue's ARN: its region, account and name from its URL (a stand-in endpoint's
    URL names no region: HELIX_AWS_REGION's, else any, said in the Sid). Nothing about SQS otherwise;
  * with HELIX_LEASE=dynamodb:<table> (controller_asg/lease.py, controller_asg/statestore.py):
    dynamodb:GetItem, PutItem and UpdateItem on exactly that table's ARN and only on this group's
    items (`dynamodb:LeadingKeys`: `lease#<group>` and `state#<group>#*`), dynamodb:DescribeTable on
    the table, and CreateTable on it only with HELIX_LEASE_CREATE_TABLE=1. Never DeleteItem, Scan,
    Query or a change to the table: the lease's item is never deleted (its epoch must never go back).
    Nothing about DynamoDB without the setting;
  * all of it only in HELIX_AWS_REGION (`aws:RequestedRegion` and the ARNs), but the queue, which
    is wherever its URL says (a queue in another account is readable when its queue policy allows).

A setting left empty cannot be pinned: its ARN becomes a wildcard and the statement's Sid says so
(`...AnyImage`, `...AnySubnet`, `...AnyRegion`). A launch template given by name (not `lt-…` id)
cannot be pinned either (its ARN holds the id). Values that would act as wildcards or policy
variables in a policy (`*`, `?`, `${`) are refused, one line naming the setting, and so is a target
group in another region, partition or (with --account) account than the one the policy is for.

`--write [PATH]` regenerates deploy/iam-policy.json: the policy for the default configuration
(the environment and any .env are ignored, so the committed file never depends on who ran it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

from controller_asg.lease import CREATE_OPERATIONS as LEASE_CREATE_OPERATIONS
from controller_asg.lease import OPERATIONS as LEASE_OPERATIONS
from controller_asg.providers.ec2 import GROUP_TAG, LAUNCH_TAG_KEYS, TOKEN_TAG
from shared.config import ENV_FILE_KEY, Config, ConfigError, load_config, load_or_exit, sqs_queue

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_POLICY_PATH = os.path.join(ROOT, "deploy", "iam-policy.json")
EXIT_BAD_INPUT = 2
EC2_SERVICE = "ec2.amazonaws.com"
ELB = "elasticloadbalancing"
# What shared/config.py accepts for HELIX_EC2_TARGET_GROUPS, parts captured (checked again here:
# policy_for takes any Config, and an ARN goes into the policy as an exact name).
_TARGET_GROUP_ARN = (
    r"arn:(aws[a-z-]*):elasticloadbalancing:([a-z0-9-]+):([0-9]{12}):targetgroup/[A-Za-z0-9-]{1,32}/[0-9a-f]{16}"
)


# The DynamoDB operations on an item (they carry dynamodb:LeadingKeys); the others are on the table.
_ITEM_OPERATIONS = ("GetItem", "PutItem", "UpdateItem")


class PolicyError(ValueError):
    """A value cannot go into the policy; the message names the setting, the value and what was expected."""


def _checked(key: str, value: str, pattern: str, expected: str) -> str:
    if not re.fullmatch(pattern, value):
        raise PolicyError(f"{key}={value}: expected {expected}")
    return value


def partition(region: str) -> str:
    """The ARN partition a region lives in (`aws` when no region is set)."""
    if region.startswith("cn-"):
        return "aws-cn"
    if region.startswith("us-gov-"):
        return "aws-us-gov"
    return "aws"


def _statement(sid: str, action: str | list[str], resource: str | list[str], condition: dict[str, dict] | None) -> dict:
    out: dict[str, Any] = {"Sid": sid, "Effect": "Allow", "Action": action, "Resource": resource}
    if condition:
        out["Condition"] = condition
    return out


def policy_for(cfg: Config, account: str = "*") -> dict[str, Any]:
    """The IAM policy document the ec2 provider needs for `cfg`, in account `account` (`*`: any).

    Pure: reads nothing but its arguments. Raises PolicyError for a value that cannot be put in a
    policy as an exact name."""
    _checked("--account", account, r"\*|[0-9]{12}", "a 12-digit AWS account id or *")
    region = cfg.aws_region
    if region:
        _checked("HELIX_AWS_REGION", region, r"[a-z]{2}(-[a-z]+)+-[0-9]{1,2}", "a region name such as us-east-1")
    group = _checked(
        "HELIX_GROUP",
        cfg.group_name,
        r"[A-Za-z0-9 _.:/=+@-]{1,128}",
        "1 to 128 letters, digits, spaces or _ . : / = + - @ (what an EC2 tag value may hold)",
    )
    ident = r"[A-Za-z0-9]+"
    ami = cfg.ec2_ami and _checked("HELIX_EC2_AMI", cfg.ec2_ami, "ami-" + ident, "an AMI id (ami-…)")
    subnets = [_checked("HELIX_EC2_SUBNETS", s, "subnet-" + ident, "subnet ids (subnet-…)") for s in cfg.ec2_subnets]
    groups = [
        _checked("HELIX_EC2_SECURITY_GROUPS", g, "sg-" + ident, "security group ids (sg-…)")
        for g in cfg.ec2_security_groups
    ]
    key_name = cfg.ec2_key_name and _checked(
        "HELIX_EC2_KEY_NAME", cfg.ec2_key_name, r"[^*?$\x00-\x1f]{1,255}", "a key pair name without * ? or $"
    )
    template = cfg.ec2_launch_template and _checked(
        "HELIX_EC2_LAUNCH_TEMPLATE",
        cfg.ec2_launch_template,
        r"[A-Za-z0-9()./_-]{3,128}",
        "a launch template id (lt-…) or name (3 to 128 of A-Z a-z 0-9 ( ) . / _ -)",
    )
    instance_type = _checked(
        "HELIX_EC2_INSTANCE_TYPE", cfg.ec2_instance_type, r"[a-z0-9-]+\.[a-z0-9-]+", "an instance type such as t3.micro"
    )

    part = partition(region)
    where = region or "*"
    anywhere = "" if region else "AnyRegion"  # said in every regional Sid when nothing pins it

    def arn(kind: str, name: str) -> str:
        return f"arn:{part}:ec2:{where}:{account}:{kind}/{name}"

    in_region = {"aws:RequestedRegion": region} if region else {}
    statements = [
        _statement(
            "HelixListInstances" + anywhere,
            "ec2:DescribeInstances",
            "*",
            {"StringEquals": in_region} if in_region else None,
        )
    ]

    # The instances and volumes a launch creates: tagged for this group, no other tag keys.
    request_tags: dict[str, dict] = {
        "StringEquals": {f"aws:RequestTag/{GROUP_TAG}": group, **in_region},
        "ForAllValues:StringEquals": {"aws:TagKeys": sorted(LAUNCH_TAG_KEYS)},
    }
    instance_rule: dict[str, dict] = {
        "StringEquals": dict(request_tags["StringEquals"]),
        "ForAllValues:StringEquals": dict(request_tags["ForAllValues:StringEquals"]),
        # the launch token is what later lets Helix (and the terminate statement) recognise it
        "Null": {f"aws:RequestTag/{TOKEN_TAG}": "false"},
    }
    template_arn = ""
    if template:
        # The template fixes the type (the provider sends none): pin the template instead.
        pinned = template.startswith("lt-")
        template_arn = arn("launch-template", template if pinned else "*")
        instance_rule["ArnEquals" if pinned else "ArnLike"] = {"ec2:LaunchTemplate": template_arn}
    else:
        instance_rule["StringEquals"]["ec2:InstanceType"] = instance_type
    statements.append(
        _statement(
            "HelixLaunchOnlyGroupInstances" + anywhere, "ec2:RunInstances", [arn("instance", "*")], instance_rule
        )
    )
    statements.append(
        _statement("HelixLaunchOnlyGroupVolumes" + anywhere, "ec2:RunInstances", [arn("volume", "*")], request_tags)
    )

    # What a launch uses: exactly the configured resources; a wildcard (named in the Sid) where
    # the configuration leaves the choice to AWS or the launch template.
    loose: list[str] = []
    image_arn = f"arn:{part}:ec2:{where}::image/{ami or '*'}"  # images' ARNs have no account
    if not ami:
        loose.append("AnyImage")
    if not subnets:
        loose.append("AnySubnet")
    if not groups:
        loose.append("AnySecurityGroup")
    uses = [
        image_arn,
        arn("network-interface", "*"),  # created by the launch in the subnet above
        *(arn("subnet", s) for s in subnets or ["*"]),
        *(arn("security-group", g) for g in groups or ["*"]),
    ]
    if key_name:
        uses.append(arn("key-pair", key_name))
    elif template:  # the template may name one
        uses.append(arn("key-pair", "*"))
        loose.append("AnyKeyPair")
    if template:
        uses.append(template_arn)
        if not template.startswith("lt-"):
            loose.append("AnyLaunchTemplate")
    statements.append(
        _statement(
            "HelixLaunchFrom" + ("".join(loose) or "ConfiguredResources") + anywhere,
            "ec2:RunInstances",
            sorted(uses),
            {"StringEquals": in_region} if in_region else None,
        )
    )
    statements.append(
        _statement(
            "HelixTagOnlyWhileLaunching" + anywhere,
            "ec2:CreateTags",
            [arn("instance", "*"), arn("volume", "*")],
            {"StringEquals": {"ec2:CreateAction": "RunInstances", **in_region}},
        )
    )
    statements.append(
        _statement(
            "HelixTerminateOnlyInstancesItLaunched" + anywhere,
            "ec2:TerminateInstances",
            [arn("instance", "*")],
            {
                "StringEquals": {f"aws:ResourceTag/{GROUP_TAG}": group, **in_region},
                "Null": {f"aws:ResourceTag/{TOKEN_TAG}": "false"},
            },
        )
    )

    if cfg.warm_pool_size > 0:
        for verb in ("Stop", "Start"):
            statements.append(
                _statement(
                    f"Helix{verb}OnlyInstancesItLaunched" + anywhere,
                    f"ec2:{verb}Instances",
                    [arn("instance", "*")],
                    {
                        "StringEquals": {f"aws:ResourceTag/{GROUP_TAG}": group, **in_region},
                        "Null": {f"aws:ResourceTag/{TOKEN_TAG}": "false"},
                    },
                )
            )

    if cfg.ec2_instance_profile:
        if not cfg.ec2_role_arn:
            raise PolicyError(
                f"HELIX_EC2_ROLE_ARN=: expected the ARN of the role in HELIX_EC2_INSTANCE_PROFILE="
                f"{cfg.ec2_instance_profile} (iam:PassRole is allowed on exactly that role)"
            )
        role = _checked(
            "HELIX_EC2_ROLE_ARN",
            cfg.ec2_role_arn,
            r"arn:aws(-cn|-us-gov)?:iam::[0-9]{12}:role/[A-Za-z0-9+=,.@_/-]{1,512}",
            "a role ARN such as arn:aws:iam::123456789012:role/helix-app",
        )
        statements.append(
            _statement(
                "HelixPassTheAppInstanceRole",
                "iam:PassRole",
                [role],
                {"StringEquals": {"iam:PassedToService": EC2_SERVICE}},
            )
        )
    elif cfg.ec2_role_arn:
        raise PolicyError(
            f"HELIX_EC2_ROLE_ARN={cfg.ec2_role_arn}: expected HELIX_EC2_INSTANCE_PROFILE to be set too "
            "(the role reaches instances only through a profile)"
        )
    statements += _target_group_statements(cfg, account, in_region, anywhere)
    statements += _external_metric_statements(cfg)
    statements += _lease_statements(cfg, account, in_region, anywhere)
    return {"Version": "2012-10-17", "Statement": statements}


def _target_group_statements(cfg: Config, account: str, in_region: dict[str, str], anywhere: str) -> list[dict]:
    """What controller_asg/providers/elb.py calls, for HELIX_EC2_TARGET_GROUPS (none: nothing)."""
    arns = list(dict.fromkeys(cfg.ec2_target_groups))
    if not arns:
        return []
    region = cfg.aws_region
    for target_group in arns:
        found = re.fullmatch(_TARGET_GROUP_ARN, target_group)
        if not found:
            raise PolicyError(
                f"HELIX_EC2_TARGET_GROUPS={target_group}: expected target group ARNs "
                "(arn:aws:elasticloadbalancing:REGION:ACCOUNT:targetgroup/NAME/ID)"
            )
        arn_partition, arn_region, arn_account = found.groups()
        # The client calls one region (and partition), and ELBv2 has no cross-account registration:
        # a group elsewhere could only ever fail, so the policy is refused rather than printed.
        if region and (arn_region, arn_partition) != (region, partition(region)):
            raise PolicyError(
                f"HELIX_EC2_TARGET_GROUPS={target_group}: expected a target group in HELIX_AWS_REGION={region}"
            )
        if account != "*" and arn_account != account:
            raise PolicyError(
                f"HELIX_EC2_TARGET_GROUPS={target_group}: expected a target group in account {account} (--account)"
            )
    by_region = {"StringEquals": in_region} if in_region else None
    # Register/Deregister: exactly these groups (their ARNs pin the region too).
    out = [
        _statement("HelixRegisterWithConfiguredTargetGroups", f"{ELB}:RegisterTargets", sorted(arns), by_region),
        _statement("HelixDeregisterFromConfiguredTargetGroups", f"{ELB}:DeregisterTargets", sorted(arns), by_region),
    ]
    # ELBv2 cannot scope these two to a resource: `*`, said in the Sid.
    for operation in ("DescribeTargetHealth", "DescribeTargetGroups"):
        out.append(_statement(f"Helix{operation}AnyResource{anywhere}", f"{ELB}:{operation}", "*", by_region))
    return out


def _external_metric_statements(cfg: Config) -> list[dict]:
    """What controller_asg/external.py calls for an `sqs:` HELIX_EXTERNAL_METRIC (other kinds: nothing)."""
    kind, _, url = cfg.external_metric.partition(":")
    if kind != "sqs":
        return []
    queue = sqs_queue(url)
    if queue is None:  # the loader refuses it; policy_for takes any Config
        raise PolicyError(
            f"HELIX_EXTERNAL_METRIC={cfg.external_metric}: expected sqs:https://sqs.REGION.amazonaws.com/ACCOUNT/NAME"
        )
    # The client calls the queue's own region (external.py), so that is the one to allow; the URL's
    # parts are digits, letters, _ and - only (sqs_queue), never a wildcard.
    region = queue.region or cfg.aws_region
    arn = f"arn:{partition(region)}:sqs:{region or '*'}:{queue.account}:{queue.name}"
    sid = "HelixReadTheExternalMetricQueue" + ("" if region else "AnyRegion")
    return [_statement(sid, "sqs:GetQueueAttributes", [arn], None)]


def _lease_statements(cfg: Config, account: str, in_region: dict[str, str], anywhere: str) -> list[dict]:
    """What controller_asg/lease.py and statestore.py call with HELIX_LEASE (none: nothing)."""
    if not cfg.lease:
        return []
    table = _checked(
        "HELIX_LEASE", cfg.lease_table, r"[A-Za-z0-9_.-]{3,255}", "dynamodb:<table> (3 to 255 letters, digits, _ . -)"
    )
    region = cfg.aws_region
    table_arn = f"arn:{partition(region)}:dynamodb:{region or '*'}:{account}:table/{table}"
    group = cfg.group_name  # checked by policy_for: no * ? or $ in it, so a prefix is exact
    items: dict[str, dict] = {
        # This group's lease and state items only. ForAllValues alone holds when the key is
        # missing: Null pins that it is present (every item operation sends it).
        "ForAllValues:StringLike": {"dynamodb:LeadingKeys": [f"lease#{group}", f"state#{group}#*"]},
        "Null": {"dynamodb:LeadingKeys": "false"},
    }
    if in_region:
        items["StringEquals"] = dict(in_region)
    table_actions = [f"dynamodb:{op}" for op in LEASE_OPERATIONS if op not in _ITEM_OPERATIONS]
    if cfg.lease_create_table:
        table_actions += [f"dynamodb:{op}" for op in LEASE_CREATE_OPERATIONS]
    return [
        _statement(
            "HelixLeaseAndStateItemsOfTheGroup" + anywhere,
            [f"dynamodb:{op}" for op in LEASE_OPERATIONS if op in _ITEM_OPERATIONS],
            [table_arn],
            items,
        ),
        _statement(
            ("HelixCreateAndDescribeTheLeaseTable" if cfg.lease_create_table else "HelixDescribeTheLeaseTable")
            + anywhere,
            sorted(table_actions),
            [table_arn],
            {"StringEquals": in_region} if in_region else None,
        ),
    ]


def render(policy: dict[str, Any]) -> str:
    """The policy as stable JSON: sorted keys, two-space indent, a final newline."""
    return json.dumps(policy, indent=2, sort_keys=True) + "\n"


def default_policy() -> dict[str, Any]:
    """The policy for the default configuration, in any account: deploy/iam-policy.json."""
    return policy_for(load_config({ENV_FILE_KEY: ""}))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m controller_asg.iam",
        description="Print the least-privilege IAM policy for the ec2 provider, made from the configuration.",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--account", default="*", help="AWS account id the ARNs name (default: *, any account)")
    mode.add_argument(
        "--write",
        nargs="?",
        const=DEFAULT_POLICY_PATH,
        metavar="PATH",
        help="write the policy for the default configuration to PATH (default: deploy/iam-policy.json)",
    )
    args = parser.parse_args(argv)
    try:
        if args.write:
            text = render(default_policy())
            with open(args.write, "w", encoding="utf-8") as fh:
                fh.write(text)
            print(f"wrote {args.write}")
            return 0
        cfg = load_or_exit(prog="iam")
        print(render(policy_for(cfg, args.account)), end="")
    except (PolicyError, ConfigError) as exc:
        print(f"iam: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
