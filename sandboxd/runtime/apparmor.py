"""AppArmor for the workload: validate and load profiles, apply one at execve, read it back.

Theory of operation
-------------------
A plan names a profile (`AppArmorPlan.profile`, a file profiles/apparmor/<name>), a mode
(enforce or complain) and whether it is required. The steps stay apart:

  host_support()      probe: is AppArmor on in this kernel (module parameter and securityfs),
                      may this process load policy, which procfs interface, parser and
                      LibAppArmor there are, and the label sandboxd itself runs under.
  validate_profile()  parse a profile file with apparmor_parser without loading it (-Q): at
                      policy load time, and in the unit tests on hosts without AppArmor.
  check_plan()        decide, writing nothing: refuse (required but unavailable:
                      HostCapabilityError), report "not applied (host lacks AppArmor)", or go on.
  ensure_loaded()     the kernel side: as root, load (replace) the profile from its file, once
                      per file content; otherwise check it is loaded, and fail naming it and
                      the command that loads it.
  prepare()           resolve the transition the workload makes at execve: "exec <label>" or
                      "stack <label>", written to /proc/self/attr/apparmor/exec.
  apply_exec()        the child's step, after no_new_privs and before Landlock (which would
                      refuse the procfs write) and seccomp: LibAppArmor's aa_change_onexec /
                      aa_stack_onexec when importable, the procfs write otherwise. Nothing
                      changes until execve, where the kernel either moves the task into the
                      profile or fails the execve.
  read_confinement()  the label and mode the kernel reports for a pid, for the attestation:
  verify()            what the run reports is read back from /proc, never assumed.

Complain mode. A mode belongs to a loaded profile and profile names are global, so switching
`sandboxd-judge` to complain for one run would switch every run on the host. Complain mode
therefore uses a second loaded profile, `<name>.complain`, rendered from the same file with
`complain` added to its flags (`render_profile`). The kernel still enforces a profile's `deny`
rules in complain mode (tests/vm proves it): they are each profile's hard floor, and everything
else is allowed and logged ("ALLOWED" audit records).

exec or stack. The workload execs under no_new_privs. From an unconfined sandboxd the kernel
allows a plain transition ("exec"). From a confined one (the sandboxd-launcher profile, needed
on hosts that restrict user namespaces) no_new_privs only allows moving to a subset of the
current confinement, which a stack always is, so sandboxd stacks: the workload's label becomes
`<profile>//&sandboxd-launcher`, confined by both (the launcher profile allows nearly
everything, so in effect by the workload's profile). The launcher profile must allow it with
`change_profile -> &sandboxd-*`.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sandboxd.errors import HostCapabilityError, LaunchError, PlanError, ProfileError
from sandboxd.runtime import linux

__all__ = [
    "ExecTransition", "Prepared", "apply_exec", "check_plan", "ensure_loaded", "find_profile",
    "host_support", "libapparmor", "loaded_profiles", "parse_confinement", "prepare",
    "prepare_exec", "read_confinement", "render_profile", "validate_profile", "verify",
    "PROFILE_DIR", "COMPLAIN_SUFFIX",
]

PROJECT_ROOT = Path(__file__).resolve().parent.parent.parent
# Same convention as sandboxd.planner: SANDBOXD_PROFILES overrides the project's profiles/.
PROFILE_DIR = Path(os.environ.get("SANDBOXD_PROFILES", PROJECT_ROOT / "profiles")) / "apparmor"

SECURITYFS = "/sys/kernel/security/apparmor"
ENABLED_PARAM = "/sys/module/apparmor/parameters/enabled"
# The feature set Debian's apparmor package pins policy to. Used as the kernel's features when
# validating on a kernel without AppArmor, so validation matches what a Debian kernel accepts
# (without it the parser assumes a kernel that cannot even stack).
PINNED_FEATURES = "/usr/share/apparmor-features/features"
# Where Debian's python3-libapparmor lives, for a venv that does not see system packages.
DIST_PACKAGES = ("/usr/lib/python3/dist-packages",)

COMPLAIN_SUFFIX = ".complain"
MODES = ("enforce", "complain")
# A profile name as policies may write it (sandboxd/policy/schema.py NAME_PATTERN).
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}\Z")
# The one header line every sandboxd profile file has: `profile <name> [flags=(...)] {`.
_HEADER_RE = re.compile(r"^(?P<indent>[ \t]*)profile[ \t]+(?P<name>[^\s{]+)"
                        r"(?:[ \t]+flags[ \t]*=[ \t]*\((?P<flags>[^)]*)\))?[ \t]*\{[ \t]*$",
                        re.MULTILINE)
_ABI4_MARK = re.compile(r"^(?P<indent>[ \t]*)#sandboxd-abi4: (?P<rule>.*)$", re.MULTILINE)
_ABI3_LINE = re.compile(r"^abi <abi/3\.0>,[ \t]*$", re.MULTILINE)
# Flags that set a mode: the plan decides the mode, so a profile file may not.
_MODE_FLAGS = frozenset({"enforce", "complain", "kill", "unconfined", "prompt"})
# "AppArmor parser error for <file> in profile <file> at line <n>: <message>"
_PARSER_ERR_RE = re.compile(r"AppArmor parser error for (?P<file>.+?) in (?:profile )?(?P<where>.+?) "
                            r"at line (?P<line>\d+): (?P<msg>.*)")
# Parser chatter on kernels without AppArmor: not an error.
_PARSER_NOISE = ("Cache read/write disabled",)
_PARSER_TIMEOUT_S = 120      # compiling a large profile under emulation (the VM tier) is slow


# -- host probe ---------------------------------------------------------------------------------

def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


@functools.lru_cache(maxsize=None)
def _parser() -> tuple[str | None, str | None]:
    """(path, version) of apparmor_parser, or (None, None). Probed once: it does not change."""
    import subprocess   # only the probe and the loader need it
    path = shutil.which("apparmor_parser",
                        path=os.environ.get("PATH", "") + os.pathsep + "/usr/sbin:/sbin")
    version = None
    if path:
        try:
            out = subprocess.run([path, "--version"], capture_output=True, text=True,
                                 timeout=30).stdout
            m = re.search(r"version (\d+(?:\.\d+)*)", out)
            version = m.group(1) if m else None
        except (OSError, subprocess.TimeoutExpired):
            version = None
    return path, version


def _major(version: str | None) -> int:
    try:
        return int((version or "0").split(".")[0])
    except ValueError:
        return 0


def host_support(*, securityfs: str = SECURITYFS, enabled_param: str = ENABLED_PARAM,
                 proc: str = "/proc") -> dict[str, Any]:
    """What this host can do with AppArmor. Reads files only (and `apparmor_parser --version`).

    `enabled` is True only when the kernel has AppArmor on (the module parameter says Y) and
    its securityfs directory is there, which is what loading and transitions need.
    The paths are parameters so tests can point them at a temporary directory.
    """
    param = _read(enabled_param)
    param_on = param is not None and param.strip().upper().startswith("Y")
    fs_there = os.path.isdir(securityfs) and os.path.exists(os.path.join(securityfs, "profiles"))
    reason = None
    if param is None:
        reason = f"the kernel has no AppArmor ({enabled_param} does not exist)"
    elif not param_on:
        reason = f"AppArmor is disabled in this kernel ({enabled_param} is {param.strip()!r})"
    elif not fs_there:
        reason = (f"AppArmor's securityfs is not mounted at {securityfs} "
                  "(mount -t securityfs securityfs /sys/kernel/security)")
    # The LSM-specific directory exists since Linux 5.8 (so AppArmor works next to other LSMs);
    # before it, attr/exec and attr/current are AppArmor's when it is the major LSM.
    attr_dir = f"{proc}/self/attr/apparmor" if os.path.isdir(f"{proc}/self/attr/apparmor") \
        else f"{proc}/self/attr"
    self_label = None
    if reason is None:
        self_label = (_read(f"{attr_dir}/current") or "").strip().rstrip("\0") or None
    parser, version = _parser()
    return {
        "enabled": reason is None,
        "reason": reason,
        "securityfs": securityfs,
        "exec_attr": "/proc/self/attr/apparmor/exec" if attr_dir.endswith("/apparmor")
                     else "/proc/self/attr/exec",
        "self_label": self_label,
        "can_load": reason is None and os.geteuid() == 0 and parser is not None,
        "parser": parser,
        "parser_version": version,
        "abi4": _major(version) >= 4,
        # The kernel mediates user namespace creation (Ubuntu's restriction): the launcher
        # profile's `userns` rule matters here.
        "userns_mediated": os.path.exists(os.path.join(securityfs, "features/namespaces/userns_create")),
        "libapparmor": libapparmor() is not None,
    }


# -- LibAppArmor ----------------------------------------------------------------------------------

_lib: Any = None
_lib_tried = False


def libapparmor() -> Any:
    """Debian's python3-libapparmor module, or None. Loaded once, in the launcher, before fork.

    A venv does not see /usr/lib/python3/dist-packages, and adding that whole directory to
    sys.path would let every Debian Python package shadow the venv's. So only the LibAppArmor
    package is loaded from there, by file location.
    """
    global _lib, _lib_tried
    if _lib_tried:
        return _lib
    mod = None
    try:
        import LibAppArmor as mod  # type: ignore[import-not-found, no-redef]
    except ImportError:
        for d in DIST_PACKAGES:
            init = os.path.join(d, "LibAppArmor", "__init__.py")
            if not os.path.exists(init):
                continue
            spec = importlib.util.spec_from_file_location(
                "LibAppArmor", init, submodule_search_locations=[os.path.dirname(init)])
            if spec is None or spec.loader is None:
                continue
            m = importlib.util.module_from_spec(spec)
            sys.modules["LibAppArmor"] = m
            try:
                spec.loader.exec_module(m)
            except Exception:      # wrong Python ABI for the extension, broken install
                sys.modules.pop("LibAppArmor", None)
                sys.modules.pop("LibAppArmor.LibAppArmor", None)
                continue
            mod = m
            break
    if mod is not None and not all(hasattr(mod, f) for f in ("aa_change_onexec", "aa_stack_onexec")):
        mod = None
    _lib, _lib_tried = mod, True
    return _lib


# -- profiles: find, parse the header, render ----------------------------------------------------

def _check_name(name: Any, step: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise PlanError(f"bad AppArmor profile name {name!r}: lower-case letters, digits, '.', "
                        "'_', '-', up to 63, starting with a letter or digit", step=step)
    if name.endswith(COMPLAIN_SUFFIX):
        raise PlanError(f"bad AppArmor profile name {name!r}: names ending in "
                        f"{COMPLAIN_SUFFIX!r} are reserved for complain-mode variants; set "
                        "mode: complain instead", step=step)
    return name


def find_profile(name: str, dirs: tuple[str | Path, ...] | None = None) -> str:
    """The file of profile `name`: <dir>/<name> in the first directory that has it."""
    _check_name(name, "apparmor")
    dirs = tuple(dirs) if dirs is not None else (PROFILE_DIR,)
    for d in dirs:
        p = os.path.join(str(d), name)
        if os.path.isfile(p):
            return p
    raise ProfileError(f"unknown AppArmor profile {name!r}", step="apparmor",
                       path=os.path.join(str(dirs[0]), name) if dirs else None,
                       hint="a profile is a file named after it in "
                            + ", ".join(str(d) for d in dirs))


@dataclass(frozen=True)
class Header:
    name: str
    flags: tuple[str, ...]
    line: int          # 1-based line of the header


def profile_header(text: str, path: str) -> Header:
    """The file's single `profile <name> [flags=(...)] {` line. ProfileError otherwise."""
    found = list(_HEADER_RE.finditer(text))
    if len(found) != 1:
        raise ProfileError(
            f"a sandboxd AppArmor profile file defines exactly one profile on a one-line header "
            f"`profile <name> flags=(...) {{`; found {len(found)}", step="apparmor_validate",
            path=path)
    m = found[0]
    flags = tuple(f.strip() for f in (m.group("flags") or "").split(",") if f.strip())
    return Header(name=m.group("name"), flags=flags, line=text.count("\n", 0, m.start()) + 1)


def render_profile(text: str, path: str, *, complain: bool = False, abi4: bool = False) -> str:
    """The text loaded into the kernel. Pure; keeps every line where it was (error lines match).

    complain: rename the profile `<name>.complain` and add `complain` to its flags.
    abi4: for AppArmor 4 parsers, in a file that has `#sandboxd-abi4: ` lines, uncomment them
          and declare abi 4.0 (the launcher profile's `userns` rule).
    """
    h = profile_header(text, path)
    if complain:
        flags = ",".join(h.flags + ("complain",))
        m = _HEADER_RE.search(text)
        assert m is not None
        text = (text[:m.start()] + f"{m.group('indent')}profile {h.name}{COMPLAIN_SUFFIX} "
                f"flags=({flags}) {{" + text[m.end():])
    if abi4 and _ABI4_MARK.search(text):
        # Only files written for it switch ABI: declaring 4.0 changes what the kernel mediates
        # (unix sockets, user namespaces, io_uring...), which a 3.0 profile does not plan for.
        text = _ABI4_MARK.sub(lambda m: m.group("indent") + m.group("rule"), text)
        text = _ABI3_LINE.sub("abi <abi/4.0>,", text)
    return text


def _read_profile(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise ProfileError("cannot read AppArmor profile", step="apparmor", path=path,
                           errno=e.errno) from None
    except UnicodeDecodeError as e:
        raise ProfileError(f"AppArmor profile is not UTF-8 text ({e.reason} at byte {e.start})",
                           step="apparmor_validate", path=path) from None


def _check_header(text: str, path: str) -> Header:
    h = profile_header(text, path)
    want = os.path.basename(path)
    if h.name != want:
        raise ProfileError(f"{path}:{h.line}: the file defines profile {h.name!r}; a profile file "
                           f"is named after its profile, so this one must define {want!r}",
                           step="apparmor_validate", path=path)
    bad = sorted(set(h.flags) & _MODE_FLAGS)
    if bad:
        raise ProfileError(f"{path}:{h.line}: flags {bad} set a mode; the policy chooses the mode "
                           "(apparmor.mode), so remove them from the file", step="apparmor_validate",
                           path=path)
    return h


# -- apparmor_parser ------------------------------------------------------------------------------

def _run_parser(args: list[str], text: str, path: str, step: str) -> None:
    """Run apparmor_parser on `text` (the rendering of `path`); errors name `path` and the line."""
    import subprocess
    parser, _ = _parser()
    if parser is None:
        raise HostCapabilityError("apparmor_parser is not installed", step=step, path=path,
                                  hint="apt-get install apparmor (scripts/setup.sh does)")
    with tempfile.TemporaryDirectory(prefix="sandboxd-aa-") as td:
        # Same base name: the parser names the file in its messages.
        tmp = os.path.join(td, os.path.basename(path))
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        try:
            r = subprocess.run([parser, *args, tmp], capture_output=True, text=True,
                               timeout=_PARSER_TIMEOUT_S, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise ProfileError(f"apparmor_parser took more than {_PARSER_TIMEOUT_S} s", step=step,
                               path=path) from None
        except OSError as e:
            raise HostCapabilityError("cannot run apparmor_parser", step=step, path=parser,
                                      errno=e.errno) from None
    if r.returncode == 0:
        return
    lines = [ln for ln in (r.stderr + r.stdout).splitlines()
             if ln.strip() and not ln.startswith(_PARSER_NOISE)]
    for ln in lines:
        m = _PARSER_ERR_RE.search(ln)
        if m:
            where = m.group("where")
            where = path if where in (tmp, m.group("file")) else where   # an included file keeps its name
            e = ProfileError(f"{where}:{m.group('line')}: {m.group('msg').strip()}", step=step,
                             path=path)
            e.line = int(m.group("line"))    # type: ignore[attr-defined]
            raise e
    msg = "; ".join(ln.replace(tmp, path) for ln in lines) or f"exit status {r.returncode}"
    raise ProfileError(f"apparmor_parser: {msg}", step=step, path=path)


def _validate_args(support: dict[str, Any]) -> list[str]:
    args = ["--skip-kernel-load", "--skip-cache", "--quiet"]
    if not os.path.isdir(os.path.join(support["securityfs"], "features")) and \
            os.path.exists(PINNED_FEATURES):
        args += ["--kernel-features", PINNED_FEATURES]
    return args


def validate_profile(path: str | Path, *, support: dict[str, Any] | None = None) -> None:
    """Check a profile file as sandboxd will load it: the header, then apparmor_parser -Q.

    Loads nothing, so it works without AppArmor in the kernel. Raises ProfileError whose message
    starts with file:line when the parser names a line.
    """
    path = str(path)
    support = support if support is not None else host_support()
    text = _read_profile(path)
    _check_header(text, path)
    _run_parser(_validate_args(support), render_profile(text, path, abi4=support["abi4"]), path,
                "apparmor_validate")


# -- the kernel's loaded profiles -----------------------------------------------------------------

def loaded_profiles(securityfs: str = SECURITYFS) -> dict[str, str]:
    """{profile name: mode} of the profiles loaded in the kernel.

    <securityfs>/profiles needs root (the kernel's policy-view check); the per-profile
    directories under policy/profiles/ can be read by anyone, so a rootless sandboxd uses those.
    """
    out: dict[str, str] = {}
    text = _read(os.path.join(securityfs, "profiles"))
    if text is not None:
        for line in text.splitlines():
            name, sep, mode = line.rpartition(" (")
            if sep and mode.endswith(")"):
                out[name] = mode[:-1]
        return out
    pdir = os.path.join(securityfs, "policy", "profiles")
    try:
        entries = os.listdir(pdir)
    except OSError as e:
        raise HostCapabilityError("cannot list the loaded AppArmor profiles", step="apparmor_load",
                                  path=pdir, errno=e.errno) from None
    for ent in entries:
        name = _read(os.path.join(pdir, ent, "name"))
        mode = _read(os.path.join(pdir, ent, "mode"))
        if name is not None and mode is not None:
            out[name.strip()] = mode.strip()
    return out


_loaded: dict[str, str] = {}     # label -> sha256 of the text this process loaded


def _label(name: str, mode: str) -> str:
    return name + (COMPLAIN_SUFFIX if mode == "complain" else "")


def _load_hint(name: str, mode: str, path: str) -> str:
    flag = " --complain" if mode == "complain" else ""
    return (f"as root: {sys.executable} -m sandboxd.runtime.apparmor load{flag} {name} "
            f"(renders and loads {path}), or run sandboxd as root so it loads profiles itself")


def ensure_loaded(name: str, path: str, *, mode: str = "enforce",
                  support: dict[str, Any] | None = None) -> str:
    """Make sure the kernel has profile `name` in `mode`; returns the label to transition to.

    As root: load (replace) the rendering of `path` unless this process already loaded that
    exact text and the kernel still has it in the right mode. Otherwise: check only, and raise
    HostCapabilityError naming the missing profile and the command that loads it.
    """
    _check_name(name, "apparmor_load")
    if mode not in MODES:
        raise PlanError(f"AppArmor mode must be one of {list(MODES)}, got {mode!r}", step="apparmor_load")
    support = support if support is not None else host_support()
    if not support["enabled"]:
        raise HostCapabilityError(f"cannot load AppArmor profile {name!r}: {support['reason']}",
                                  step="apparmor_load")
    label = _label(name, mode)
    securityfs = support["securityfs"]
    if not support["can_load"]:
        have = loaded_profiles(securityfs)
        if label not in have:
            raise HostCapabilityError(
                f"AppArmor profile {label!r} is not loaded, and this process (uid {os.geteuid()}) "
                "cannot load it", step="apparmor_load", path=path,
                hint=_load_hint(name, mode, path))
        if have[label] != mode:
            raise HostCapabilityError(
                f"AppArmor profile {label!r} is loaded in {have[label]} mode; the plan asks for "
                f"{mode}", step="apparmor_load", path=path, hint="reload it: " + _load_hint(name, mode, path))
        return label
    text = _read_profile(path)
    _check_header(text, path)
    rendered = render_profile(text, path, complain=(mode == "complain"), abi4=support["abi4"])
    digest = hashlib.sha256(rendered.encode()).hexdigest()
    if _loaded.get(label) == digest and loaded_profiles(securityfs).get(label) == mode:
        return label
    _run_parser(["--replace", "--skip-cache", "--quiet"], rendered, path, "apparmor_load")
    got = loaded_profiles(securityfs).get(label)
    if got != mode:
        raise LaunchError(f"apparmor_parser loaded {path} but the kernel lists {label!r} as "
                          f"{got or 'not loaded'}, not {mode}", step="apparmor_load", path=path)
    _loaded[label] = digest
    return label


# -- decide -----------------------------------------------------------------------------------------

def check_plan(plan: Any, support: dict[str, Any]) -> dict[str, Any]:
    """Decide what happens to `plan` (an AppArmorPlan) on this host. Pure.

    Returns the attestation's starting point; raises PlanError for a malformed plan and
    HostCapabilityError when the profile is required and the host cannot apply it.
    """
    if plan.mode not in MODES:
        raise PlanError(f"apparmor.mode must be one of {list(MODES)}, got {plan.mode!r}",
                        step="apparmor")
    if plan.profile is None:
        return {"requested": None, "applied": False, "reason": "not requested"}
    _check_name(plan.profile, "apparmor")
    report: dict[str, Any] = {"requested": plan.profile, "mode": plan.mode,
                              "required": bool(plan.required)}
    if not support["enabled"]:
        if plan.required:
            raise HostCapabilityError(
                f"AppArmor profile {plan.profile!r} is required, but this host cannot apply it: "
                f"{support['reason']}", step="apparmor",
                hint="run on a kernel with AppArmor enabled (boot with apparmor=1 "
                     "security=apparmor), or set apparmor.required: false in the policy to run "
                     "without it")
        report.update(applied=False, reason="not applied (host lacks AppArmor)",
                      host=support["reason"])
        return report
    report["applied"] = True
    return report


@dataclass(frozen=True)
class ExecTransition:
    """What the workload writes before execve, and what the kernel must report after it."""

    profile: str           # the profile the plan names
    mode: str              # "enforce" or "complain"
    label: str             # the loaded profile: `profile`, or `profile.complain`
    command: str           # "exec" (sandboxd unconfined) or "stack" (sandboxd confined)
    attr_path: str         # /proc/self/attr/apparmor/exec, or attr/exec before Linux 5.8
    self_label: str        # sandboxd's own label when this was resolved, e.g. "unconfined"

    @property
    def data(self) -> bytes:
        return f"{self.command} {self.label}".encode()

    def expected(self) -> tuple[frozenset[str], frozenset[str]]:
        """(profiles in the workload's label, modes the kernel may print for it)."""
        own = frozenset(parse_confinement(self.self_label)[0].split("//&"))
        if self.command == "exec":
            return frozenset({self.label}), frozenset({self.mode})
        # A stack of an enforce launcher and a complain profile prints as "mixed".
        modes = {self.mode} if parse_confinement(self.self_label)[1] == self.mode else {"mixed"}
        return frozenset({self.label}) | own, frozenset(modes)


def resolve_transition(label: str, mode: str, support: dict[str, Any], profile: str) -> ExecTransition:
    """exec from an unconfined sandboxd, stack from a confined one (see the module doc). Pure."""
    self_label = support.get("self_label") or "unconfined"
    command = "exec" if parse_confinement(self_label)[0] == "unconfined" else "stack"
    return ExecTransition(profile=profile, mode=mode, label=label, command=command,
                          attr_path=support["exec_attr"], self_label=self_label)


@dataclass
class Prepared:
    """The launcher's result for one plan: the child's transition (None: nothing to apply) and
    the attestation so far (completed by `verify` once the workload runs)."""

    transition: ExecTransition | None
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def exec_write(self) -> tuple[str, bytes] | None:
        t = self.transition
        return None if t is None else (t.attr_path, t.data)


_default_support: dict[str, Any] | None = None


def _support() -> dict[str, Any]:
    # What the host can do does not change while a launcher lives: probe once, not per run.
    global _default_support
    if _default_support is None:
        _default_support = host_support()
    return _default_support


def prepare(plan: Any, *, support: dict[str, Any] | None = None,
            dirs: tuple[str | Path, ...] | None = None) -> Prepared:
    """Launcher side, per run, before fork: decide, load if needed, resolve the transition."""
    support = support if support is not None else _support()
    report = check_plan(plan, support)
    if not report["applied"]:
        return Prepared(None, report)
    # A plan that carries the resolved file (as SeccompPlan does) wins over the lookup.
    path = getattr(plan, "path", None) or find_profile(plan.profile, dirs)
    label = ensure_loaded(plan.profile, path, mode=plan.mode, support=support)
    libapparmor()            # import now: after pivot_root the child may not see the module
    t = resolve_transition(label, plan.mode, support, plan.profile)
    report.update(label=label, transition=t.command, file=path)
    return Prepared(t, report)


def prepare_exec(plan: Any, *, support: dict[str, Any] | None = None,
                 dirs: tuple[str | Path, ...] | None = None) -> tuple[str, bytes] | None:
    """(path, bytes) the child writes right before execve, or None when nothing applies."""
    return prepare(plan, support=support, dirs=dirs).exec_write


# -- apply (the child) ------------------------------------------------------------------------------

def _proc_is_ours() -> bool:
    # LibAppArmor writes /proc/<gettid()>/attr/...: wrong when the /proc mounted here belongs to
    # another pid namespace (between unshare(CLONE_NEWPID) and mounting the run's own /proc).
    # /proc/self resolves in the mount's namespace, getpid() in ours: equal when they agree
    # (the workload is single-threaded, so its tid is its pid).
    try:
        return int(os.readlink("/proc/self")) == os.getpid()
    except (OSError, ValueError):
        return False


def apply_exec(t: ExecTransition | tuple[str, bytes], *, method: str = "auto") -> str:
    """Child side: ask the kernel to move this task into the profile at its next execve.

    method: "auto" (LibAppArmor when it was imported before fork and /proc is this task's own,
    else procfs), "libapparmor" or "procfs". Returns the method used. Raises LaunchError with the
    errno (ENOENT: the profile is not loaded; EPERM/EACCES: the current confinement forbids it).
    """
    if isinstance(t, tuple):
        path, data = t
        label, command = None, None
    else:
        path, data, label, command = t.attr_path, t.data, t.label, t.command
    lib = _lib if method in ("auto", "libapparmor") else None
    if method == "libapparmor" and (lib is None or label is None):
        raise LaunchError("LibAppArmor is not loaded (call libapparmor() before fork)",
                          step="apparmor_exec")
    if lib is not None and label is not None and (method == "libapparmor" or _proc_is_ours()):
        fn = lib.aa_stack_onexec if command == "stack" else lib.aa_change_onexec
        try:
            fn(label)
        except OSError as e:
            raise LaunchError(f"{fn.__name__}({label!r})", step="apparmor_exec",
                              errno=e.errno) from None
        return "libapparmor"
    # One write() with os.write: a buffered file would report the kernel's refusal only at
    # close, where Python may drop it.
    linux.write_file(path, data, step="apparmor_exec")
    return "procfs"


# -- read back ------------------------------------------------------------------------------------

def read_confinement(pid: int | str, *, proc: str = "/proc") -> str:
    """The confinement the kernel reports for `pid`, e.g. "sandboxd-judge (enforce)".

    Works for a zombie too (its credentials live until it is reaped), so a supervisor can read
    a workload that already exited, after waitid(WNOWAIT).
    """
    last: OSError | None = None
    for p in (f"{proc}/{pid}/attr/apparmor/current", f"{proc}/{pid}/attr/current"):
        try:
            fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            last = e
            if e.errno == 2 and p.endswith("/apparmor/current") and os.path.isdir(f"{proc}/{pid}"):
                continue             # kernel before 5.8: no LSM-specific directory
            break
        try:
            data = os.read(fd, 4096)
        except OSError as e:
            last = e
            break
        finally:
            os.close(fd)
        return data.decode(errors="replace").strip().rstrip("\0").strip()
    raise LaunchError(f"cannot read the AppArmor confinement of pid {pid}", step="apparmor_attest",
                      path=f"{proc}/{pid}/attr", errno=last.errno if last else None)


def parse_confinement(s: str) -> tuple[str, str | None]:
    """"a//&b (enforce)" -> ("a//&b", "enforce"); "unconfined" -> ("unconfined", None)."""
    s = s.strip()
    label, sep, mode = s.rpartition(" (")
    if sep and mode.endswith(")"):
        return label, mode[:-1]
    return s, None


def verify(t: ExecTransition, confinement: str) -> dict[str, Any]:
    """Compare what the kernel reports (`read_confinement`) with the transition. The
    attestation's AppArmor part; LaunchError when the workload is not confined as planned."""
    label, mode = parse_confinement(confinement)
    want_profiles, want_modes = t.expected()
    ok = frozenset(label.split("//&")) == want_profiles and mode in want_modes
    if not ok:
        raise LaunchError(f"the workload runs as {confinement!r}, not in AppArmor profile "
                          f"{t.label!r} ({t.mode})", step="apparmor_attest")
    return {"profile": t.profile, "mode": t.mode, "label": t.label, "transition": t.command,
            "confinement": confinement, "enforced": True}


# -- operator tool ----------------------------------------------------------------------------------

def _main(argv: list[str]) -> int:
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="python -m sandboxd.runtime.apparmor",
                                 description="Inspect, validate and load sandboxd's AppArmor profiles.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("status", help="what this host supports, and which sandboxd profiles are loaded")
    v = sub.add_parser("validate", help="parse profiles with apparmor_parser without loading them")
    v.add_argument("names", nargs="*", help="profile names (default: every file in the profile dir)")
    ld = sub.add_parser("load", help="load (replace) profiles into the kernel (root)")
    ld.add_argument("--complain", action="store_true", help="load the complain-mode variants")
    ld.add_argument("names", nargs="*", help="profile names (default: every file in the profile dir)")
    a = ap.parse_args(argv)
    support = host_support()
    names = getattr(a, "names", None) or sorted(
        n for n in os.listdir(PROFILE_DIR) if _NAME_RE.match(n) and (PROFILE_DIR / n).is_file())
    if a.cmd == "status":
        loaded = {}
        if support["enabled"]:
            loaded = {k: v for k, v in loaded_profiles(support["securityfs"]).items()
                      if k.startswith("sandboxd-")}
        print(json.dumps({"host": support, "loaded": loaded, "profile_dir": str(PROFILE_DIR)}, indent=2))
        return 0
    for n in names:
        path = find_profile(n)
        if a.cmd == "validate":
            validate_profile(path, support=support)
            print(f"ok: {path}")
        else:
            label = ensure_loaded(n, path, mode="complain" if a.complain else "enforce", support=support)
            print(f"loaded: {label}")
    return 0


if __name__ == "__main__":
    from sandboxd.errors import SandboxError
    try:
        sys.exit(_main(sys.argv[1:]))
    except SandboxError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
