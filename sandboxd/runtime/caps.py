"""Capability names, and the capability lines of /proc/<pid>/status for the attestation.

The drop itself happens in the run's init (stub/sbx-exec.c, drop_caps), right before
no_new_privs/LSM/seccomp, in this order (each step needs what the previous one still has):
  1. bounding set: drop everything not kept (needs CAP_SETPCAP, which init still holds);
  2. ambient set cleared;
  3. keep-caps on, then setresgid/setresuid to the workload's ids (keep-caps so the kept
     capabilities survive the uid change);
  4. capset: effective = permitted = inheritable = kept;
  5. kept capabilities raised in the ambient set so they survive execve for a non-root uid.
With nothing kept (the default) every set is empty at execve.
"""

from __future__ import annotations


from sandboxd.errors import PlanError

# linux/capability.h, 0..40 on 6.x kernels
CAP_NAMES = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID",
    "CAP_KILL", "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW",
    "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE",
    "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ",
    "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE",
)
CAP_BY_NAME = {n: i for i, n in enumerate(CAP_NAMES)}


def parse_caps(names: tuple[str, ...] | list[str]) -> int:
    """Names -> bitmask. Unknown names are an error (fail closed), never skipped."""
    mask = 0
    bad = []
    for n in names:
        key = n.upper()
        if not key.startswith("CAP_"):
            key = "CAP_" + key
        if key not in CAP_BY_NAME:
            bad.append(n)
            continue
        mask |= 1 << CAP_BY_NAME[key]
    if bad:
        raise PlanError(f"unknown capability name(s): {', '.join(bad)}", step="capabilities")
    return mask


def mask_names(mask: int) -> list[str]:
    out = []
    while mask:                       # set bits only: a sandbox's sets are mostly empty
        low = mask & -mask
        i = low.bit_length() - 1
        out.append(CAP_NAMES[i] if i < len(CAP_NAMES) else f"CAP_{i}")
        mask ^= low
    return out


def _ints(val: str) -> list[int]:
    return [int(x) for x in val.split()]


# The lines of /proc/<pid>/status the attestation reads, and how. The parse runs on the
# supervisor's path to the result, once per run.
_STATUS_FIELDS = {
    **{k: lambda v: mask_names(int(v, 16)) for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")},
    **{k: int for k in ("NoNewPrivs", "Seccomp", "Seccomp_filters")},
    **{k: _ints for k in ("Uid", "Gid", "Groups")},
}


def read_status_caps(status_text: str, only: tuple[str, ...] | None = None) -> dict[str, object]:
    """Parse the capability/identity lines of /proc/<pid>/status for the attestation (only:
    just these keys)."""
    fields = _STATUS_FIELDS if only is None else {k: _STATUS_FIELDS[k] for k in only}
    out: dict[str, object] = {}
    for line in status_text.splitlines():
        key, _, val = line.partition(":")
        conv = fields.get(key)
        if conv is not None:
            out[key] = conv(val.strip())
    return out
