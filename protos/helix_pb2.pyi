from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Notice(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NOTICE_NONE: _ClassVar[Notice]
    NOTICE_REBALANCE: _ClassVar[Notice]
    NOTICE_INTERRUPTION: _ClassVar[Notice]
NOTICE_NONE: Notice
NOTICE_REBALANCE: Notice
NOTICE_INTERRUPTION: Notice

class HeartbeatRequest(_message.Message):
    __slots__ = ("sent_at",)
    SENT_AT_FIELD_NUMBER: _ClassVar[int]
    sent_at: float
    def __init__(self, sent_at: _Optional[float] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("agent_time", "uptime_seconds", "agent_version", "app_live", "instance_id")
    AGENT_TIME_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    APP_LIVE_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    agent_time: float
    uptime_seconds: float
    agent_version: str
    app_live: bool
    instance_id: str
    def __init__(self, agent_time: _Optional[float] = ..., uptime_seconds: _Optional[float] = ..., agent_version: _Optional[str] = ..., app_live: _Optional[bool] = ..., instance_id: _Optional[str] = ...) -> None: ...

class GetMetricsRequest(_message.Message):
    __slots__ = ("instance_id",)
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    def __init__(self, instance_id: _Optional[str] = ...) -> None: ...

class WatchMetricsRequest(_message.Message):
    __slots__ = ("instance_id", "interval_seconds")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    interval_seconds: float
    def __init__(self, instance_id: _Optional[str] = ..., interval_seconds: _Optional[float] = ...) -> None: ...

class Metrics(_message.Message):
    __slots__ = ("cpu", "vcpus", "mem", "load1", "load5", "load15", "net_rx_bps", "net_tx_bps", "disk", "app_live", "app_detail", "sample_time", "instance_id", "notice", "notice_at", "rps")
    CPU_FIELD_NUMBER: _ClassVar[int]
    VCPUS_FIELD_NUMBER: _ClassVar[int]
    MEM_FIELD_NUMBER: _ClassVar[int]
    LOAD1_FIELD_NUMBER: _ClassVar[int]
    LOAD5_FIELD_NUMBER: _ClassVar[int]
    LOAD15_FIELD_NUMBER: _ClassVar[int]
    NET_RX_BPS_FIELD_NUMBER: _ClassVar[int]
    NET_TX_BPS_FIELD_NUMBER: _ClassVar[int]
    DISK_FIELD_NUMBER: _ClassVar[int]
    APP_LIVE_FIELD_NUMBER: _ClassVar[int]
    APP_DETAIL_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_TIME_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    NOTICE_FIELD_NUMBER: _ClassVar[int]
    NOTICE_AT_FIELD_NUMBER: _ClassVar[int]
    RPS_FIELD_NUMBER: _ClassVar[int]
    cpu: float
    vcpus: int
    mem: float
    load1: float
    load5: float
    load15: float
    net_rx_bps: float
    net_tx_bps: float
    disk: float
    app_live: bool
    app_detail: str
    sample_time: float
    instance_id: str
    notice: Notice
    notice_at: float
    rps: float
    def __init__(self, cpu: _Optional[float] = ..., vcpus: _Optional[int] = ..., mem: _Optional[float] = ..., load1: _Optional[float] = ..., load5: _Optional[float] = ..., load15: _Optional[float] = ..., net_rx_bps: _Optional[float] = ..., net_tx_bps: _Optional[float] = ..., disk: _Optional[float] = ..., app_live: _Optional[bool] = ..., app_detail: _Optional[str] = ..., sample_time: _Optional[float] = ..., instance_id: _Optional[str] = ..., notice: _Optional[_Union[Notice, str]] = ..., notice_at: _Optional[float] = ..., rps: _Optional[float] = ...) -> None: ...

class HookRequest(_message.Message):
    __slots__ = ("instance_id", "timeout_seconds", "reason")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    timeout_seconds: float
    reason: str
    def __init__(self, instance_id: _Optional[str] = ..., timeout_seconds: _Optional[float] = ..., reason: _Optional[str] = ...) -> None: ...

class HookProgress(_message.Message):
    __slots__ = ("result", "elapsed_seconds", "detail")
    class Result(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        RUNNING: _ClassVar[HookProgress.Result]
        CONTINUE: _ClassVar[HookProgress.Result]
        ABANDON: _ClassVar[HookProgress.Result]
        TIMEOUT: _ClassVar[HookProgress.Result]
    RUNNING: HookProgress.Result
    CONTINUE: HookProgress.Result
    ABANDON: HookProgress.Result
    TIMEOUT: HookProgress.Result
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    result: HookProgress.Result
    elapsed_seconds: float
    detail: str
    def __init__(self, result: _Optional[_Union[HookProgress.Result, str]] = ..., elapsed_seconds: _Optional[float] = ..., detail: _Optional[str] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("instance_id", "address", "vcpus", "agent_version", "labels", "instance_secret", "identity_document", "identity_signature", "csr")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    VCPUS_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_SECRET_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_DOCUMENT_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    CSR_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    address: str
    vcpus: int
    agent_version: str
    labels: _containers.ScalarMap[str, str]
    instance_secret: str
    identity_document: bytes
    identity_signature: str
    csr: bytes
    def __init__(self, instance_id: _Optional[str] = ..., address: _Optional[str] = ..., vcpus: _Optional[int] = ..., agent_version: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., instance_secret: _Optional[str] = ..., identity_document: _Optional[bytes] = ..., identity_signature: _Optional[str] = ..., csr: _Optional[bytes] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("slot", "poll_interval", "server_time", "credential", "certificate")
    SLOT_FIELD_NUMBER: _ClassVar[int]
    POLL_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    SERVER_TIME_FIELD_NUMBER: _ClassVar[int]
    CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    slot: int
    poll_interval: float
    server_time: float
    credential: str
    certificate: bytes
    def __init__(self, slot: _Optional[int] = ..., poll_interval: _Optional[float] = ..., server_time: _Optional[float] = ..., credential: _Optional[str] = ..., certificate: _Optional[bytes] = ...) -> None: ...

class DeregisterRequest(_message.Message):
    __slots__ = ("instance_id", "reason")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    reason: str
    def __init__(self, instance_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class DeregisterResponse(_message.Message):
    __slots__ = ("found",)
    FOUND_FIELD_NUMBER: _ClassVar[int]
    found: bool
    def __init__(self, found: _Optional[bool] = ...) -> None: ...
