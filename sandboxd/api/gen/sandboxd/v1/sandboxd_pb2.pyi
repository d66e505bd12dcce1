from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STATUS_UNSPECIFIED: _ClassVar[Status]
    STATUS_OK: _ClassVar[Status]
    STATUS_RUNTIME_ERROR: _ClassVar[Status]
    STATUS_SIGNALED: _ClassVar[Status]
    STATUS_TIME_LIMIT: _ClassVar[Status]
    STATUS_WALL_TIME_LIMIT: _ClassVar[Status]
    STATUS_MEMORY_LIMIT: _ClassVar[Status]
    STATUS_OUTPUT_LIMIT: _ClassVar[Status]
    STATUS_SYSCALL_DENIED: _ClassVar[Status]
    STATUS_CANCELLED: _ClassVar[Status]
STATUS_UNSPECIFIED: Status
STATUS_OK: Status
STATUS_RUNTIME_ERROR: Status
STATUS_SIGNALED: Status
STATUS_TIME_LIMIT: Status
STATUS_WALL_TIME_LIMIT: Status
STATUS_MEMORY_LIMIT: Status
STATUS_OUTPUT_LIMIT: Status
STATUS_SYSCALL_DENIED: Status
STATUS_CANCELLED: Status

class EnvVar(_message.Message):
    __slots__ = ("name", "value")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    name: str
    value: str
    def __init__(self, name: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...

class InputFile(_message.Message):
    __slots__ = ("name", "content", "mode")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    name: str
    content: bytes
    mode: int
    def __init__(self, name: _Optional[str] = ..., content: _Optional[bytes] = ..., mode: _Optional[int] = ...) -> None: ...

class BindRequest(_message.Message):
    __slots__ = ("source", "target", "writable")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    WRITABLE_FIELD_NUMBER: _ClassVar[int]
    source: str
    target: str
    writable: bool
    def __init__(self, source: _Optional[str] = ..., target: _Optional[str] = ..., writable: _Optional[bool] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("cpu_time_ms", "wall_time_ms", "memory_bytes", "pids", "cpu_quota", "stdout_bytes", "stderr_bytes", "file_size_bytes", "open_files", "stack_bytes", "address_space_bytes")
    CPU_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    WALL_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    PIDS_FIELD_NUMBER: _ClassVar[int]
    CPU_QUOTA_FIELD_NUMBER: _ClassVar[int]
    STDOUT_BYTES_FIELD_NUMBER: _ClassVar[int]
    STDERR_BYTES_FIELD_NUMBER: _ClassVar[int]
    FILE_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    OPEN_FILES_FIELD_NUMBER: _ClassVar[int]
    STACK_BYTES_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_SPACE_BYTES_FIELD_NUMBER: _ClassVar[int]
    cpu_time_ms: int
    wall_time_ms: int
    memory_bytes: int
    pids: int
    cpu_quota: float
    stdout_bytes: int
    stderr_bytes: int
    file_size_bytes: int
    open_files: int
    stack_bytes: int
    address_space_bytes: int
    def __init__(self, cpu_time_ms: _Optional[int] = ..., wall_time_ms: _Optional[int] = ..., memory_bytes: _Optional[int] = ..., pids: _Optional[int] = ..., cpu_quota: _Optional[float] = ..., stdout_bytes: _Optional[int] = ..., stderr_bytes: _Optional[int] = ..., file_size_bytes: _Optional[int] = ..., open_files: _Optional[int] = ..., stack_bytes: _Optional[int] = ..., address_space_bytes: _Optional[int] = ...) -> None: ...

class ExecuteRequest(_message.Message):
    __slots__ = ("argv", "env", "cwd", "files", "stdin", "policy", "seccomp_profile", "limits", "network", "output_files", "labels", "binds")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ARGV_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    CWD_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    STDIN_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    SECCOMP_PROFILE_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    NETWORK_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FILES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    BINDS_FIELD_NUMBER: _ClassVar[int]
    argv: _containers.RepeatedScalarFieldContainer[str]
    env: _containers.RepeatedCompositeFieldContainer[EnvVar]
    cwd: str
    files: _containers.RepeatedCompositeFieldContainer[InputFile]
    stdin: bytes
    policy: str
    seccomp_profile: str
    limits: Limits
    network: str
    output_files: _containers.RepeatedScalarFieldContainer[str]
    labels: _containers.ScalarMap[str, str]
    binds: _containers.RepeatedCompositeFieldContainer[BindRequest]
    def __init__(self, argv: _Optional[_Iterable[str]] = ..., env: _Optional[_Iterable[_Union[EnvVar, _Mapping]]] = ..., cwd: _Optional[str] = ..., files: _Optional[_Iterable[_Union[InputFile, _Mapping]]] = ..., stdin: _Optional[bytes] = ..., policy: _Optional[str] = ..., seccomp_profile: _Optional[str] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., network: _Optional[str] = ..., output_files: _Optional[_Iterable[str]] = ..., labels: _Optional[_Mapping[str, str]] = ..., binds: _Optional[_Iterable[_Union[BindRequest, _Mapping]]] = ...) -> None: ...

class CloseStdin(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ExecuteStreamRequest(_message.Message):
    __slots__ = ("start", "stdin", "close_stdin")
    START_FIELD_NUMBER: _ClassVar[int]
    STDIN_FIELD_NUMBER: _ClassVar[int]
    CLOSE_STDIN_FIELD_NUMBER: _ClassVar[int]
    start: ExecuteRequest
    stdin: bytes
    close_stdin: CloseStdin
    def __init__(self, start: _Optional[_Union[ExecuteRequest, _Mapping]] = ..., stdin: _Optional[bytes] = ..., close_stdin: _Optional[_Union[CloseStdin, _Mapping]] = ...) -> None: ...

class BatchCase(_message.Message):
    __slots__ = ("name", "stdin", "limits", "files")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STDIN_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    name: str
    stdin: bytes
    limits: Limits
    files: _containers.RepeatedCompositeFieldContainer[InputFile]
    def __init__(self, name: _Optional[str] = ..., stdin: _Optional[bytes] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., files: _Optional[_Iterable[_Union[InputFile, _Mapping]]] = ...) -> None: ...

class ExecuteBatchRequest(_message.Message):
    __slots__ = ("program", "cases", "stop_on_failure")
    PROGRAM_FIELD_NUMBER: _ClassVar[int]
    CASES_FIELD_NUMBER: _ClassVar[int]
    STOP_ON_FAILURE_FIELD_NUMBER: _ClassVar[int]
    program: ExecuteRequest
    cases: _containers.RepeatedCompositeFieldContainer[BatchCase]
    stop_on_failure: bool
    def __init__(self, program: _Optional[_Union[ExecuteRequest, _Mapping]] = ..., cases: _Optional[_Iterable[_Union[BatchCase, _Mapping]]] = ..., stop_on_failure: _Optional[bool] = ...) -> None: ...

class ExplainRequest(_message.Message):
    __slots__ = ("request",)
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    request: ExecuteRequest
    def __init__(self, request: _Optional[_Union[ExecuteRequest, _Mapping]] = ...) -> None: ...

class PolicyFile(_message.Message):
    __slots__ = ("name", "content")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    name: str
    content: str
    def __init__(self, name: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class ValidatePolicyRequest(_message.Message):
    __slots__ = ("files",)
    FILES_FIELD_NUMBER: _ClassVar[int]
    files: _containers.RepeatedCompositeFieldContainer[PolicyFile]
    def __init__(self, files: _Optional[_Iterable[_Union[PolicyFile, _Mapping]]] = ...) -> None: ...

class HostInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DeniedSyscall(_message.Message):
    __slots__ = ("name", "count", "action")
    NAME_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    count: int
    action: str
    def __init__(self, name: _Optional[str] = ..., count: _Optional[int] = ..., action: _Optional[str] = ...) -> None: ...

class OutputFile(_message.Message):
    __slots__ = ("name", "content", "size_bytes", "truncated", "error")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    name: str
    content: bytes
    size_bytes: int
    truncated: bool
    error: str
    def __init__(self, name: _Optional[str] = ..., content: _Optional[bytes] = ..., size_bytes: _Optional[int] = ..., truncated: _Optional[bool] = ..., error: _Optional[str] = ...) -> None: ...

class Decision(_message.Message):
    __slots__ = ("allowed", "tenant", "policy", "notes", "denied_field", "reason")
    ALLOWED_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    NOTES_FIELD_NUMBER: _ClassVar[int]
    DENIED_FIELD_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    allowed: bool
    tenant: str
    policy: str
    notes: _containers.RepeatedScalarFieldContainer[str]
    denied_field: str
    reason: str
    def __init__(self, allowed: _Optional[bool] = ..., tenant: _Optional[str] = ..., policy: _Optional[str] = ..., notes: _Optional[_Iterable[str]] = ..., denied_field: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class RunResult(_message.Message):
    __slots__ = ("status", "exit_code", "signal", "signal_name", "cpu_time_ms", "wall_time_ms", "peak_memory_bytes", "oom_kills", "killed_by_sandbox", "kill_reason", "denied_syscalls", "stdout", "stderr", "stdout_truncated", "stderr_truncated", "files", "attestation")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_NAME_FIELD_NUMBER: _ClassVar[int]
    CPU_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    WALL_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    PEAK_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    OOM_KILLS_FIELD_NUMBER: _ClassVar[int]
    KILLED_BY_SANDBOX_FIELD_NUMBER: _ClassVar[int]
    KILL_REASON_FIELD_NUMBER: _ClassVar[int]
    DENIED_SYSCALLS_FIELD_NUMBER: _ClassVar[int]
    STDOUT_FIELD_NUMBER: _ClassVar[int]
    STDERR_FIELD_NUMBER: _ClassVar[int]
    STDOUT_TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    STDERR_TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    ATTESTATION_FIELD_NUMBER: _ClassVar[int]
    status: Status
    exit_code: int
    signal: int
    signal_name: str
    cpu_time_ms: float
    wall_time_ms: float
    peak_memory_bytes: int
    oom_kills: int
    killed_by_sandbox: bool
    kill_reason: str
    denied_syscalls: _containers.RepeatedCompositeFieldContainer[DeniedSyscall]
    stdout: bytes
    stderr: bytes
    stdout_truncated: bool
    stderr_truncated: bool
    files: _containers.RepeatedCompositeFieldContainer[OutputFile]
    attestation: _struct_pb2.Struct
    def __init__(self, status: _Optional[_Union[Status, str]] = ..., exit_code: _Optional[int] = ..., signal: _Optional[int] = ..., signal_name: _Optional[str] = ..., cpu_time_ms: _Optional[float] = ..., wall_time_ms: _Optional[float] = ..., peak_memory_bytes: _Optional[int] = ..., oom_kills: _Optional[int] = ..., killed_by_sandbox: _Optional[bool] = ..., kill_reason: _Optional[str] = ..., denied_syscalls: _Optional[_Iterable[_Union[DeniedSyscall, _Mapping]]] = ..., stdout: _Optional[bytes] = ..., stderr: _Optional[bytes] = ..., stdout_truncated: _Optional[bool] = ..., stderr_truncated: _Optional[bool] = ..., files: _Optional[_Iterable[_Union[OutputFile, _Mapping]]] = ..., attestation: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class ExecuteResponse(_message.Message):
    __slots__ = ("run_id", "result", "decision")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    result: RunResult
    decision: Decision
    def __init__(self, run_id: _Optional[str] = ..., result: _Optional[_Union[RunResult, _Mapping]] = ..., decision: _Optional[_Union[Decision, _Mapping]] = ...) -> None: ...

class Started(_message.Message):
    __slots__ = ("run_id", "decision")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    decision: Decision
    def __init__(self, run_id: _Optional[str] = ..., decision: _Optional[_Union[Decision, _Mapping]] = ...) -> None: ...

class ExecuteStreamResponse(_message.Message):
    __slots__ = ("started", "stdout", "stderr", "result")
    STARTED_FIELD_NUMBER: _ClassVar[int]
    STDOUT_FIELD_NUMBER: _ClassVar[int]
    STDERR_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    started: Started
    stdout: bytes
    stderr: bytes
    result: ExecuteResponse
    def __init__(self, started: _Optional[_Union[Started, _Mapping]] = ..., stdout: _Optional[bytes] = ..., stderr: _Optional[bytes] = ..., result: _Optional[_Union[ExecuteResponse, _Mapping]] = ...) -> None: ...

class CaseResult(_message.Message):
    __slots__ = ("name", "run_id", "result", "skipped")
    NAME_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    name: str
    run_id: str
    result: RunResult
    skipped: bool
    def __init__(self, name: _Optional[str] = ..., run_id: _Optional[str] = ..., result: _Optional[_Union[RunResult, _Mapping]] = ..., skipped: _Optional[bool] = ...) -> None: ...

class ExecuteBatchResponse(_message.Message):
    __slots__ = ("decision", "cases")
    DECISION_FIELD_NUMBER: _ClassVar[int]
    CASES_FIELD_NUMBER: _ClassVar[int]
    decision: Decision
    cases: _containers.RepeatedCompositeFieldContainer[CaseResult]
    def __init__(self, decision: _Optional[_Union[Decision, _Mapping]] = ..., cases: _Optional[_Iterable[_Union[CaseResult, _Mapping]]] = ...) -> None: ...

class ExplainResponse(_message.Message):
    __slots__ = ("decision", "plan_json")
    DECISION_FIELD_NUMBER: _ClassVar[int]
    PLAN_JSON_FIELD_NUMBER: _ClassVar[int]
    decision: Decision
    plan_json: str
    def __init__(self, decision: _Optional[_Union[Decision, _Mapping]] = ..., plan_json: _Optional[str] = ...) -> None: ...

class PolicyProblem(_message.Message):
    __slots__ = ("file", "line", "column", "key_path", "reason")
    FILE_FIELD_NUMBER: _ClassVar[int]
    LINE_FIELD_NUMBER: _ClassVar[int]
    COLUMN_FIELD_NUMBER: _ClassVar[int]
    KEY_PATH_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    file: str
    line: int
    column: int
    key_path: str
    reason: str
    def __init__(self, file: _Optional[str] = ..., line: _Optional[int] = ..., column: _Optional[int] = ..., key_path: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ValidatePolicyResponse(_message.Message):
    __slots__ = ("ok", "problems", "policies")
    OK_FIELD_NUMBER: _ClassVar[int]
    PROBLEMS_FIELD_NUMBER: _ClassVar[int]
    POLICIES_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    problems: _containers.RepeatedCompositeFieldContainer[PolicyProblem]
    policies: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, ok: _Optional[bool] = ..., problems: _Optional[_Iterable[_Union[PolicyProblem, _Mapping]]] = ..., policies: _Optional[_Iterable[str]] = ...) -> None: ...

class HostInfoResponse(_message.Message):
    __slots__ = ("info", "server_version")
    INFO_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    info: _struct_pb2.Struct
    server_version: str
    def __init__(self, info: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., server_version: _Optional[str] = ...) -> None: ...
