"""Landlock: the filesystem, TCP and IPC rights of a run, derived from its plan and enforced by the kernel.

Theory of operation. Landlock lets an unprivileged process give up rights for itself and every
process it will start; nothing can hand them back. The mount layout already decides what
exists inside the sandbox; Landlock is the second, independent layer: even if a mount were
wrong (a bind of too much, a /proc path left unmasked), only the paths the plan names can be
opened, and only in the way the plan names. It works in three steps, kept apart:

  resolve(plan, abi)   pure: the plan and the host's ABI number -> LandlockRules (paths as seen
                       inside the new root, each with a rights mask; TCP ports; scopes; what the
                       ABI cannot enforce). Decides everything; testable without root or a kernel.
                       In "required" mode it refuses (HostCapabilityError) rather than weaken.
  prepare(rules)       parent side, before fork: encodes paths and builds the ctypes structures,
                       so the child allocates little and decides nothing.
  apply(prepared)      child side, after pivot_root and no_new_privs, before seccomp: one
                       create_ruleset, one add_rule per path (opened O_PATH) and port, then
                       restrict_self. Returns the attestation.

Why this position in the launch sequence: paths must be opened inside the new root (a rule binds
an inode, so opening before pivot_root would name host objects that are then unreachable, and
after it the names are the sandbox's own); no_new_privs first because restrict_self without it
needs CAP_SYS_ADMIN; seccomp last so its filter need not allow the three Landlock syscalls.
Anything that writes to /proc/self (AppArmor's attr/exec, oom_score_adj) must come before
apply(): /proc is granted read-only here.

Rights are deny-by-default: every right the ABI knows is "handled", so any right not granted by
a rule is refused (EACCES for files and TCP, EPERM for scoped IPC and signals).
Kernel interface: Documentation/userspace-api/landlock.rst and include/uapi/linux/landlock.h.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import os
from dataclasses import dataclass, field
from typing import Any

from sandboxd.errors import HostCapabilityError, LaunchError, PlanError
from sandboxd.plan import FilesystemPlan, LandlockPlan, Plan
from sandboxd.runtime import linux

# --- kernel interface -------------------------------------------------------------------------
# The Landlock syscalls have the same numbers on every architecture with the unified syscall
# table (x86_64, aarch64, riscv64, ...), added in Linux 5.13.
SYS_landlock_create_ruleset = 444
SYS_landlock_add_rule = 445
SYS_landlock_restrict_self = 446

LANDLOCK_CREATE_RULESET_VERSION = 1 << 0
LANDLOCK_RULE_PATH_BENEATH = 1
LANDLOCK_RULE_NET_PORT = 2

# Filesystem rights, with the ABI that introduced each.
ACCESS_FS_EXECUTE = 1 << 0
ACCESS_FS_WRITE_FILE = 1 << 1
ACCESS_FS_READ_FILE = 1 << 2
ACCESS_FS_READ_DIR = 1 << 3
ACCESS_FS_REMOVE_DIR = 1 << 4
ACCESS_FS_REMOVE_FILE = 1 << 5
ACCESS_FS_MAKE_CHAR = 1 << 6
ACCESS_FS_MAKE_DIR = 1 << 7
ACCESS_FS_MAKE_REG = 1 << 8
ACCESS_FS_MAKE_SOCK = 1 << 9
ACCESS_FS_MAKE_FIFO = 1 << 10
ACCESS_FS_MAKE_BLOCK = 1 << 11
ACCESS_FS_MAKE_SYM = 1 << 12
ACCESS_FS_REFER = 1 << 13       # ABI 2
ACCESS_FS_TRUNCATE = 1 << 14    # ABI 3
ACCESS_FS_IOCTL_DEV = 1 << 15   # ABI 5

ACCESS_NET_BIND_TCP = 1 << 0     # ABI 4
ACCESS_NET_CONNECT_TCP = 1 << 1  # ABI 4

SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
SCOPE_SIGNAL = 1 << 1                # ABI 6

FS_RIGHTS: tuple[tuple[str, int, int], ...] = (  # (name, bit, first ABI)
    ("execute", ACCESS_FS_EXECUTE, 1), ("write_file", ACCESS_FS_WRITE_FILE, 1),
    ("read_file", ACCESS_FS_READ_FILE, 1), ("read_dir", ACCESS_FS_READ_DIR, 1),
    ("remove_dir", ACCESS_FS_REMOVE_DIR, 1), ("remove_file", ACCESS_FS_REMOVE_FILE, 1),
    ("make_char", ACCESS_FS_MAKE_CHAR, 1), ("make_dir", ACCESS_FS_MAKE_DIR, 1),
    ("make_reg", ACCESS_FS_MAKE_REG, 1), ("make_sock", ACCESS_FS_MAKE_SOCK, 1),
    ("make_fifo", ACCESS_FS_MAKE_FIFO, 1), ("make_block", ACCESS_FS_MAKE_BLOCK, 1),
    ("make_sym", ACCESS_FS_MAKE_SYM, 1), ("refer", ACCESS_FS_REFER, 2),
    ("truncate", ACCESS_FS_TRUNCATE, 3), ("ioctl_dev", ACCESS_FS_IOCTL_DEV, 5),
)
NET_RIGHTS: tuple[tuple[str, int, int], ...] = (
    ("bind_tcp", ACCESS_NET_BIND_TCP, 4), ("connect_tcp", ACCESS_NET_CONNECT_TCP, 4),
)
SCOPES: tuple[tuple[str, int, int], ...] = (
    ("abstract_unix_socket", SCOPE_ABSTRACT_UNIX_SOCKET, 6), ("signal", SCOPE_SIGNAL, 6),
)

# The newest ABI this module was written and tested against. A newer kernel is used at this
# level: handling rights we do not know would deny things no rule of ours can grant.
# (ABI 7 added only restrict_self logging flags; we keep the kernel's default logging.)
KNOWN_ABI = 7

# Rights a rule on a non-directory may carry; the kernel refuses the others (EINVAL).
FILE_RIGHTS = (ACCESS_FS_EXECUTE | ACCESS_FS_WRITE_FILE | ACCESS_FS_READ_FILE
               | ACCESS_FS_TRUNCATE | ACCESS_FS_IOCTL_DEV)

# --- access classes: what each kind of plan path grants ----------------------------------------
READ = ACCESS_FS_READ_FILE | ACCESS_FS_READ_DIR
READ_EXEC = READ | ACCESS_FS_EXECUTE
# Writable trees get everything a program does with its own files. Left out: MAKE_CHAR and
# MAKE_BLOCK (a device node is a way to hardware; the mounts are nodev as well), and EXECUTE
# (a payload dropped in /tmp or a writable bind cannot be started with execve).
READ_WRITE = (READ | ACCESS_FS_WRITE_FILE | ACCESS_FS_TRUNCATE | ACCESS_FS_REMOVE_DIR
              | ACCESS_FS_REMOVE_FILE | ACCESS_FS_MAKE_DIR | ACCESS_FS_MAKE_REG | ACCESS_FS_MAKE_SYM
              | ACCESS_FS_MAKE_SOCK | ACCESS_FS_MAKE_FIFO | ACCESS_FS_REFER)
# The work directory also executes: judges compile there and run what they compiled.
READ_WRITE_EXEC = READ_WRITE | ACCESS_FS_EXECUTE
DEV_READ = ACCESS_FS_READ_FILE
DEV_READ_WRITE = ACCESS_FS_READ_FILE | ACCESS_FS_WRITE_FILE

# Read-only binds at or below these targets also execute: they hold the programs and the
# dynamic loader. Other read-only binds (data, /etc) are read only.
SYSTEM_EXEC_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")

# Every /dev node the filesystem plan may list, with its rights and whether the mounts layer
# binds it only when the host has it (mounts.py treats /dev/tty as optional). A node not named
# here is a plan error: a new device must be reviewed before a workload may open it.
DEV_NODES: dict[str, tuple[int, bool]] = {
    "null": (DEV_READ_WRITE, False),
    "zero": (DEV_READ_WRITE, False),
    "full": (DEV_READ_WRITE, False),
    # Terminal ioctls (window size, modes) are how a tty is used; on other nodes device ioctls
    # stay denied (IOCTL_DEV), which closes driver ioctl surfaces to the workload.
    "tty": (DEV_READ_WRITE | ACCESS_FS_IOCTL_DEV, True),
    # Reading entropy is all a program needs; writing would feed the host's pool.
    "random": (DEV_READ, False),
    "urandom": (DEV_READ, False),
}

MODES = ("required", "best_effort")

# What a plan may need, with the first ABI (and Linux release) that enforces it. "required"
# refuses a host that lacks one the plan needs; "best_effort" lists it in `unenforced`.
_FEATURES: dict[str, tuple[int, str, str]] = {
    "filesystem": (1, "5.13", "filesystem access control"),
    "truncate": (3, "6.2", "truncate control"),
    "tcp": (4, "6.7", "TCP bind/connect control"),
    "ioctl_dev": (5, "6.10", "device ioctl control"),
    "scope": (6, "6.12", "scoping of abstract unix sockets and signals"),
}
# Rights we handle when the ABI has them but never refuse a host for: with this plan's layout
# the mounts already give the same answer, so "required" on such a host loses nothing.
_REFINEMENTS: dict[str, str] = {
    # A path granted read only is on a read-only mount (read-only binds, the root tmpfs with
    # root_readonly) or is /proc or a device node, where truncate fails anyway (EROFS, EINVAL);
    # anything on a writable mount is below a read-write rule, which grants truncate anyway.
    "truncate": "paths granted read only are on read-only mounts",
    # /dev holds only the nodes in DEV_NODES; their driver ioctls need privileges the workload
    # lacks, and the tty is granted ioctls anyway.
    "ioctl_dev": "/dev holds only the planned nodes",
}
# Without REFER (ABI 1) cross-directory rename/link is always refused (EXDEV): stricter, not
# weaker, so it is not "unenforced"; docs/landlock.md notes the compatibility cost.

# --- resolved rules ---------------------------------------------------------------------------
@dataclass(frozen=True)
class PathRule:
    """One path_beneath rule: `access` on `path` (inside the new root) and everything below it."""

    path: str
    access: int
    optional: bool = False   # skipped when missing in the new root (an optional bind); else an error
    origin: str = ""         # which part of the plan asked for it, for explain and errors


@dataclass(frozen=True)
class PortRule:
    port: int
    access: int               # ACCESS_NET_BIND_TCP and/or ACCESS_NET_CONNECT_TCP


@dataclass(frozen=True)
class LandlockRules:
    """Everything apply() does, decided. enforce=False: apply() restricts nothing and says why."""

    enforce: bool
    mode: str
    abi: int = 0                     # ABI level used (min of the host's and KNOWN_ABI)
    host_abi: int = 0                # what the kernel reported
    handled_fs: int = 0
    handled_net: int = 0
    scoped: int = 0
    paths: tuple[PathRule, ...] = ()
    ports: tuple[PortRule, ...] = ()
    # "feature: reason" for each restriction the plan implies that this host will not enforce.
    unenforced: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "enforce": self.enforce, "mode": self.mode, "abi": self.abi, "host_abi": self.host_abi,
            "handled_access_fs": fs_names(self.handled_fs),
            "handled_access_net": net_names(self.handled_net),
            "scoped": scope_names(self.scoped),
            "paths": [{"path": r.path, "access": fs_names(r.access), "optional": r.optional,
                       "origin": r.origin} for r in self.paths],
            "ports": [{"port": r.port, "access": net_names(r.access)} for r in self.ports],
            "unenforced": list(self.unenforced),
        }


def _names(table: tuple[tuple[str, int, int], ...], mask: int) -> list[str]:
    return [name for name, bit, _ in table if mask & bit]


def fs_names(mask: int) -> list[str]:
    return _names(FS_RIGHTS, mask)


def net_names(mask: int) -> list[str]:
    return _names(NET_RIGHTS, mask)


def scope_names(mask: int) -> list[str]:
    return _names(SCOPES, mask)


def _known(table: tuple[tuple[str, int, int], ...], abi: int) -> int:
    m = 0
    for _, bit, first in table:
        if abi >= first:
            m |= bit
    return m


def handled_fs_for(abi: int) -> int:
    return _known(FS_RIGHTS, abi)


def handled_net_for(abi: int) -> int:
    return _known(NET_RIGHTS, abi)


def scopes_for(abi: int) -> int:
    return _known(SCOPES, abi)


# --- resolve (pure) ---------------------------------------------------------------------------
def _is_beneath(path: str, top: str) -> bool:
    return path == top or top == "/" or path.startswith(top + "/")


def _path_problem(path: Any) -> str | None:
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path \
            or os.path.normpath(path) != path or path.startswith("//"):
        return f"{path!r} is not an absolute normalised path"
    return None


def _through_symlinks(path: str, symlinks: tuple[tuple[str, str], ...]) -> str:
    """`path` with a planned symlink among its parents replaced by what it points to (one level)."""
    for link_path, text in symlinks:
        if path.startswith(link_path + "/"):
            base = text if text.startswith("/") else os.path.join(os.path.dirname(link_path), text)
            return os.path.normpath(os.path.join(base, path[len(link_path) + 1:]))
    return path


def exec_rule(rules: LandlockRules, argv0: str, symlinks: tuple[tuple[str, str], ...]) -> tuple[str, int] | None:
    """argv[0]'s own file rule for a run, as resolve_parts() would add it: (path, access), or
    None when no rule is needed (no Landlock, a PATH lookup, or a directory rule already lets
    it execute). Layout rules are resolved once per layout without it; this is per run."""
    if not rules.enforce or not argv0.startswith("/"):
        return None
    real = _through_symlinks(argv0, symlinks)
    if any(_is_beneath(real, r.path) and r.access & ACCESS_FS_EXECUTE for r in rules.paths):
        return None
    if _path_problem(argv0):
        return None
    return argv0, (ACCESS_FS_EXECUTE | ACCESS_FS_READ_FILE) & rules.handled_fs


def resolve(plan: Plan, abi: int) -> LandlockRules:
    """The Landlock rules for `plan` on a host whose Landlock ABI is `abi` (see abi_version())."""
    return resolve_parts(plan.filesystem, plan.landlock, plan.network.mode, abi,
                         argv0=plan.argv[0] if plan.argv else None)


def resolve_parts(fs: FilesystemPlan, ll: LandlockPlan, network_mode: str, abi: int,
                  argv0: str | None = None) -> LandlockRules:
    """resolve() from the parts of a plan that matter. `argv0`, when absolute, is made executable."""
    if ll.mode not in MODES:
        raise PlanError(f"landlock.mode must be one of {', '.join(MODES)}, got {ll.mode!r}",
                        step="landlock")
    if not ll.enabled:
        return LandlockRules(enforce=False, mode=ll.mode, host_abi=abi,
                             unenforced=("landlock: disabled by the plan",))
    problems: list[str] = []
    grants: dict[str, list[Any]] = {}   # path -> [access, optional, origins]

    def grant(path: str, access: int, origin: str, optional: bool = False) -> None:
        p = _path_problem(path)
        if p:
            problems.append(f"{origin}: {p}")
            return
        g = grants.setdefault(path, [0, True, []])
        g[0] |= access
        g[1] = g[1] and optional     # one required source makes the path required
        g[2].append(origin)

    for b in fs.binds:
        if b.writable:
            access = READ_WRITE
        elif any(_is_beneath(b.target, d) for d in SYSTEM_EXEC_DIRS):
            access = READ_EXEC
        else:
            # Read-only data: no execute. The program the plan runs gets a file rule of its own
            # (argv[0] below), so a judge's bound solution runs and nothing beside it does.
            access = READ
        grant(b.target, access, f"bind {b.target}", optional=b.optional)
    for t in fs.tmpfs:
        grant(t.target, READ_WRITE, f"tmpfs {t.target}")
    grant(fs.work_dir, READ_WRITE_EXEC, "work_dir")
    for target, _text in fs.files:
        grant(target, READ, f"file {target}")
    if fs.proc:
        # Read-only: writes below /proc/self (attr, oom_score_adj, ...) belong before apply().
        grant("/proc", READ, "proc")
    for node in fs.dev_nodes:
        if node not in DEV_NODES:
            problems.append(f"dev_nodes: {node!r} has no Landlock rights defined "
                            f"(known: {', '.join(sorted(DEV_NODES))})")
            continue
        access, optional = DEV_NODES[node]
        grant("/dev/" + node, access, f"dev {node}", optional=optional)
    for p in ll.extra_read:
        grant(p, READ, "landlock.extra_read")
    for p in ll.extra_write:
        grant(p, READ_WRITE, "landlock.extra_write")
    if argv0 is not None and argv0.startswith("/"):
        # The plan says to run this program; make sure Landlock agrees, without widening any
        # directory (a file rule grants the file alone). Optional: a missing program is for
        # execve to report (step "execve", ENOENT), not a Landlock failure.
        real = _through_symlinks(argv0, fs.symlinks)     # /bin/sh -> /usr/bin/sh on merged-/usr
        covered = any(_is_beneath(real, p) and g[0] & ACCESS_FS_EXECUTE for p, g in grants.items())
        if not covered:
            grant(argv0, ACCESS_FS_EXECUTE | ACCESS_FS_READ_FILE, "argv[0]", optional=True)

    ports: dict[int, int] = {}
    for field_name, plist, right in (("tcp_bind", ll.tcp_bind, ACCESS_NET_BIND_TCP),
                                     ("tcp_connect", ll.tcp_connect, ACCESS_NET_CONNECT_TCP)):
        for port in plist:
            if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
                problems.append(f"landlock.{field_name}: {port!r} is not a TCP port (0-65535)")
                continue
            ports[port] = ports.get(port, 0) | right
    if problems:
        raise PlanError("invalid Landlock inputs: " + "; ".join(problems), step="landlock")

    # What this plan needs from the kernel, and what the host has.
    # TCP control is needed when the plan names ports, or when the network reaches beyond the
    # run's own loopback (any mode but "none", including modes this module does not know yet:
    # the stricter reading is the safe one).
    needs = ["filesystem"]
    if ll.tcp_bind or ll.tcp_connect or network_mode != "none":
        needs.append("tcp")
    if ll.scope:
        needs.append("scope")
    level = min(max(abi, 0), KNOWN_ABI)
    missing = [f for f in needs if level < _FEATURES[f][0]]

    if missing and ll.mode == "required":
        if level == 0:
            raise HostCapabilityError(
                "Landlock is not available on this host (ABI 0: kernel built without "
                "CONFIG_SECURITY_LANDLOCK, or 'landlock' missing from the lsm= boot parameter)",
                step="landlock",
                hint="enable Landlock on the host, or set landlock.mode: best_effort to run without it")
        what = "; ".join(f"{_FEATURES[f][2]} needs ABI {_FEATURES[f][0]} (Linux {_FEATURES[f][1]})"
                         for f in missing)
        knobs = []
        if "tcp" in missing:
            knobs.append("empty landlock.tcp_bind and landlock.tcp_connect")
        if "scope" in missing:
            knobs.append("landlock.scope: false")
        newest = max(missing, key=lambda f: _FEATURES[f][0])
        hint = f"run on Linux >= {_FEATURES[newest][1]}, set landlock.mode: best_effort"
        hint += ", or ask for less: " + ", ".join(knobs) if knobs else ""
        raise HostCapabilityError(f"host Landlock ABI {level} cannot enforce what the plan requires: {what}",
                                  step="landlock", hint=hint)

    if level == 0:
        return LandlockRules(enforce=False, mode=ll.mode, host_abi=abi,
                             unenforced=("landlock: not available on this host (ABI 0); "
                                         "no Landlock restriction applied",))
    unenforced: list[str] = []
    for f in missing:
        unenforced.append(f"{f}: {_FEATURES[f][2]} needs ABI {_FEATURES[f][0]}, host has {level}")
    if level < _FEATURES["tcp"][0] and "tcp" not in missing:
        unenforced.append(f"tcp: {_FEATURES['tcp'][2]} needs ABI 4, host has {level} "
                          f"(not required: network mode {network_mode!r} has loopback only)")
    # Refinements the mount layer already covers (see _REFINEMENTS): reported, never refused.
    for f in _REFINEMENTS:
        if level < _FEATURES[f][0]:
            unenforced.append(f"{f}: {_FEATURES[f][2]} needs ABI {_FEATURES[f][0]}, host has {level} "
                              f"(not required: {_REFINEMENTS[f]})")

    handled_fs = handled_fs_for(level)
    handled_net = handled_net_for(level)
    path_rules = tuple(
        PathRule(path=p, access=g[0] & handled_fs, optional=g[1], origin=", ".join(g[2]))
        for p, g in sorted(grants.items()))
    port_rules = tuple(PortRule(port=p, access=a & handled_net)
                       for p, a in sorted(ports.items())) if handled_net else ()
    scoped = (SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL) & scopes_for(level) if ll.scope else 0
    return LandlockRules(enforce=True, mode=ll.mode, abi=level, host_abi=abi,
                         handled_fs=handled_fs, handled_net=handled_net, scoped=scoped,
                         paths=path_rules, ports=port_rules, unenforced=tuple(unenforced))


# --- the kernel side --------------------------------------------------------------------------
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1     # the kernel's struct is packed: 12 bytes, no trailing padding
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


class _NetPortAttr(ctypes.Structure):
    _fields_ = [("allowed_access", ctypes.c_uint64), ("port", ctypes.c_uint64)]


def _ruleset_attr_size(abi: int) -> int:
    # Pass only the fields this ABI knows: older kernels reject a larger struct (E2BIG) unless
    # the extra bytes are zero, and being exact keeps that question away.
    if abi >= 6:
        return 24
    if abi >= 4:
        return 16
    return 8


def abi_version() -> int:
    """The host's Landlock ABI version; 0 when the kernel lacks Landlock or it is disabled."""
    r = _libc.syscall(ctypes.c_long(SYS_landlock_create_ruleset), ctypes.c_void_p(None),
                      ctypes.c_size_t(0), ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION))
    return int(r) if r > 0 else 0


@dataclass
class _PathEntry:
    path: bytes
    dir_access: int
    file_access: int
    optional: bool
    display: str


@dataclass
class Prepared:
    """rules, encoded for apply(): built before fork so the child only makes syscalls."""

    rules: LandlockRules
    attr: _RulesetAttr | None
    attr_size: int
    paths: tuple[_PathEntry, ...]
    ports: tuple[_NetPortAttr, ...]
    path_attr: _PathBeneathAttr = field(default_factory=_PathBeneathAttr)
    attestation: dict[str, Any] = field(default_factory=dict)


def prepare(rules: LandlockRules) -> Prepared:
    att: dict[str, Any] = {
        "enabled": rules.enforce, "mode": rules.mode, "abi": rules.abi, "host_abi": rules.host_abi,
        "handled_access_fs": fs_names(rules.handled_fs),
        "handled_access_net": net_names(rules.handled_net),
        "scoped": scope_names(rules.scoped),
        "path_rules": 0, "net_rules": 0, "skipped_optional": [],
        "unenforced": list(rules.unenforced),
    }
    if not rules.enforce:
        return Prepared(rules=rules, attr=None, attr_size=0, paths=(), ports=(), attestation=att)
    attr = _RulesetAttr(rules.handled_fs, rules.handled_net, rules.scoped)
    paths = tuple(_PathEntry(path=r.path.encode(), dir_access=r.access,
                             file_access=r.access & FILE_RIGHTS, optional=r.optional, display=r.path)
                  for r in rules.paths if r.access)
    ports = tuple(_NetPortAttr(r.access, r.port) for r in rules.ports if r.access)
    return Prepared(rules=rules, attr=attr, attr_size=_ruleset_attr_size(rules.abi),
                    paths=paths, ports=ports, attestation=att)


def _syscall_failed(what: str, path: str | None = None, hint: str | None = None) -> LaunchError:
    return LaunchError(what, step="landlock", path=path, errno=ctypes.get_errno(), hint=hint)


def apply(prepared: Prepared) -> dict[str, Any]:
    """Restrict the calling process (and all it starts) to `prepared`. Child side only.

    Call after pivot_root and after no_new_privs, before seccomp. Irreversible. Returns the
    attestation (what the kernel accepted); raises LaunchError(step="landlock") on any failure,
    having restricted nothing.
    """
    ruleset_fd, att = build_ruleset(prepared)
    if ruleset_fd < 0:
        return att
    try:
        r = _libc.syscall(ctypes.c_long(SYS_landlock_restrict_self), ctypes.c_int(ruleset_fd),
                          ctypes.c_uint32(0))
        if r != 0:
            raise _syscall_failed("landlock_restrict_self failed")
    finally:
        os.close(ruleset_fd)
    return att


def build_ruleset(prepared: Prepared) -> tuple[int, dict[str, Any]]:
    """The ruleset of `prepared` with every rule added, not yet enforced: (fd, attestation), fd
    -1 when there is nothing to enforce. The runtime's exec stub adds argv[0]'s rule and calls
    landlock_restrict_self at the run. Rule paths are opened here, in the new root."""
    att = dict(prepared.attestation)
    if prepared.attr is None:
        return -1, att
    if linux.prctl(linux.PR_GET_NO_NEW_PRIVS, step="landlock") != 1:
        # Ordering guard: the launcher sets no_new_privs first (seccomp needs it too). Without
        # it restrict_self would depend on CAP_SYS_ADMIN, i.e. on where we happen to run.
        raise LaunchError("no_new_privs is not set", step="landlock",
                          hint="call set_no_new_privs() before landlock.apply()")
    ruleset_fd = _libc.syscall(ctypes.c_long(SYS_landlock_create_ruleset), ctypes.byref(prepared.attr),
                               ctypes.c_size_t(prepared.attr_size), ctypes.c_uint32(0))
    if ruleset_fd < 0:
        raise _syscall_failed("landlock_create_ruleset failed")
    skipped: list[str] = []
    n_paths = 0
    pa = prepared.path_attr
    try:
        for e in prepared.paths:
            access = e.dir_access
            try:
                fd = os.open(e.path, os.O_PATH | os.O_CLOEXEC | os.O_DIRECTORY)
            except NotADirectoryError:
                # A file bind or generated file: only file rights are valid on it.
                access = e.file_access
                try:
                    fd = os.open(e.path, os.O_PATH | os.O_CLOEXEC)
                except OSError as err:
                    raise LaunchError("open rule path", step="landlock", path=e.display,
                                      errno=err.errno) from None
            except FileNotFoundError:
                if e.optional:
                    skipped.append(e.display)
                    continue
                raise LaunchError("rule path missing in the new root", step="landlock",
                                  path=e.display, errno=_errno.ENOENT,
                                  hint="the filesystem plan names it but it was not created") from None
            except OSError as err:
                raise LaunchError("open rule path", step="landlock", path=e.display,
                                  errno=err.errno) from None
            try:
                pa.allowed_access = access
                pa.parent_fd = fd
                r = _libc.syscall(ctypes.c_long(SYS_landlock_add_rule), ctypes.c_int(ruleset_fd),
                                  ctypes.c_int(LANDLOCK_RULE_PATH_BENEATH), ctypes.byref(pa),
                                  ctypes.c_uint32(0))
                if r != 0:
                    raise _syscall_failed(f"landlock_add_rule path_beneath {fs_names(access)}", e.display)
            finally:
                os.close(fd)
            n_paths += 1
        for port_attr in prepared.ports:
            r = _libc.syscall(ctypes.c_long(SYS_landlock_add_rule), ctypes.c_int(ruleset_fd),
                              ctypes.c_int(LANDLOCK_RULE_NET_PORT), ctypes.byref(port_attr),
                              ctypes.c_uint32(0))
            if r != 0:
                raise _syscall_failed(f"landlock_add_rule net_port {port_attr.port}")
    except BaseException:
        os.close(ruleset_fd)
        raise
    att["path_rules"] = n_paths
    att["net_rules"] = len(prepared.ports)
    att["skipped_optional"] = skipped
    return ruleset_fd, att
