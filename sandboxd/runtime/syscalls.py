"""Syscall and architecture tables for the seccomp layer.

Three sources answer "is this a syscall name, and what is its number here":

  1. libseccomp (the library pyseccomp loads). It knows every architecture's table as of its
     build (Debian 12's 2.5.4-1+deb12u1 knows Linux up to 6.7): a name that is not a syscall
     of the native arch resolves to a negative "pseudo" number (__PNR_*: syscalls of other
     arches around -10000, socketcall/ipc multiplexed calls such as "recv" around -100/-200),
     a name it has never heard of resolves to __NR_SCMP_ERROR (-1).
  2. The kernel's uapi header for the native arch, read at runtime when installed
     (linux-libc-dev), which may be newer than libseccomp.
  3. `NEWER_X86_64` below: syscalls added to x86_64 after upstream libseccomp 2.5.4 was
     released (Linux 6.5 .. 6.18), so a current Docker profile naming them loads here. Their
     numbers are used only to *name* a syscall in reports; rules naming them are never
     compiled by number (seccomp.py: such a rule is either provably safe to skip or an error).

A name known to none of them is a typo. Everything here is read-only after import and safe to
use in the parent only; the forked child never resolves names.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import re

# AUDIT_ARCH_* values (linux/audit.h): EM_* machine | 64-bit flag | little-endian flag.
AUDIT_ARCH_X86_64 = 0xC000003E
AUDIT_ARCH_I386 = 0x40000003
# x32 shares AUDIT_ARCH_X86_64 in seccomp_data and marks its syscalls with this bit in nr.
X32_SYSCALL_BIT = 0x40000000

# libseccomp's sentinel for "no such syscall name" (seccomp.h: __NR_SCMP_ERROR).
_NR_SCMP_ERROR = -1

# Architecture names of the Docker/OCI format ("architectures", "archMap") -> libseccomp's
# AUDIT_ARCH token. The full list runc accepts, so any Docker profile validates; only the
# native arch is ever compiled into the filter (see seccomp.py).
SCMP_ARCHES: dict[str, int] = {
    "SCMP_ARCH_X86": 0x40000003,
    "SCMP_ARCH_X86_64": 0xC000003E,
    "SCMP_ARCH_X32": 0x4000003E,
    "SCMP_ARCH_ARM": 0x40000028,
    "SCMP_ARCH_AARCH64": 0xC00000B7,
    "SCMP_ARCH_LOONGARCH64": 0xC0000102,
    "SCMP_ARCH_M68K": 0x00000004,
    "SCMP_ARCH_MIPS": 0x00000008,
    "SCMP_ARCH_MIPS64": 0x80000008,
    "SCMP_ARCH_MIPS64N32": 0xA0000008,
    "SCMP_ARCH_MIPSEL": 0x40000008,
    "SCMP_ARCH_MIPSEL64": 0xC0000008,
    "SCMP_ARCH_MIPSEL64N32": 0xE0000008,
    "SCMP_ARCH_PPC": 0x00000014,
    "SCMP_ARCH_PPC64": 0x80000015,
    "SCMP_ARCH_PPC64LE": 0xC0000015,
    "SCMP_ARCH_S390": 0x00000016,
    "SCMP_ARCH_S390X": 0x80000016,
    "SCMP_ARCH_PARISC": 0x0000000F,
    "SCMP_ARCH_PARISC64": 0x8000000F,
    "SCMP_ARCH_RISCV64": 0xC00000F3,
    "SCMP_ARCH_SH": 0x4000002A,      # little-endian SuperH
    "SCMP_ARCH_SHEB": 0x0000002A,    # big-endian SuperH
}

# Short arch names used by `includes.arches` / `excludes.arches`. Docker compares them with
# Go's GOARCH ("amd64"); its default profile also uses libseccomp-style names ("x86", "x32").
# Both vocabularies are accepted; a name outside them is a typo.
FILTER_ARCH_NAMES = frozenset({
    # Go GOARCH values for Linux
    "386", "amd64", "arm", "arm64", "loong64", "mips", "mipsle", "mips64", "mips64le",
    "ppc64", "ppc64le", "riscv64", "s390x",
    # libseccomp short names
    "x86", "x86_64", "x32", "aarch64", "loongarch64", "m68k", "mipsel", "mips64n32",
    "mipsel64", "mipsel64n32", "parisc", "parisc64", "ppc", "s390", "sh", "sheb",
})
# The names that mean the arch this module compiles for.
NATIVE_FILTER_ARCH_NAMES = frozenset({"amd64", "x86_64"})

# x86_64 syscalls newer than upstream libseccomp 2.5.4 (number from arch/x86/entry/syscalls/
# syscall_64.tbl; kernel release that added it in the comment). Whether the installed
# libseccomp resolves one is asked at runtime, never assumed from this table.
NEWER_X86_64: dict[str, int] = {
    "uretprobe": 335,          # 6.11
    "uprobe": 336,             # 6.16
    "cachestat": 451,          # 6.5
    "fchmodat2": 452,          # 6.6
    "map_shadow_stack": 453,   # 6.6
    "futex_wake": 454,         # 6.7
    "futex_wait": 455,         # 6.7
    "futex_requeue": 456,      # 6.7
    "statmount": 457,          # 6.8
    "listmount": 458,          # 6.8
    "lsm_get_self_attr": 459,  # 6.8
    "lsm_set_self_attr": 460,  # 6.8
    "lsm_list_modules": 461,   # 6.8
    "mseal": 462,              # 6.10
    "setxattrat": 463,         # 6.13
    "getxattrat": 464,         # 6.13
    "listxattrat": 465,        # 6.13
    "removexattrat": 466,      # 6.13
    "open_tree_attr": 467,     # 6.15
    "file_getattr": 468,       # 6.17
    "file_setattr": 469,       # 6.17
    "listns": 470,             # 6.18
}
# Newer syscalls that exist only on other arches (names only: they can never be enforced on
# x86_64 and are accepted so multi-arch profiles load).
NEWER_OTHER_ARCHES = frozenset({"riscv_hwprobe"})

_UNISTD_64 = "/usr/include/x86_64-linux-gnu/asm/unistd_64.h"


class _Version(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint), ("minor", ctypes.c_uint), ("micro", ctypes.c_uint)]


def _load_libseccomp() -> ctypes.CDLL:
    # Our own handle (not pyseccomp's), so the argtypes set here cannot clash with its own:
    # pyseccomp passes arch tokens through an untyped int, which overflows for 0xC000003E.
    path = ctypes.util.find_library("seccomp")
    if path is None:
        raise ImportError("libseccomp not found; install libseccomp2 (scripts/setup.sh)")
    lib = ctypes.CDLL(path)
    lib.seccomp_syscall_resolve_name_arch.argtypes = (ctypes.c_uint32, ctypes.c_char_p)
    lib.seccomp_syscall_resolve_name_arch.restype = ctypes.c_int
    lib.seccomp_syscall_resolve_num_arch.argtypes = (ctypes.c_uint32, ctypes.c_int)
    lib.seccomp_syscall_resolve_num_arch.restype = ctypes.c_void_p  # malloc'd char *
    lib.seccomp_arch_native.argtypes = ()
    lib.seccomp_arch_native.restype = ctypes.c_uint32
    lib.seccomp_version.argtypes = ()
    lib.seccomp_version.restype = ctypes.POINTER(_Version)
    return lib


_lib = _load_libseccomp()
_libc = ctypes.CDLL(None)
_libc.free.argtypes = (ctypes.c_void_p,)
_libc.free.restype = None

NATIVE_ARCH: int = _lib.seccomp_arch_native()


def libseccomp_version() -> str:
    v = _lib.seccomp_version().contents
    return f"{v.major}.{v.minor}.{v.micro}"


def libseccomp_number(name: str, arch: int = NATIVE_ARCH) -> int:
    """libseccomp's number for `name` on `arch`: >= 0 a real syscall, -1 unknown to this
    libseccomp, any other negative value a pseudo number (not a syscall of `arch`)."""
    return int(_lib.seccomp_syscall_resolve_name_arch(arch, name.encode()))


def is_pseudo(nr: int) -> bool:
    return nr < 0 and nr != _NR_SCMP_ERROR


@functools.lru_cache(maxsize=1)
def kernel_header_numbers() -> dict[str, int]:
    """name -> number from the installed uapi header (empty when linux-libc-dev is absent)."""
    out: dict[str, int] = {}
    try:
        with open(_UNISTD_64, encoding="ascii") as f:
            for line in f:
                m = re.match(r"#define __NR_(\w+)\s+(\d+)\s*$", line)
                if m:
                    out[m.group(1)] = int(m.group(2))
    except OSError:
        pass
    return out


@functools.lru_cache(maxsize=4096)
def is_known_name(name: str) -> bool:
    """True when some source knows `name` as a Linux syscall on some architecture."""
    if not name or not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
        return False
    return (libseccomp_number(name) != _NR_SCMP_ERROR or name in kernel_header_numbers()
            or name in NEWER_X86_64 or name in NEWER_OTHER_ARCHES)


@functools.lru_cache(maxsize=1)
def _native_names() -> dict[int, str]:
    names = {nr: n for n, nr in kernel_header_numbers().items()}
    if NATIVE_ARCH == AUDIT_ARCH_X86_64:
        names.update({nr: n for n, nr in NEWER_X86_64.items()})
    return names


def syscall_name(nr: int, arch: int = NATIVE_ARCH) -> str:
    """Name of syscall `nr` on `arch` (an AUDIT_ARCH_* value), or "syscall_<nr>" if unknown."""
    if arch == AUDIT_ARCH_X86_64 and nr >= X32_SYSCALL_BIT:
        return f"x32:syscall_{nr & ~X32_SYSCALL_BIT}"
    ptr = _lib.seccomp_syscall_resolve_num_arch(arch, nr)
    if ptr:
        try:
            return ctypes.string_at(ptr).decode()
        finally:
            _libc.free(ptr)
    if arch == NATIVE_ARCH:
        name = _native_names().get(nr)
        if name:
            return name
    return f"syscall_{nr}"


@functools.lru_cache(maxsize=1)
def known_names() -> tuple[str, ...]:
    """Every syscall name a suggestion may point at (for "did you mean"): the header's names,
    the newer table, and libseccomp's names for the native arch."""
    names = set(kernel_header_numbers()) | set(NEWER_X86_64) | set(NEWER_OTHER_ARCHES)
    for nr in range(0, 1024):
        ptr = _lib.seccomp_syscall_resolve_num_arch(NATIVE_ARCH, nr)
        if ptr:
            names.add(ctypes.string_at(ptr).decode())
            _libc.free(ptr)
    return tuple(sorted(names))


def kernel_release() -> tuple[int, ...]:
    """(major, minor, patch) of the running kernel, from uname -r ("6.18.44-fc" -> (6, 18, 44))."""
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", os.uname().release)
    if not m:
        return (0, 0, 0)
    return tuple(int(x or 0) for x in m.groups())
