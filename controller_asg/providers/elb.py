"""`TargetGroups`: EC2 instances in ELBv2 target groups (HELIX_EC2_TARGET_GROUPS), through boto3.

The controller registers an instance once it is in service, deregisters it before terminating it,
and polls `states` until it is no longer DRAINING (controller_asg/traffic.py has the protocol).

What it touches: exactly the configured groups, and in them only the targets it is asked about.
It never creates, modifies or deletes a group, never deregisters a target it was not given, and
takes only EC2 instance ids (the controller passes the instances Helix launched). The IAM policy
(`python -m controller_asg.iam`) allows Register/DeregisterTargets on exactly these ARNs.

Construction checks every group exists and has target type `instance` (DescribeTargetGroups,
once); otherwise TrafficConfigError, one line naming HELIX_EC2_TARGET_GROUPS and the ARN.

Calls: RegisterTargets/DeregisterTargets per group (each target on the group's port: AWS
deregisters a target only on the port it was registered with), and one unfiltered
DescribeTargetHealth per group for `states`. Unfiltered on purpose: it lists every registered and
every draining target, answers for ids that no longer exist (a long-terminated instance would make
a filtered call fail with InvalidTarget), and costs one call per group whatever the ids.
Any botocore error is a TrafficError: one line, operation, group, error code. Retries: botocore's
standard mode (a few attempts); the controller retries on its next step.

Credentials, region and endpoint: the ec2 provider's settings (HELIX_AWS_ACCESS_KEY/SECRET_KEY/
SESSION_TOKEN else boto3's default chain, HELIX_AWS_REGION, HELIX_EC2_ENDPOINT_URL: a non-AWS
endpoint such as moto's server serves every service on one URL).

boto3 is imported only when a TargetGroups is built: the local provider never loads it.
"""

from __future__ import annotations

import copy
import logging
import re
from collections import deque
from collections.abc import Sequence
from typing import Any

from controller_asg.providers.ec2 import CALLS_KEPT, ApiCall
from controller_asg.traffic import TargetState, TrafficError
from shared.config import Config, ConfigError

log = logging.getLogger("controller_asg.providers.elb")

SETTING = "HELIX_EC2_TARGET_GROUPS"
# Every ELBv2 operation this module calls; the generated IAM policy allows each (tested, and every
# recorded request against it in tests/test_elb.py).
OPERATIONS = ("DescribeTargetGroups", "RegisterTargets", "DeregisterTargets", "DescribeTargetHealth")
# Targets per Register/DeregisterTargets call: AWS documents no per-call cap; this is what the AWS
# Load Balancer Controller sends, on the ELB team's advice.
_TARGETS_PER_CALL = 200
_INSTANCE_ID = re.compile(r"i-[0-9a-f]{8,17}")
_ARN_REGION = re.compile(r"arn:[^:]+:elasticloadbalancing:([^:]+):")

# ELBv2's TargetHealth.State -> ours. "unhealthy.draining" (newer APIs): failing its checks while
# draining; still draining, which is what the controller waits on.
_STATES = {
    "initial": TargetState.INITIAL,
    "healthy": TargetState.HEALTHY,
    "unhealthy": TargetState.UNHEALTHY,
    "unhealthy.draining": TargetState.DRAINING,
    "unused": TargetState.UNUSED,
    "draining": TargetState.DRAINING,
    "unavailable": TargetState.UNAVAILABLE,
}
# Worst first wins across groups (traffic.py): DRAINING, UNHEALTHY, INITIAL, UNAVAILABLE, HEALTHY;
# UNUSED only when no group holds the target (a group that lists it `unused`, e.g. not attached to
# a load balancer, sends it nothing: the same as not holding it).
_RANK = {
    TargetState.UNUSED: 0,
    TargetState.HEALTHY: 1,
    TargetState.UNAVAILABLE: 2,
    TargetState.INITIAL: 3,
    TargetState.UNHEALTHY: 4,
    TargetState.DRAINING: 5,
}


class TrafficConfigError(ConfigError):
    """A configured target group cannot be used (missing, not `instance` targets, another region):
    one line naming HELIX_EC2_TARGET_GROUPS and the ARN. A ConfigError, so the controller reports
    it the way it reports any invalid setting, and does not start."""

    def __init__(self, line: str):
        super().__init__([line])


def elb_state(raw: str) -> TargetState:
    """ELBv2's state name as ours; a name this code does not know is UNAVAILABLE ("unknown")."""
    return _STATES.get(raw, TargetState.UNAVAILABLE)


def worst(states: Sequence[TargetState]) -> TargetState:
    return max(states, key=_RANK.__getitem__, default=TargetState.UNUSED)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def make_elbv2_client(cfg: Config) -> Any:
    """An elbv2 client with the ec2 provider's credentials, region and endpoint."""
    from botocore.config import Config as BotoConfig

    from controller_asg.providers.aws import aws_session

    return aws_session(cfg).client(
        "elbv2",
        endpoint_url=cfg.ec2_endpoint_url or None,
        config=BotoConfig(
            # A few attempts, then TrafficError: the controller's next step is the real retry, and
            # its act path must not stall on one slow API.
            retries={"mode": "standard", "total_max_attempts": 3},
            connect_timeout=5,
            read_timeout=20,
            user_agent_extra="helix-controller",
        ),
    )


class TargetGroups:
    """The Traffic for HELIX_EC2_TARGET_GROUPS (controller_asg/traffic.py)."""

    name = "target-groups"
    enabled = True

    def __init__(self, cfg: Config, client: Any = None):
        self.cfg = cfg
        self.arns: tuple[str, ...] = tuple(dict.fromkeys(cfg.ec2_target_groups))
        if not self.arns:
            raise TrafficConfigError(f"{SETTING}=: expected at least one target group ARN")
        self.client = client if client is not None else make_elbv2_client(cfg)
        self._region = str(self.client.meta.region_name or "")
        # Every request as sent (bounded): what the IAM policy tests check, and debugging.
        self.operations_called: set[str] = set()
        self.calls: deque[ApiCall] = deque(maxlen=CALLS_KEPT)
        self.client.meta.events.register("before-parameter-build", self._record_operation)
        self.ports: dict[str, int] = self._check_groups()

    def _record_operation(self, model: Any = None, params: Any = None, **_: Any) -> None:
        if model is None:
            return
        self.operations_called.add(model.name)
        self.calls.append(ApiCall(model.name, copy.deepcopy(dict(params or {})), self._region))

    def _call(self, operation: str, arn: str, **params: Any) -> dict:
        """One ELBv2 call about group `arn`; any botocore error becomes a one-line TrafficError."""
        from botocore import xform_name
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            reply: dict = getattr(self.client, xform_name(operation))(**params)
            return reply
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = error.get("Code", "") or "Unknown"
            message = _one_line(error.get("Message", ""))
        except BotoCoreError as exc:  # connection lost, timeout: no error code, the class says what
            code, message = type(exc).__name__, _one_line(str(exc))
        raise _ApiError(f"{operation} on target group {arn} failed: {code}: {message}", code)

    def _check_groups(self) -> dict[str, int]:
        """Each group's port, after checking it exists, is in the client's region and takes
        instance targets."""
        ports: dict[str, int] = {}
        for arn in self.arns:
            found = _ARN_REGION.match(arn)
            if self._region and found and found.group(1) != self._region:
                raise TrafficConfigError(
                    f"{SETTING}={arn}: expected a target group in {self._region} (HELIX_AWS_REGION), "
                    f"not {found.group(1)}"
                )
            try:
                # One ARN per call: a missing group fails the whole call without saying which.
                reply = self._call("DescribeTargetGroups", arn, TargetGroupArns=[arn])
            except _ApiError as exc:
                if exc.code in ("TargetGroupNotFound", "ValidationError"):
                    raise TrafficConfigError(
                        f"{SETTING}={arn}: expected an existing target group in this account and region "
                        f"(DescribeTargetGroups: {exc.code})"
                    ) from None
                raise  # the API failed (network, throttling, access): TrafficError, not the setting
            group = next((g for g in reply.get("TargetGroups", []) if g.get("TargetGroupArn") == arn), None)
            if group is None:
                raise TrafficConfigError(f"{SETTING}={arn}: expected an existing target group (none answered)")
            kind = group.get("TargetType", "")
            if kind != "instance":
                raise TrafficConfigError(
                    f"{SETTING}={arn}: expected target type instance, the group has {kind or 'none'}"
                )
            ports[arn] = int(group["Port"])
        log.info("target groups: %s", ", ".join(f"{a} (port {p})" for a, p in ports.items()))
        return ports

    @staticmethod
    def _ids(instance_ids: Sequence[str]) -> list[str]:
        ids = list(dict.fromkeys(instance_ids))
        for iid in ids:
            if not _INSTANCE_ID.fullmatch(iid):
                raise ValueError(f"instance id {iid!r}: expected an EC2 instance id (i- and 8 to 17 hex digits)")
        return ids

    def _each_group(self, operation: str, ids: list[str]) -> None:
        """`operation` on every group, in chunks. A failing group does not stop the others (draining
        starts wherever it can); the first failure is raised after, naming how many failed."""
        failures: list[TrafficError] = []
        for arn in self.arns:
            try:
                for start in range(0, len(ids), _TARGETS_PER_CALL):
                    chunk = ids[start : start + _TARGETS_PER_CALL]
                    if operation == "DeregisterTargets":
                        self._deregister(arn, chunk)
                    else:
                        self._call(operation, arn, TargetGroupArn=arn, Targets=self._targets(arn, chunk))
            except TrafficError as exc:
                failures.append(exc)
        if failures:
            more = f" (and {len(failures) - 1} more target group(s))" if len(failures) > 1 else ""
            raise TrafficError(f"{failures[0]}{more}")

    def _deregister(self, arn: str, ids: list[str]) -> None:
        try:
            self._call("DeregisterTargets", arn, TargetGroupArn=arn, Targets=self._targets(arn, ids))
            return
        except _ApiError as exc:
            if exc.code != "InvalidTarget":
                raise
        # InvalidTarget: one of them is not registered (moto says so; its deregistration is not
        # atomic either) or no longer exists. Either way nothing of it to drain: one by one, so the
        # rest still leave the group.
        for iid in ids:
            try:
                self._call("DeregisterTargets", arn, TargetGroupArn=arn, Targets=self._targets(arn, [iid]))
            except _ApiError as exc:
                if exc.code != "InvalidTarget":
                    raise
                log.info("%s was not registered with %s: nothing to deregister", iid, arn)

    def _targets(self, arn: str, ids: list[str]) -> list[dict[str, Any]]:
        return [{"Id": i, "Port": self.ports[arn]} for i in ids]

    # --- Traffic -----------------------------------------------------------------------------

    def register(self, instance_ids: Sequence[str]) -> None:
        ids = self._ids(instance_ids)
        if ids:
            self._each_group("RegisterTargets", ids)
            log.info("registered %s with %d target group(s)", ", ".join(ids), len(self.arns))

    def deregister(self, instance_ids: Sequence[str]) -> None:
        ids = self._ids(instance_ids)
        if ids:
            self._each_group("DeregisterTargets", ids)
            log.info("deregistered %s from %d target group(s): draining", ", ".join(ids), len(self.arns))

    def states(self, instance_ids: Sequence[str]) -> dict[str, TargetState]:
        ids = self._ids(instance_ids)
        if not ids:
            return {}
        seen: dict[str, list[TargetState]] = {i: [] for i in ids}  # each group's state of each id
        for arn in self.arns:
            reply = self._call("DescribeTargetHealth", arn, TargetGroupArn=arn)
            for desc in reply.get("TargetHealthDescriptions", []):
                iid = desc.get("Target", {}).get("Id", "")
                if iid in seen:  # other targets of a shared group are none of our business
                    seen[iid].append(elb_state(desc.get("TargetHealth", {}).get("State", "")))
        return {iid: worst(found) for iid, found in seen.items()}

    def close(self) -> None:
        close = getattr(self.client, "close", None)
        if close:
            close()


class _ApiError(TrafficError):
    """A TrafficError that keeps the API's error code (what the callers here decide on)."""

    def __init__(self, line: str, code: str):
        super().__init__(line)
        self.code = code
