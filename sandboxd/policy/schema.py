"""The policy file schema: one frozen dataclass tree, every field with its meaning, unit and default.

A policy names the tenants it applies to and the plan they get: which seccomp profiles, kept
capabilities, AppArmor and Landlock settings, user-namespace mapping, filesystem, environment,
network modes, binds a request may ask for, and for every limit the default and the maximum a
request may ask for. Unknown keys are errors. docs/policy.md's reference table is rendered from
this file (`validate.reference`), and a test keeps the two in step.
"""

from __future__ import annotations

from dataclasses import dataclass

from sandboxd.policy.validate import spec

NAME_PATTERN = r"[a-z0-9][a-z0-9._-]{0,62}"
NAME_DOC = "a name: lower-case letters, digits, '.', '_', '-', up to 63, starting with a letter or digit"
ENV_NAME_PATTERN = r"[A-Za-z_][A-Za-z0-9_]*"
DEVICE_NAMES = ("null", "zero", "full", "random", "urandom", "tty")


@dataclass(frozen=True)
class SeccompSpec:
    default: str = spec(doc="profile used when the request names none: profiles/seccomp/<name>.json",
                        pattern=NAME_PATTERN, pattern_doc=NAME_DOC)
    allowed: tuple[str, ...] = spec((), doc="other profile names a request may pick (the default is "
                                     "always allowed)", item_pattern=NAME_PATTERN,
                                     item_pattern_doc=NAME_DOC, unique=True)
    report_denials: bool = spec(True, doc="report denied syscalls by name in the result")


@dataclass(frozen=True)
class AppArmorSpec:
    profile: str | None = spec(None, doc="AppArmor profile name (a file in profiles/apparmor/); "
                               "null: none", pattern=NAME_PATTERN, pattern_doc=NAME_DOC)
    mode: str = spec("enforce", doc="how the profile is applied", choices=("enforce", "complain"))
    required: bool = spec(False, doc="refuse runs when AppArmor is not available on the host")


@dataclass(frozen=True)
class LandlockSpec:
    enabled: bool = spec(True, doc="apply Landlock rights derived from the filesystem plan")
    mode: str = spec("required", doc="required: refuse runs the host's ABI cannot give; "
                     "best_effort: apply what the ABI has and report the rest",
                     choices=("required", "best_effort"))
    extra_read: tuple[str, ...] = spec((), doc="extra read-only paths inside the sandbox")
    extra_write: tuple[str, ...] = spec((), doc="extra read-write paths inside the sandbox")
    tcp_bind: tuple[int, ...] = spec((), doc="TCP ports the workload may bind (Landlock ABI >= 4)",
                                     item_min=1, item_max=65535, unique=True)
    tcp_connect: tuple[int, ...] = spec((), doc="TCP ports the workload may connect to (ABI >= 4)",
                                        item_min=1, item_max=65535, unique=True)
    scope: bool = spec(True, doc="scope abstract unix sockets and signals to the sandbox (ABI >= 6)")


@dataclass(frozen=True)
class UserSpec:
    inside_uid: int = spec(1000, doc="uid the workload runs as inside its user namespace",
                           min=0, max=65534)
    inside_gid: int = spec(1000, doc="gid inside the user namespace", min=0, max=65534)
    uid_mode: str = spec("per_run", doc="per_run: every concurrent run gets its own host uid; "
                         "single: the launcher's own uid (weaker, needs allow_single_uid)",
                         choices=("per_run", "single"))
    allow_single_uid: bool = spec(False, doc="permit uid_mode single")


@dataclass(frozen=True)
class BindSpec:
    source: str = spec(doc="absolute host path", nonempty=True)
    target: str = spec(doc="absolute path inside the sandbox", nonempty=True)
    writable: bool = spec(False, doc="read-write instead of read-only (always nosuid, nodev)")
    optional: bool = spec(False, doc="skip when the source does not exist on this host "
                          "(otherwise a missing source is a load error)")


@dataclass(frozen=True)
class TmpfsSpec:
    target: str = spec(doc="absolute path inside the sandbox", nonempty=True)
    size_bytes: int = spec(doc="hard cap; writes beyond it fail with ENOSPC", unit="bytes",
                           min=4096)
    mode: int = spec(0o1777, doc="permission bits of the tmpfs root (write 0o1777 or 1023)",
                     min=0, max=0o7777)


@dataclass(frozen=True)
class FilesystemSpec:
    system_binds: bool = spec(True, doc="start from the host layout of sandboxd.planner (shared "
                              "with `sandboxd run`): system directories read-only (/bin, /lib* as "
                              "symlinks on merged-/usr hosts), the /etc files programs read, "
                              "generated /etc/passwd, group, hosts, and tmpfs /tmp and /dev/shm")
    binds: tuple[BindSpec, ...] = spec((), doc="bind mounts every run gets")
    tmpfs: tuple[TmpfsSpec, ...] = spec((), doc="size-capped tmpfs mounts every run gets (same "
                                        "target as a system one, e.g. /tmp: replaces it)")
    symlinks: dict[str, str] = spec(default_factory=dict, doc="symlinks in the new root: "
                                    "absolute path -> link text")
    work_dir: str = spec("/box", doc="the work directory inside the sandbox (files in/out)")
    work_size_bytes: int = spec(64 << 20, doc="size cap of the work directory", unit="bytes",
                                min=1 << 20)
    root_readonly: bool = spec(True, doc="remount the new root read-only once built")
    proc: bool = spec(True, doc="mount a fresh /proc (masked as in OCI)")
    dev_nodes: tuple[str, ...] = spec(DEVICE_NAMES, doc="device nodes bound into /dev",
                                      item_choices=DEVICE_NAMES, unique=True)
    hostname: str = spec("sandbox", doc="hostname in the UTS namespace",
                         pattern=r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?",
                         pattern_doc="a hostname label")
    cwd: str | None = spec(None, doc="default working directory; null: work_dir")


@dataclass(frozen=True)
class BindAllowSpec:
    source: str = spec(doc="host directory; a request may bind it or anything below it",
                       nonempty=True)
    target: str = spec(doc="where it appears in the sandbox; a request's target must be this or "
                       "below it", nonempty=True)
    writable: bool = spec(False, doc="a request may ask for a writable bind")


@dataclass(frozen=True)
class EnvSpec:
    set: dict[str, str] = spec(default_factory=lambda: {"PATH": "/usr/local/bin:/usr/bin:/bin",
                                                        "HOME": "/box"},
                               doc="environment every run gets", key_pattern=ENV_NAME_PATTERN,
                               key_pattern_doc="an environment variable name")
    allow: tuple[str, ...] = spec((), doc="glob patterns of variable names a request may set "
                                  "(e.g. LANG, LC_*); [] allows none", unique=True)


@dataclass(frozen=True)
class NetworkSpec:
    default: str = spec("none", doc="mode used when the request names none")
    allowed: tuple[str, ...] = spec(("none",), doc="modes a request may ask for: none (own netns, "
                                    "loopback only), segment:NAME (a segment the server's "
                                    "runtime.network declares), host (only with allow_host)",
                                    unique=True)
    allow_host: bool = spec(False, doc="true to let 'host' (the host's own network, no network "
                                       "isolation at all) appear in allowed; say it explicitly")


@dataclass(frozen=True)
class IntLimit:
    default: int | None = spec(doc="value when the request asks for nothing; null: unlimited "
                               "(only where the limit may be off)", min=0)
    max: int | None = spec(doc="largest value a request may ask for; null: no bound", min=0)


@dataclass(frozen=True)
class FloatLimit:
    default: float | None = spec(doc="value when the request asks for nothing; null: off", min=0.0)
    max: float | None = spec(doc="largest value a request may ask for; null: no bound", min=0.0)


def _lim(d: int | None, m: int | None) -> IntLimit:
    return IntLimit(default=d, max=m)


@dataclass(frozen=True)
class LimitsSpec:
    # Fields that may be null (off) are listed in NULLABLE_LIMITS; the loader checks the rest.
    cpu_time_ms: IntLimit = spec(default_factory=lambda: _lim(10_000, 10_000),
                                 doc="CPU time of all processes and threads, ms")
    cpu_extra_ms: int = spec(0, doc="keep running this long past cpu_time_ms so real use is "
                             "reported (policy only)", min=0)
    wall_time_ms: IntLimit = spec(default_factory=lambda: _lim(30_000, 30_000),
                                  doc="real time from exec, ms")
    memory_bytes: IntLimit = spec(default_factory=lambda: _lim(256 << 20, 256 << 20),
                                  doc="memory cgroup limit, swap off", unit="bytes")
    pids: IntLimit = spec(default_factory=lambda: _lim(64, 64), doc="processes and threads")
    cpu_quota: FloatLimit = spec(default_factory=lambda: FloatLimit(default=None, max=None),
                                 doc="CPUs worth of time per period; null: no quota")
    cpuset: str | None = spec(None, doc="CPUs the run may use, e.g. \"0\" or \"0-1\" (policy only)",
                              pattern=r"\d+(-\d+)?(,\d+(-\d+)?)*", pattern_doc="a cpu list like 0-1,3")
    stdout_bytes: IntLimit = spec(default_factory=lambda: _lim(1 << 20, 16 << 20),
                                  doc="stdout cap; OUTPUT_LIMIT beyond it", unit="bytes")
    stderr_bytes: IntLimit = spec(default_factory=lambda: _lim(1 << 20, 4 << 20),
                                  doc="stderr cap", unit="bytes")
    file_size_bytes: IntLimit = spec(default_factory=lambda: _lim(16 << 20, 64 << 20),
                                     doc="largest file the workload may write (RLIMIT_FSIZE)",
                                     unit="bytes")
    stack_bytes: IntLimit = spec(default_factory=lambda: _lim(8 << 20, 64 << 20),
                                 doc="RLIMIT_STACK", unit="bytes")
    open_files: IntLimit = spec(default_factory=lambda: _lim(256, 1024), doc="RLIMIT_NOFILE")
    address_space_bytes: IntLimit = spec(default_factory=lambda: _lim(None, None),
                                         doc="RLIMIT_AS; null: off (it breaks many runtimes)",
                                         unit="bytes")


# Limits that may be null (unlimited / off), matching sandboxd.plan.Limits' Optional fields.
NULLABLE_LIMITS = frozenset({"cpu_time_ms", "memory_bytes", "pids", "cpu_quota",
                             "address_space_bytes"})
# Limits a request may ask for (the rest are policy only).
REQUESTABLE_LIMITS = ("cpu_time_ms", "wall_time_ms", "memory_bytes", "pids", "cpu_quota",
                      "stdout_bytes", "stderr_bytes", "file_size_bytes", "open_files",
                      "stack_bytes", "address_space_bytes")


@dataclass(frozen=True)
class ConcurrencySpec:
    max_running: int = spec(4, doc="sandboxes one tenant may run at once under this policy", min=1)
    max_queued: int = spec(16, doc="requests of one tenant that may wait for a slot; beyond it "
                           "RESOURCE_EXHAUSTED", min=0)


@dataclass(frozen=True)
class PolicySpec:
    version: int = spec(doc="schema version of this file", choices=(1,))
    name: str = spec(doc="the policy's name, unique across the policy directory",
                     pattern=NAME_PATTERN, pattern_doc=NAME_DOC)
    tenants: tuple[str, ...] = spec(doc="tenants (server config names) this policy applies to",
                                    nonempty=True, unique=True, item_pattern=NAME_PATTERN,
                                    item_pattern_doc=NAME_DOC)
    seccomp: SeccompSpec = spec(doc="seccomp profiles")
    description: str = spec("", doc="what the policy is for")
    commands: tuple[str, ...] = spec(("*",), doc="glob patterns argv[0] must match (e.g. /usr/bin/*, "
                                     "./*); [\"*\"] allows any program the sandbox can see",
                                     nonempty=True, unique=True)
    capabilities: tuple[str, ...] = spec((), doc="capabilities kept (CAP_NET_BIND_SERVICE, ...); "
                                         "default none", unique=True)
    apparmor: AppArmorSpec = spec(default_factory=AppArmorSpec, doc="AppArmor")
    landlock: LandlockSpec = spec(default_factory=LandlockSpec, doc="Landlock")
    user: UserSpec = spec(default_factory=UserSpec, doc="user namespace mapping")
    filesystem: FilesystemSpec = spec(default_factory=FilesystemSpec, doc="the sandbox's root")
    env: EnvSpec = spec(default_factory=EnvSpec, doc="environment")
    network: NetworkSpec = spec(default_factory=NetworkSpec, doc="network modes")
    binds_allowed: tuple[BindAllowSpec, ...] = spec((), doc="binds a request may ask for")
    limits: LimitsSpec = spec(default_factory=LimitsSpec, doc="limits: default and request maximum")
    concurrency: ConcurrencySpec = spec(default_factory=ConcurrencySpec, doc="per-tenant concurrency")
    output_limit_action: str = spec("kill", doc="what reaching an output cap does", choices=("kill",))
