"""The `ec2` provider: instances on AWS EC2, through boto3.

Ownership: every instance Helix launches carries the tags `helix:group=<HELIX_GROUP>`, `Name` and
`helix:launch-token=<token>`. Helix lists, counts and terminates only instances with its group tag
*and* a launch token (the evidence that Helix launched it: anyone can put a group tag on an
instance); an instance without both, or of another group, is never touched (the seed terminated
every instance in the account at start-up). Nor is the manager's own instance, whatever its tags:
its id is learned once, from HELIX_EC2_MANAGER_INSTANCE_ID or instance metadata (IMDSv2 at
HELIX_IMDS_URL; no answer: the manager is not on EC2).

Launches:
  * from HELIX_EC2_LAUNCH_TEMPLATE (id `lt-…` or name), or HELIX_EC2_AMI + type + subnets +
    security groups (+ optional key pair and instance profile);
  * spread over HELIX_EC2_SUBNETS (the least-used subnet first); a subnet that answers with a
    capacity error (InsufficientInstanceCapacity and kin) is skipped for the next one;
  * idempotent: AWS deduplicates on `ClientToken`; moto (and a controller that restarted
    mid-launch) does not, so `launch` first looks up instances tagged with the launch token and
    launches only what is missing. RunInstances goes through a client with no automatic retry:
    after a lost reply, the token lookup decides whether to send it again;
  * never waits for `instance_running`: a fresh instance is reported `pending`.

Scale-in protection: tag an instance `helix:protected=true`.
Credentials: HELIX_AWS_ACCESS_KEY/SECRET_KEY/SESSION_TOKEN (the seed's .env keys) when set, else
boto3's default chain (an instance profile on the manager VM). Region: HELIX_AWS_REGION
(AWS_REGION, REGION) or boto3's default. Throttling: botocore's adaptive retry mode.

The least-privilege IAM policy for this module is generated from the configuration by
`python -m controller_asg.iam` (deploy/iam-policy.json is its output for the defaults). Every
operation this module calls is in OPERATIONS; every request it sends is kept in `calls` (the last
CALLS_KEPT), and the moto tests check each one is allowed by the generated policy.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import logging
import re
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from controller_asg.providers.base import LaunchConfig, LaunchError, ProviderInstance
from controller_asg.providers.userdata import render_user_data
from shared import pki
from shared.config import Config

log = logging.getLogger("controller_asg.providers.ec2")

GROUP_TAG = "helix:group"
TOKEN_TAG = "helix:launch-token"
PROTECTED_TAG = "helix:protected"
CONFIG_TAG = "helix:config"  # the digest of the LaunchConfig an instance was launched from
EPOCH_TAG = "helix:epoch"  # the leader lease's epoch a launch was made under (with HELIX_LEASE)
# Every tag key a launch request sets (the IAM policy allows these and no other).
LAUNCH_TAG_KEYS = (GROUP_TAG, "Name", TOKEN_TAG, CONFIG_TAG, EPOCH_TAG)
# Every EC2 API operation this module calls; the policy controller_asg/iam.py generates allows each
# (tested, and every recorded request against it in the moto tests).
# CreateTags is not called directly: RunInstances' TagSpecifications need it (tag-on-create).
OPERATIONS = ("DescribeInstances", "RunInstances", "TerminateInstances", "CreateTags")
# Only with a warm pool (HELIX_WARM_POOL_SIZE): the generated policy allows them only then.
POOL_OPERATIONS = ("StopInstances", "StartInstances")
LIVE_STATES = ("pending", "running", "shutting-down", "stopping", "stopped")
# Errors that concern one subnet/zone: try the next subnet.
ZONE_ERRORS = frozenset(
    {
        "InsufficientInstanceCapacity",
        "InsufficientCapacity",
        "InsufficientHostCapacity",
        "InsufficientFreeAddressesInSubnet",
        "InsufficientCapacityOnHost",
        "Unsupported",
        "InvalidSubnetID.NotFound",
        "InvalidSubnet",
    }
)
# A RunInstances whose reply may have been lost: the instances may exist; look before resending.
_LAUNCH_ATTEMPTS = 3
_IDS_PER_CALL = 100
# Requests kept in `Ec2Provider.calls`: bounded, the controller runs for months.
CALLS_KEPT = 1000


@dataclass
class ApiCall:
    """One EC2 request as sent: what the IAM policy is checked against (tests) and debugging."""

    operation: str
    # The parameters given to boto3, without UserData (it holds the bearer token, and IAM never
    # looks at it).
    params: dict[str, Any]
    region: str


def _state(ec2_state: str) -> str:
    if ec2_state == "pending":
        return "pending"
    if ec2_state == "shutting-down":
        return "terminating"
    if ec2_state in ("stopping", "stopped"):
        # Billed for disks only: a warm-pool instance, or one somebody stopped (the controller does
        # not count it as capacity either way).
        return "stopped"
    return "running"


def _tags(instance: dict) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in instance.get("Tags", [])}


def _client_token(token: str, subnet: str, count: int, done: int) -> str:
    """AWS's ClientToken (≤ 64 ASCII): the same request (token, subnet, size, progress) gets the
    same one, a different request a different one (AWS rejects a reused token with new params)."""
    digest = hashlib.sha256(f"{token}|{subnet}|{count}|{done}".encode()).hexdigest()[:24]
    return "helix-" + re.sub(r"[^A-Za-z0-9-]", "-", token[:32]) + "-" + digest


class Ec2Provider:
    name = "ec2"

    def __init__(
        self, cfg: Config, *, client: Any = None, launch_client: Any = None, sleep: Callable[[float], None] = time.sleep
    ):
        self.cfg = cfg
        self.group = cfg.group_name
        self.sleep = sleep
        if client is None or launch_client is None:
            made, made_launch = self._make_clients(cfg)
            client = client or made
            launch_client = launch_client or made_launch
        self.client = client
        self.launch_client = launch_client
        self._bearer = cfg.resolved_token()
        # HELIX_TLS_MODE=ca: the manager CA's public certificate, which every instance gets in its
        # user data (read once; `python -m controller_asg` has checked it is there).
        self._ca_pem = pki.read_ca_certificate(cfg.effective_pki_dir).decode() if cfg.effective_tls_mode == "ca" else ""
        # Operation names actually sent (what the IAM policy test compares against OPERATIONS),
        # and the requests themselves (what it checks against the generated policy).
        self.operations_called: set[str] = set()
        self.calls: deque[ApiCall] = deque(maxlen=CALLS_KEPT)
        self._region = str(client.meta.region_name or "")
        for c in {id(client): client, id(launch_client): launch_client}.values():
            c.meta.events.register("before-parameter-build.ec2", self._record_operation)
        self._manager_id: str | None = None  # learned on first use
        self._ignored: set[str] = set()  # group-tagged ids without launch evidence, logged once

    @staticmethod
    def _make_clients(cfg: Config) -> tuple[Any, Any]:
        from botocore.config import Config as BotoConfig

        from controller_asg.providers.aws import aws_session

        session = aws_session(cfg)
        common = dict(connect_timeout=5, read_timeout=20, user_agent_extra="helix-controller")
        endpoint = cfg.ec2_endpoint_url or None
        client = session.client(
            "ec2", endpoint_url=endpoint, config=BotoConfig(retries={"mode": "adaptive", "max_attempts": 5}, **common)
        )
        # RunInstances is not idempotent on every endpoint: no blind retries, the token lookup
        # decides (adaptive mode still rate-limits it client-side).
        launch_client = session.client(
            "ec2",
            endpoint_url=endpoint,
            config=BotoConfig(retries={"mode": "adaptive", "total_max_attempts": 1}, **common),
        )
        return client, launch_client

    def _record_operation(self, model: Any = None, params: Any = None, **_: Any) -> None:
        if model is None:
            return
        self.operations_called.add(model.name)
        kept = {k: copy.deepcopy(v) for k, v in (params or {}).items() if k != "UserData"}
        self.calls.append(ApiCall(model.name, kept, self._region))

    # --- ownership ---------------------------------------------------------------------------

    def manager_instance_id(self) -> str:
        """The manager's own instance id ('' when not on EC2), learned once: the setting, else
        instance metadata. Helix never counts or terminates it, whatever its tags."""
        if self._manager_id is None:
            self._manager_id = self._learn_manager_id()
        return self._manager_id

    def _learn_manager_id(self) -> str:
        if self.cfg.ec2_manager_instance_id:
            found, source = self.cfg.ec2_manager_instance_id, "HELIX_EC2_MANAGER_INSTANCE_ID"
        elif self.cfg.imds_url:
            from monitor_c.identity import imds_lookup  # the one IMDSv2 client (short timeouts)

            found, source = imds_lookup(self.cfg.imds_url).get("instance_id", ""), "instance metadata"
        else:
            found, source = "", "HELIX_IMDS_URL is empty"
        if found:
            log.info("manager instance is %s (from %s): never counted, never terminated", found, source)
        else:
            log.info("no manager instance id (%s did not give one): assuming the manager is not on EC2", source)
        return found

    def _refusal(self, instance_id: str, inst: dict | None) -> str:
        """Why `inst` (None: not found with this group's tag) is not ours; '' when it is."""
        if instance_id == self.manager_instance_id():
            return "the manager's own instance"
        if inst is None:
            return f"not an instance of group {self.group}"
        if not _tags(inst).get(TOKEN_TAG):
            return f"carries {GROUP_TAG}={self.group} but no {TOKEN_TAG} tag (no evidence Helix launched it)"
        return ""

    def _ours(self, insts: Iterable[dict]) -> list[dict]:
        """The instances Helix launched (group tag and launch token) other than the manager; each
        one left out is logged once."""
        out = []
        for inst in insts:
            why = self._refusal(inst["InstanceId"], inst)
            if not why:
                out.append(inst)
            elif inst["InstanceId"] not in self._ignored:
                self._ignored.add(inst["InstanceId"])
                log.warning("ignoring %s: %s", inst["InstanceId"], why)
        return out

    # --- listing -----------------------------------------------------------------------------

    def _describe(self, filters: list[dict]) -> list[dict]:
        out = []
        paginator = self.client.get_paginator("describe_instances")
        for page in paginator.paginate(Filters=[{"Name": f"tag:{GROUP_TAG}", "Values": [self.group]}, *filters]):
            for reservation in page.get("Reservations", []):
                for inst in reservation.get("Instances", []):
                    # Belt and braces: never trust a filter alone with ownership.
                    if _tags(inst).get(GROUP_TAG) == self.group:
                        out.append(inst)
        return out

    @staticmethod
    def _to_instance(inst: dict) -> ProviderInstance:
        launched = inst.get("LaunchTime")
        return ProviderInstance(
            instance_id=inst["InstanceId"],
            zone=inst.get("Placement", {}).get("AvailabilityZone", ""),
            launched_at=launched.timestamp() if isinstance(launched, dt.datetime) else time.time(),
            state=_state(inst.get("State", {}).get("Name", "pending")),
            protected=_tags(inst).get(PROTECTED_TAG, "").lower() == "true",
            address=inst.get("PrivateIpAddress", "") or "",
            launch_token=_tags(inst).get(TOKEN_TAG, ""),
            config=_tags(inst).get(CONFIG_TAG, ""),
        )

    def list_instances(self) -> list[ProviderInstance]:
        """One paginated DescribeInstances: this group's tag, non-terminated states; only what Helix
        launched (a launch token), never the manager."""
        insts = self._describe([{"Name": "instance-state-name", "Values": list(LIVE_STATES)}])
        return [self._to_instance(i) for i in self._ours(insts)]

    # --- launching ---------------------------------------------------------------------------

    def launch_config(self) -> LaunchConfig:
        """Image, type, template and version as the settings give them, and the user data's hash
        (it changes with the agent's settings, e.g. MonitorS's address or the CA)."""
        cfg = self.cfg
        user_data = render_user_data(cfg, self._bearer, {"group": self.group}, self._ca_pem)
        values = {"image": cfg.ec2_ami, "user_data": hashlib.sha256(user_data.encode()).hexdigest()[:16]}
        if cfg.ec2_launch_template:
            values["launch_template"] = cfg.ec2_launch_template
            values["template_version"] = cfg.ec2_launch_template_version
        else:
            values["instance_type"] = cfg.ec2_instance_type
        return LaunchConfig.of(values)

    def launch(
        self, count: int, token: str, config: LaunchConfig | None = None, *, epoch: int = 0
    ) -> list[ProviderInstance]:
        config = config or self.launch_config()
        if count < 0:
            raise ValueError(f"count={count}: expected 0 or more")
        if not token or len(token) > 128:
            raise ValueError(f"token={token!r}: expected 1 to 128 characters")
        # One call sees both: instances already launched under this token (in any state, so a
        # launch whose instances died meanwhile is not redone) and the live ones (for the spread).
        everything = self._ours(self._describe([]))
        mine = [i for i in everything if _tags(i).get(TOKEN_TAG) == token]
        live = [i for i in everything if i.get("State", {}).get("Name") in LIVE_STATES]
        out = [self._to_instance(i) for i in mine if i.get("State", {}).get("Name") in LIVE_STATES]
        missing = count - len(mine)
        if missing <= 0:
            if mine:
                log.info(
                    "launch %s already done (%s); nothing new launched", token, ", ".join(i["InstanceId"] for i in mine)
                )
            return out

        known = {i["InstanceId"] for i in mine}
        subnets = list(self.cfg.ec2_subnets)
        if not subnets:  # the launch template places the instances
            try:
                return out + self._run(None, missing, token, known, config, epoch)
            except _ZoneError as exc:
                raise LaunchError(f"launch {token}: RunInstances refused: {exc}") from None

        used = {s: 0 for s in subnets}
        for inst in live:
            if inst.get("SubnetId") in used:
                used[inst["SubnetId"]] += 1
        plan: dict[str, int] = {}
        for _ in range(missing):
            best = min(subnets, key=lambda s: used[s] + plan.get(s, 0))  # ties: first in config order
            plan[best] = plan.get(best, 0) + 1

        failed: dict[str, str] = {}
        unplaced = 0
        while plan:
            subnet = next(iter(plan))
            n = plan.pop(subnet)
            try:
                got = self._run(subnet, n, token, known, config, epoch)
            except _ZoneError as exc:
                failed[subnet] = str(exc)
                others = sorted((s for s in subnets if s not in failed), key=lambda s: used[s] + plan.get(s, 0))
                log.warning(
                    "launch %s: subnet %s refused %d instance(s) (%s); %s",
                    token,
                    subnet,
                    n,
                    exc,
                    f"trying {others[0]}" if others else "no subnet left",
                )
                if others:
                    plan[others[0]] = plan.get(others[0], 0) + n
                else:
                    unplaced += n
                continue
            known.update(i.instance_id for i in got)
            used[subnet] += len(got)
            out += got
        if unplaced:
            why = "; ".join(f"{s}: {e}" for s, e in failed.items())
            if len(known) == len(mine):
                raise LaunchError(f"launch {token}: every subnet refused the {unplaced} instance(s): {why}")
            log.error("launch %s: %d instance(s) could not be placed in any subnet: %s", token, unplaced, why)
        return out

    def _run(
        self, subnet: str | None, n: int, token: str, known: set[str], config: LaunchConfig, epoch: int = 0
    ) -> list[ProviderInstance]:
        """RunInstances for `n` in `subnet`; after a lost reply, looks for the token's instances first.

        `known`: the token's instances from before this call (a new one is from this call, since
        RunInstances launches all `n` or none)."""
        from botocore.exceptions import BotoCoreError, ClientError

        params = self._run_params(subnet, n, token, len(known), config, epoch)
        last: Exception | None = None
        in_doubt = False
        for attempt in range(_LAUNCH_ATTEMPTS):
            if attempt:
                self.sleep(min(2.0, 0.25 * 2**attempt))
                found = self._ours(self._describe([{"Name": f"tag:{TOKEN_TAG}", "Values": [token]}]))
                new = [i for i in found if i["InstanceId"] not in known]
                if new:
                    log.info(
                        "launch %s: the RunInstances whose reply was lost had launched %s; not resent",
                        token,
                        ", ".join(i["InstanceId"] for i in new),
                    )
                    return [self._to_instance(i) for i in new]
            try:
                reply = self.launch_client.run_instances(**params)
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code", "")
                message = exc.response.get("Error", {}).get("Message", "")
                if code in ZONE_ERRORS:
                    raise _ZoneError(f"{code}: {message}") from None
                if code in ("RequestLimitExceeded", "Throttling", "InternalError", "ServiceUnavailable"):
                    last = exc
                    continue
                raise LaunchError(f"launch {token}: RunInstances failed: {code}: {message}") from None
            except BotoCoreError as exc:  # connection lost, read timeout: the reply is unknown
                last, in_doubt = exc, True
                log.warning("launch %s: RunInstances reply lost (%s); looking before resending", token, exc)
                continue
            got = [self._to_instance(i) for i in reply.get("Instances", [])]
            log.info(
                "launched %s in %s (launch %s)",
                ", ".join(i.instance_id for i in got),
                subnet or "the template's placement",
                token,
            )
            return got
        if in_doubt:
            # Not a LaunchError: the instances may exist, so the caller must retry with this token.
            raise LaunchInDoubt(
                f"launch {token}: RunInstances replies lost {_LAUNCH_ATTEMPTS} times and no instance found yet: {last}"
            )
        raise LaunchError(f"launch {token}: RunInstances failed {_LAUNCH_ATTEMPTS} times: {last}")

    def _run_params(
        self, subnet: str | None, n: int, token: str, done: int, config: LaunchConfig, epoch: int = 0
    ) -> dict:
        """`config`: usually the settings' own; a refresh rolling back passes an earlier one, whose
        image, type and template version win (the user data is always rendered from the settings)."""
        cfg = self.cfg
        spec = config.as_dict()
        tags = [
            {"Key": GROUP_TAG, "Value": self.group},
            {"Key": "Name", "Value": f"helix-{self.group}"},
            {"Key": TOKEN_TAG, "Value": token},
            {"Key": CONFIG_TAG, "Value": config.digest},
        ]
        if epoch:
            tags.append({"Key": EPOCH_TAG, "Value": str(epoch)})
        params: dict[str, Any] = {
            "MinCount": n,
            "MaxCount": n,
            "ClientToken": _client_token(token, subnet or "", n, done),
            "UserData": render_user_data(cfg, self._bearer, {"group": self.group}, self._ca_pem),
            "TagSpecifications": [
                {"ResourceType": "instance", "Tags": tags},
                {"ResourceType": "volume", "Tags": tags[:2]},
            ],
        }
        template = spec.get("launch_template", "")
        if template:
            key = "LaunchTemplateId" if template.startswith("lt-") else "LaunchTemplateName"
            params["LaunchTemplate"] = {key: template, "Version": spec.get("template_version") or "$Default"}
            # The template's type and image win unless set here explicitly.
            if spec.get("image"):
                params["ImageId"] = spec["image"]
        else:
            params["ImageId"] = spec.get("image") or cfg.ec2_ami
            params["InstanceType"] = spec.get("instance_type") or cfg.ec2_instance_type
        if subnet:
            params["SubnetId"] = subnet
        if cfg.ec2_security_groups:
            params["SecurityGroupIds"] = list(cfg.ec2_security_groups)
        if cfg.ec2_key_name:
            params["KeyName"] = cfg.ec2_key_name
        if cfg.ec2_instance_profile:
            key = "Arn" if cfg.ec2_instance_profile.startswith("arn:") else "Name"
            params["IamInstanceProfile"] = {key: cfg.ec2_instance_profile}
        return params

    # --- terminating -------------------------------------------------------------------------

    def terminate(self, instance_ids: Sequence[str]) -> None:
        """Terminate exactly the ids asked for that Helix launched (this group's tag and a launch
        token), never the manager's own instance; refuse (log, never touch) the rest."""
        asked = list(dict.fromkeys(instance_ids))
        if not asked:
            return
        found: dict[str, dict] = {}
        for start in range(0, len(asked), _IDS_PER_CALL):  # EC2 caps the values of one filter
            chunk = asked[start : start + _IDS_PER_CALL]
            found.update((i["InstanceId"], i) for i in self._describe([{"Name": "instance-id", "Values": chunk}]))
        refused: dict[str, list[str]] = {}
        targets = []
        for iid in asked:
            why = self._refusal(iid, found.get(iid))
            if why:
                refused.setdefault(why, []).append(iid)
            else:
                targets.append(iid)
        for why, ids in refused.items():
            log.warning("terminate refused for %s: %s", ", ".join(ids), why)
        for start in range(0, len(targets), _IDS_PER_CALL):
            chunk = targets[start : start + _IDS_PER_CALL]
            self.client.terminate_instances(InstanceIds=chunk)
            log.info("terminating %s", ", ".join(chunk))

    def stop(self, instance_ids: Sequence[str]) -> None:
        """StopInstances of the ids Helix launched (as `terminate` decides), for the warm pool."""
        self._owned_call("stop", instance_ids, self.client.stop_instances)

    def start(self, instance_ids: Sequence[str]) -> None:
        self._owned_call("start", instance_ids, self.client.start_instances)

    def _owned_call(self, verb: str, instance_ids: Sequence[str], call: Callable[..., Any]) -> None:
        asked = list(dict.fromkeys(instance_ids))
        found: dict[str, dict] = {}
        for begin in range(0, len(asked), _IDS_PER_CALL):
            chunk = asked[begin : begin + _IDS_PER_CALL]
            found.update((i["InstanceId"], i) for i in self._describe([{"Name": "instance-id", "Values": chunk}]))
        targets = []
        for iid in asked:
            why = self._refusal(iid, found.get(iid))
            if why:
                log.warning("%s refused for %s: %s", verb, iid, why)
            else:
                targets.append(iid)
        for begin in range(0, len(targets), _IDS_PER_CALL):
            chunk = targets[begin : begin + _IDS_PER_CALL]
            call(InstanceIds=chunk)
            log.info("%s %s", "stopping" if verb == "stop" else "starting", ", ".join(chunk))

    def close(self) -> None:
        for c in {id(self.client): self.client, id(self.launch_client): self.launch_client}.values():
            close = getattr(c, "close", None)
            if close:
                close()


class LaunchInDoubt(Exception):
    """RunInstances may or may not have launched: retry `launch` with the same token (which finds
    them, or lets AWS deduplicate on the ClientToken). Deliberately not a LaunchError, which tells
    the controller to give the launch up."""


class _ZoneError(Exception):
    """RunInstances refused for a reason tied to one subnet/zone."""
