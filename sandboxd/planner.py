"""Build plans from a few choices: the host-derived parts every plan shares.

The policy engine (sandboxd.policy) and the local CLI (`sandboxd run`) both call these, so a
plan made on the command line and one made by a policy have the same filesystem layout.
Resolution happens here, on the host, before anything runs: paths are checked, symlinked
system directories are reproduced as symlinks, profiles are resolved to a file and a digest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

from sandboxd.errors import PlanError, ProfileError
from sandboxd.plan import (Bind, FilesystemPlan, LandlockPlan, Limits, Plan, SeccompPlan, Tmpfs,
                           UserPlan)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PROFILES_DIR = Path(os.environ.get("SANDBOXD_PROFILES", PROJECT_ROOT / "profiles"))

# System directories bound read-only. On merged-/usr hosts /bin, /lib, ... are symlinks into
# /usr; they are reproduced as symlinks, not bound twice.
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
# The /etc files ordinary programs read (dynamic loader, name service, time zone, TLS roots,
# the alternatives symlinks compilers go through). Optional: hosts differ.
ETC_FILES = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/nsswitch.conf",
             "/etc/localtime", "/etc/alternatives", "/etc/ssl/certs", "/etc/mime.types",
             "/etc/os-release", "/etc/debian_version")


def system_filesystem(*, work_dir: str = "/box", work_host_path: str | None = None,
                      work_size_bytes: int = 64 << 20, tmp_size_bytes: int = 64 << 20,
                      shm_size_bytes: int = 16 << 20, extra_binds: tuple[Bind, ...] = (),
                      hostname: str = "sandbox", uid: int = 1000, gid: int = 1000) -> FilesystemPlan:
    binds: list[Bind] = []
    symlinks: list[tuple[str, str]] = []
    for d in SYSTEM_DIRS:
        if os.path.islink(d):
            symlinks.append((d, os.readlink(d)))
        elif os.path.isdir(d):
            binds.append(Bind(source=d, target=d))
    for f in ETC_FILES:
        if os.path.exists(f):
            binds.append(Bind(source=os.path.realpath(f) if not os.path.isdir(f) else f, target=f,
                              optional=True))
    binds.extend(extra_binds)
    files = (
        ("/etc/passwd", f"root:x:0:0:root:/root:/usr/sbin/nologin\nsandbox:x:{uid}:{gid}:sandbox:{work_dir}:/bin/sh\n"
                        "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"),
        ("/etc/group", f"root:x:0:\nsandbox:x:{gid}:\nnogroup:x:65534:\n"),
        ("/etc/hosts", f"127.0.0.1 localhost {hostname}\n::1 localhost\n"),
        ("/etc/hostname", hostname + "\n"),
    )
    return FilesystemPlan(
        binds=tuple(binds), symlinks=tuple(symlinks), files=files,
        tmpfs=(Tmpfs("/tmp", tmp_size_bytes), Tmpfs("/dev/shm", shm_size_bytes)),
        work_dir=work_dir, work_host_path=work_host_path, work_size_bytes=work_size_bytes)


def seccomp_plan(name: str, *, report_denials: bool = True) -> SeccompPlan:
    """Resolve a profile name (profiles/seccomp/<name>.json) or a path to a SeccompPlan."""
    if "/" in name or name.endswith(".json"):
        path = Path(name).resolve()
        pname = path.stem
    else:
        if not name.replace("-", "").replace("_", "").isalnum():
            raise ProfileError(f"bad profile name {name!r}", step="seccomp")
        path = PROFILES_DIR / "seccomp" / f"{name}.json"
        pname = name
    try:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as e:
        raise ProfileError(f"unknown seccomp profile {name!r}", step="seccomp", path=str(path),
                           errno=e.errno) from None
    return SeccompPlan(name=pname, path=str(path), sha256=digest, report_denials=report_denials)


def parse_bind(spec: str, *, writable: bool) -> Bind:
    """`SRC:DST` from the command line; SRC resolved on the host, DST absolute."""
    src, sep, dst = spec.partition(":")
    if not sep or not src or not dst:
        raise PlanError(f"bind must be SRC:DST, got {spec!r}", step="bind")
    real = os.path.realpath(src)
    if not os.path.exists(real):
        raise PlanError("bind source does not exist", step="bind", path=src)
    if not dst.startswith("/") or os.path.normpath(dst) != dst:
        raise PlanError(f"bind target must be absolute and normalised, got {dst!r}", step="bind")
    return Bind(source=real, target=dst, writable=writable)


PRESETS = {
    # name: (seccomp profile, landlock mode, limits overrides)
    "default": ("default", "required", {}),
    "judge": ("judge", "required", {"pids": 16}),
}


def build_plan(argv: list[str], *, preset: str = "default", limits: Limits | None = None,
               binds: tuple[Bind, ...] = (), env: dict[str, str] | None = None, cwd: str | None = None,
               work_host_path: str | None = None, seccomp_profile: str | None = None,
               report_denials: bool = True, hostname: str = "sandbox",
               landlock: bool | None = None,
               run_id: str = "") -> Plan:
    if preset not in PRESETS:
        raise PlanError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}", step="plan")
    prof, ll_mode, lim_over = PRESETS[preset]
    lim = limits or Limits()
    if limits is None and lim_over:
        lim = dataclasses.replace(lim, **lim_over)
    user = UserPlan()
    fs = system_filesystem(work_host_path=work_host_path, extra_binds=binds, hostname=hostname,
                           uid=user.inside_uid, gid=user.inside_gid)
    e = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": fs.work_dir, "LANG": "C.UTF-8"}
    if env:
        e.update(env)
    ll = LandlockPlan(enabled=landlock if landlock is not None else True, mode=ll_mode)
    return Plan(argv=tuple(argv), run_id=run_id, env=tuple(sorted(e.items())), cwd=cwd or fs.work_dir,
                hostname=hostname, user=user, filesystem=fs, limits=lim,
                seccomp=seccomp_plan(seccomp_profile or prof, report_denials=report_denials),
                landlock=ll)
