"""cgroups against a temporary directory laid out like a cgroup filesystem (no root needed).

`FakeKernel` plays the kernel's part of cgroupfs: mkdir makes the interface files a new cgroup
would have (per controller enabled above it), writes are checked and normalised the way the
kernel does (subtree_control and the no-internal-processes rule, page rounding, cgroup.kill),
and rmdir refuses a cgroup with processes or children. Every write is logged, so a test can
check exactly what was written where. Pure v2 is what this host cannot run; the co-mounted
"cpu,cpuacct" v1 layout is the other one it does not have.
"""

from __future__ import annotations

import errno
import os
import pickle
import shutil
from pathlib import Path

import pytest

from sandboxd.errors import HostCapabilityError, LaunchError, PlanError, SandboxError
from sandboxd.plan import Limits
from sandboxd.runtime import cgroups as C

# Above any possible pid_max (2**22), so no real process has it: a kill aimed at it finds nothing.
FAKE_PID = 5_000_001
PAGE = os.sysconf("SC_PAGE_SIZE")


class FakeKernel(C.CgroupFs):
    def __init__(self, tmp: Path, *, v1: dict[str, str] | None = None,
                 features: tuple[str, ...] = ("kill", "peak", "swap_max", "memsw"),
                 swap_kb: int = 0) -> None:
        self.top = tmp / "cg"
        self.proc = tmp / "proc"
        self.v1 = v1                      # v1: hierarchy dir name -> "cpu,cpuacct" etc.; None: v2
        self.features = set(features)
        self.log: list[tuple[str, str]] = []
        self.ignore: set[str] = set()     # files whose writes the "kernel" ignores
        (self.proc / "self").mkdir(parents=True)
        (self.proc / "meminfo").write_text(f"MemTotal: 4000000 kB\nSwapTotal: {swap_kb} kB\n")
        self.top.mkdir()
        if v1 is None:
            self._files(self.top, {
                "cgroup.controllers": "cpuset cpu io memory pids", "cgroup.subtree_control": "",
                "cgroup.procs": "1\n", "cpu.stat": "usage_usec 0\n",
                "cpuset.cpus.effective": "0-3", "cpuset.mems.effective": "0"})
            mounts = [f"30 25 0:26 / {self.top} rw,nosuid - cgroup2 cgroup2 rw,nsdelegate"]
        else:
            mounts = [f"29 25 0:25 / {self.top} rw - tmpfs tmpfs rw"]
            for i, (name, ctrls) in enumerate(v1.items()):
                d = self.top / name
                d.mkdir()
                self._files(d, self._v1_files(set(ctrls.split(",")), root=True))
                mounts.append(f"{31 + i} 29 0:{27 + i} / {d} rw - cgroup cgroup rw,{ctrls}")
        self.set_mountinfo("\n".join(mounts) + "\n")

    # -- test helpers --
    def set_mountinfo(self, text: str) -> None:
        (self.proc / "self" / "mountinfo").write_text(text)

    def set_self_cgroup(self, text: str) -> None:
        (self.proc / "self" / "cgroup").write_text(text)

    def p(self, rel: str) -> Path:
        return self.top / rel.lstrip("/")

    def cat(self, rel: str) -> str:
        return self.p(rel).read_text()

    def put(self, rel: str, text: str) -> None:
        self.p(rel).write_text(text)

    def written(self, rel_dir: str) -> dict[str, str]:
        d = str(self.p(rel_dir))
        return {os.path.basename(p): v for p, v in self.log if os.path.dirname(p) == d}

    def detect(self, **kw) -> C.CgroupManager:
        return C.CgroupManager.detect(fs_root=str(self.top), proc=str(self.proc), fs=self, **kw)

    # -- the kernel's side --
    @staticmethod
    def _files(d: Path, files: dict[str, str]) -> None:
        for k, v in files.items():
            (d / k).write_text(v)

    def _v1_files(self, ctrls: set[str], root: bool = False) -> dict[str, str]:
        f = {"cgroup.procs": "", "tasks": "", "notify_on_release": "0"}
        if "memory" in ctrls:
            f.update({"memory.limit_in_bytes": "9223372036854771712",
                      "memory.swappiness": "60", "memory.max_usage_in_bytes": "0",
                      "memory.usage_in_bytes": "0",
                      "memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 0\n"})
            if "memsw" in self.features:
                f["memory.memsw.limit_in_bytes"] = "9223372036854771712"
        if "pids" in ctrls and not root:
            f.update({"pids.max": "max", "pids.current": "0"})
        if "cpu" in ctrls:
            f.update({"cpu.cfs_quota_us": "-1", "cpu.cfs_period_us": "100000"})
        if "cpuacct" in ctrls:
            f["cpuacct.usage"] = "0"
        if "cpuset" in ctrls:
            f.update({"cpuset.cpus": "0-3" if root else "", "cpuset.mems": "0" if root else ""})
        if "freezer" in ctrls and not root:
            f["freezer.state"] = "THAWED"
        return f

    def _v1_ctrls(self, path: Path) -> set[str]:
        rel = path.relative_to(self.top)
        return set(self.v1[rel.parts[0]].split(","))

    def mkdir(self, path: str) -> None:
        os.mkdir(path)
        d, parent = Path(path), Path(path).parent
        if self.v1 is not None:
            self._files(d, self._v1_files(self._v1_ctrls(d)))
            return
        ctrls = (parent / "cgroup.subtree_control").read_text().split()
        f = {"cgroup.procs": "", "cgroup.controllers": " ".join(ctrls),
             "cgroup.subtree_control": "", "cgroup.events": "populated 0\nfrozen 0\n",
             "cgroup.freeze": "0", "cgroup.type": "domain",
             "cpu.stat": "usage_usec 0\nuser_usec 0\nsystem_usec 0\n"}
        if "kill" in self.features:
            f["cgroup.kill"] = ""
        if "memory" in ctrls:
            f.update({"memory.max": "max", "memory.current": "0", "memory.oom.group": "0",
                      "memory.events": "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\n"})
            if "peak" in self.features:
                f["memory.peak"] = "0"
            if "swap_max" in self.features:
                f["memory.swap.max"] = "max"
        if "pids" in ctrls:
            f.update({"pids.max": "max", "pids.current": "0"})
        if "cpu" in ctrls:
            f.update({"cpu.max": "max 100000", "cpu.weight": "100"})
        if "cpuset" in ctrls:
            eff = (parent / "cpuset.cpus.effective").read_text()
            f.update({"cpuset.cpus": "", "cpuset.cpus.effective": eff, "cpuset.mems": "",
                      "cpuset.mems.effective": "0"})
        self._files(d, f)

    def rmdir(self, path: str) -> None:
        d = Path(path)
        if not d.exists():
            raise FileNotFoundError(errno.ENOENT, "No such file", path)
        if (d / "cgroup.procs").read_text().split() or any(x.is_dir() for x in d.iterdir()):
            raise OSError(errno.EBUSY, "Device or resource busy", path)
        shutil.rmtree(d)

    def write(self, path: str, data: str) -> None:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(errno.ENOENT, "No such file", path)
        self.log.append((path, data))
        name, d = p.name, p.parent
        if name in self.ignore:
            return
        if name == "cgroup.subtree_control":
            have = set(p.read_text().split())
            offered = set((d / "cgroup.controllers").read_text().split())
            for tok in data.split():
                if tok[1:] not in offered:
                    raise OSError(errno.ENOENT, "No such file", path)
                if d != self.top and (d / "cgroup.procs").read_text().split():
                    raise OSError(errno.EBUSY, "Device or resource busy", path)
                (have.add if tok[0] == "+" else have.discard)(tok[1:])
            p.write_text(" ".join(sorted(have)) + "\n")
        elif name == "cgroup.procs":
            internal = self.v1 is None and d != self.top
            if internal and (d / "cgroup.subtree_control").read_text().split():
                raise OSError(errno.EBUSY, "Device or resource busy", path)
            p.write_text(p.read_text() + data + "\n")
            if (d / "cgroup.events").exists():
                (d / "cgroup.events").write_text("populated 1\nfrozen 0\n")
        elif name == "cgroup.kill":
            (d / "cgroup.procs").write_text("")
            (d / "cgroup.events").write_text("populated 0\nfrozen 0\n")
        elif name in ("memory.max", "memory.swap.max", "memory.limit_in_bytes",
                      "memory.memsw.limit_in_bytes"):
            n = data if data == "max" else str(int(data) // PAGE * PAGE)
            if name == "memory.memsw.limit_in_bytes" and \
                    int(n) < int((d / "memory.limit_in_bytes").read_text()):
                raise OSError(errno.EINVAL, "Invalid argument", path)
            p.write_text(n + "\n")
        elif name == "memory.oom_control":
            kv = dict(line.split() for line in p.read_text().splitlines())
            kv["oom_kill_disable"] = data
            p.write_text("".join(f"{k_} {v}\n" for k_, v in kv.items()))
        elif name == "cpu.max":
            q, _, per = data.partition(" ")
            p.write_text(f"{q} {per or 100000}\n")
        else:
            p.write_text(data + "\n")


def v2(tmp_path, *, base="/sandboxd.slice", base_enables="cpu cpuset memory pids",
       base_procs="", **kw) -> FakeKernel:
    """A v2 host where the daemon is in /daemon.service and `base` is a delegated cgroup."""
    k = FakeKernel(tmp_path, **kw)
    k.put("cgroup.subtree_control", "cpu cpuset io memory pids\n")
    for cg in ("/daemon.service", base):
        if not k.p(cg).exists():
            k.mkdir(str(k.p(cg)))
    k.put("daemon.service/cgroup.procs", "4242\n")
    k.put(base.lstrip("/") + "/cgroup.subtree_control", base_enables + "\n")
    if base_procs:
        k.put(base.lstrip("/") + "/cgroup.procs", base_procs)
    k.set_self_cgroup("0::/daemon.service\n")
    k.log.clear()
    return k


LIM = Limits(memory_bytes=256 << 20, pids=64, cpu_quota=0.5, cpuset="1")


# -- v2 -------------------------------------------------------------------------------------------

def test_v2_create_writes_limits_in_the_run_leaf_only(tmp_path):
    k = v2(tmp_path)
    mgr = k.detect(root="/sandboxd.slice", instance="i1")
    assert mgr.version == 2 and mgr.info()["controllers"] == ["cpu", "cpuset", "memory", "pids"]
    run = mgr.create("r1", LIM)
    inst, leaf = "sandboxd.slice/sandboxd-i1", "sandboxd.slice/sandboxd-i1/run-r1"
    # The instance cgroup (ours) hands the controllers on; the base (not ours) is never written.
    assert k.written(inst) == {"cgroup.subtree_control": "+memory +pids +cpu +cpuset"}
    assert k.written("sandboxd.slice") == {}
    assert k.written(leaf) == {"memory.max": str(256 << 20), "memory.swap.max": "0",
                               "pids.max": "64", "cpu.max": "50000 100000", "cpuset.cpus": "1"}
    assert k.cat(leaf + "/memory.oom.group") == "0"          # untouched: we report which process
    assert run.procs_files == [str(k.p(leaf + "/cgroup.procs"))]
    run.add_pid(FAKE_PID)
    assert k.cat(leaf + "/cgroup.procs").split() == [str(FAKE_PID)]
    assert k.cat(inst + "/cgroup.procs") == ""               # no internal process
    rb = run.readback()
    assert {k_: rb[k_] for k_ in ("version", "memory_limit_bytes", "swap_limit_bytes", "pids_max",
                                  "cpu_quota_us", "cpu_period_us", "cpuset_cpus",
                                  "memory_oom_group")} == {
        "version": 2, "memory_limit_bytes": 256 << 20, "swap_limit_bytes": 0, "pids_max": 64,
        "cpu_quota_us": 50000, "cpu_period_us": 100000, "cpuset_cpus": "1",
        "memory_oom_group": 0}
    run.remove()
    assert k.log[-1] == (str(k.p(leaf + "/cgroup.kill")), "1")
    assert not k.p(leaf).exists() and k.p(inst).exists()
    run.remove()                                             # idempotent
    mgr.close()
    assert not k.p(inst).exists() and k.p("sandboxd.slice").exists()


def test_v2_readback_parses_unlimited(tmp_path):
    k = v2(tmp_path)
    run = k.detect(root="/sandboxd.slice").create("r", Limits(memory_bytes=None, pids=None))
    rb = run.readback()
    assert (rb["memory_limit_bytes"], rb["pids_max"], rb["cpu_quota_us"], rb["cpuset_cpus"],
            rb["cpuset_cpus_effective"]) == (None, None, None, None, "0-3")
    assert rb["swap"] == "off: memory.swap.max = 0"


def test_v2_stats(tmp_path):
    k = v2(tmp_path)
    run = k.detect(root="/sandboxd.slice").create("r", Limits())
    leaf = "sandboxd.slice/sandboxd-default/run-r/"
    k.put(leaf + "cpu.stat", "usage_usec 1234567\nuser_usec 1000000\nsystem_usec 234567\n")
    k.put(leaf + "memory.peak", "104857600\n")
    k.put(leaf + "memory.events", "low 0\nhigh 0\nmax 7\noom 2\noom_kill 2\noom_group_kill 0\n")
    assert run.cpu_usage_ns() == 1_234_567_000
    # The launcher pickles the run into the supervisor, which polls the CPU clock itself.
    assert pickle.loads(pickle.dumps(run)).cpu_usage_ns() == 1_234_567_000
    assert run.memory_peak() == 104857600
    assert run.oom_kills() == 2


def test_v2_memory_peak_falls_back_to_polling_current(tmp_path):
    k = v2(tmp_path, features=("kill", "swap_max"))
    mgr = k.detect(root="/sandboxd.slice")
    run = mgr.create("r", Limits())
    assert mgr.info()["features"]["memory_peak"] is False
    leaf = "sandboxd.slice/sandboxd-default/run-r/"
    for cur, want in (("1000", 1000), ("5000", 5000), ("2000", 5000)):
        k.put(leaf + "memory.current", cur)
        assert run.memory_peak() == want


def test_v2_missing_controller_is_named_with_the_fix(tmp_path):
    k = v2(tmp_path, base_enables="cpu memory")
    with pytest.raises(HostCapabilityError) as e:
        k.detect(root="/sandboxd.slice")
    base = k.p("sandboxd.slice")
    assert str(e.value) == (
        "cgroup_detect: required cgroup v2 controllers are not available below the base: pids "
        f"[{base}/cgroup.subtree_control]; hint: pids: not enabled for the base's children; "
        f"enable it in {base}/cgroup.subtree_control (echo +pids > ...)")
    assert k.log == []                                       # detect writes nothing


def test_v2_controller_not_offered_points_at_the_parent(tmp_path):
    k = v2(tmp_path, base_enables="cpu memory")
    k.put("sandboxd.slice/cgroup.controllers", "cpu memory")
    with pytest.raises(HostCapabilityError) as e:
        k.detect(root="/sandboxd.slice")
    assert (f"pids: not offered to the base (not in {k.p('sandboxd.slice')}/cgroup.controllers); "
            f"enable it in cgroup.subtree_control of {k.top}, or run under systemd with "
            "Delegate=yes") in str(e.value)


def test_v2_own_cgroup_with_processes_explains_the_no_internal_process_rule(tmp_path):
    k = v2(tmp_path)
    with pytest.raises(HostCapabilityError) as e:
        k.detect()                                            # base: /daemon.service, has us
    assert e.value.path == str(k.p("daemon.service/cgroup.subtree_control"))
    assert "itself holds processes" in e.value.hint and "DelegateSubgroup=" in e.value.hint
    assert k.cat("daemon.service/cgroup.subtree_control") == ""


def test_v2_pure_root_base_is_usable(tmp_path):
    k = v2(tmp_path)
    k.set_self_cgroup("0::/\n")
    mgr = k.detect(instance="atroot")                        # root is exempt from the rule
    mgr.create("r", Limits(cpuset=None)).remove()
    assert k.written("") == {}


def test_v2_instance_with_a_process_is_refused_not_emptied(tmp_path):
    k = v2(tmp_path)
    mgr = k.detect(root="/sandboxd.slice")
    k.mkdir(str(k.p("sandboxd.slice/sandboxd-default")))
    k.put("sandboxd.slice/sandboxd-default/cgroup.procs", f"{FAKE_PID}\n")
    with pytest.raises(LaunchError) as e:
        mgr.create("r", Limits())
    assert e.value.step == "cgroup_instance" and e.value.path.endswith(
        "sandboxd-default/cgroup.procs")
    assert k.cat("sandboxd.slice/sandboxd-default/cgroup.procs").split() == [str(FAKE_PID)]


def test_v2_configured_root_must_exist(tmp_path):
    k = v2(tmp_path)
    with pytest.raises(HostCapabilityError, match="the base cgroup /nope is not visible"):
        k.detect(root="/nope")
    with pytest.raises(SandboxError, match="absolute, normalised"):
        k.detect(root="sandboxd.slice/../x")


def test_v2_kernel_disagreeing_with_a_write_fails_and_cleans_up(tmp_path):
    k = v2(tmp_path)
    k.ignore.add("pids.max")
    with pytest.raises(LaunchError) as e:
        k.detect(root="/sandboxd.slice").create("r", Limits(pids=10))
    assert e.value.step == "cgroup_verify" and "pids.max None (asked 10)" in str(e.value)
    assert not k.p("sandboxd.slice/sandboxd-default/run-r").exists()


def test_v2_missing_limit_file_is_a_capability_error_naming_it(tmp_path):
    k = v2(tmp_path)
    mgr = k.detect(root="/sandboxd.slice")
    mgr.create("warm", Limits()).remove()
    orig = k.mkdir

    def mkdir_without_cpu_max(path):
        orig(path)
        os.unlink(os.path.join(path, "cpu.max"))
    k.mkdir = mkdir_without_cpu_max
    with pytest.raises(HostCapabilityError) as e:
        mgr.create("r", Limits(cpu_quota=1.0))
    assert e.value.path.endswith("run-r/cpu.max") and e.value.errno == errno.ENOENT
    assert not k.p("sandboxd.slice/sandboxd-default/run-r").exists()


def test_v2_without_swap_accounting(tmp_path):
    k = v2(tmp_path, features=("kill", "peak"), swap_kb=0)
    run = k.detect(root="/sandboxd.slice").create("r", Limits())
    assert run.readback()["swap"] == "off: host has no swap (SwapTotal 0), no swap accounting"
    (k.proc / "meminfo").write_text("SwapTotal: 1024 kB\n")
    with pytest.raises(HostCapabilityError, match="swapaccount=1"):
        k.detect(root="/sandboxd.slice").create("r2", Limits())


def test_v2_cpuset_requested_without_the_controller(tmp_path):
    k = v2(tmp_path, base_enables="cpu memory pids")
    mgr = k.detect(root="/sandboxd.slice")
    assert "cpuset" in mgr.info()["unavailable"]
    with pytest.raises(HostCapabilityError, match="cpuset controller is not enabled"):
        mgr.create("r", Limits(cpuset="0"))
    mgr.create("r", Limits(cpuset=None)).remove()           # not asked: not needed


def test_v2_duplicate_run_id_leaves_the_existing_run_alone(tmp_path):
    k = v2(tmp_path)
    mgr = k.detect(root="/sandboxd.slice")
    run = mgr.create("r", Limits())
    run.add_pid(FAKE_PID)
    k.log.clear()
    with pytest.raises(LaunchError) as e:
        mgr.create("r", Limits())
    assert e.value.errno == errno.EEXIST
    assert k.log == [] and run.pids() == [FAKE_PID]          # not written, not killed


def test_v2_retune_gives_a_spare_its_limits_once(tmp_path):
    k = v2(tmp_path)
    mgr = k.detect(root="/sandboxd.slice")
    spare = mgr.create("s", Limits(memory_bytes=None, pids=None, cpu_quota=None, cpuset=None))
    spare.add_pid(FAKE_PID)                                  # already placed, as a spare is
    leaf = "sandboxd.slice/sandboxd-default/run-s"
    assert k.cat(leaf + "/memory.max").strip() == k.cat(leaf + "/pids.max").strip() == "max"
    rb = mgr.retune(spare, LIM)
    assert (rb["memory_limit_bytes"], rb["pids_max"], rb["cpu_quota_us"], rb["cpuset_cpus"]) == (
        256 << 20, 64, 50000, "1")
    # The same limits again (a warm spare tuned for its layout, a run with the layout's
    # limits): nothing is written, the first read-back is returned.
    k.put(leaf + "/pids.max", "7")
    assert mgr.retune(spare, LIM) == rb
    assert k.cat(leaf + "/pids.max").strip() == "7"
    k.put(leaf + "/pids.max", "64")
    # Other limits: lifted, then written as for a fresh cgroup, and read back.
    rb2 = mgr.retune(spare, Limits(memory_bytes=512 << 20))
    assert (rb2["memory_limit_bytes"], rb2["pids_max"], rb2["cpu_quota_us"]) == (512 << 20, 64, None)
    assert k.cat(leaf + "/cpu.max").split()[0] == "max" and k.cat(leaf + "/cpuset.cpus").strip() == ""


def test_v2_an_instance_in_use_is_refused_not_cleaned(tmp_path):
    k = v2(tmp_path)
    live = k.detect(root="/sandboxd.slice")
    run = live.create("r", Limits())
    run.add_pid(FAKE_PID)
    second = k.detect(root="/sandboxd.slice")                # same instance name
    with pytest.raises(LaunchError) as e:
        second.cleanup_stale()
    assert e.value.errno == errno.EWOULDBLOCK and "in use by another sandboxd" in str(e.value)
    assert run.pids() == [FAKE_PID]                           # the live run is untouched
    run.remove()
    live.close()
    second.create("r2", Limits()).remove()                   # free once the first closed


def test_v2_bad_names(tmp_path):
    k = v2(tmp_path)
    with pytest.raises(PlanError):
        k.detect(root="/sandboxd.slice").create("../escape", Limits())
    with pytest.raises(SandboxError, match="instance 'a/b'"):
        k.detect(root="/sandboxd.slice", instance="a/b")


def test_v2_cleanup_stale_removes_only_our_runs(tmp_path):
    k = v2(tmp_path)
    crashed = k.detect(root="/sandboxd.slice", instance="x")
    for r in ("a", "b"):
        crashed.create(r, Limits()).add_pid(FAKE_PID)        # never removed
    del crashed                                              # "crash": its lock goes with it
    other = k.detect(root="/sandboxd.slice", instance="x-other")
    other.create("a", Limits()).add_pid(FAKE_PID)
    k.mkdir(str(k.p("sandboxd.slice/sibling")))              # somebody else's
    k.mkdir(str(k.p("sandboxd.slice/sandboxd-x/keep")))      # not a run name: not ours to judge
    fresh = k.detect(root="/sandboxd.slice", instance="x")
    removed = fresh.cleanup_stale()
    base = k.p("sandboxd.slice")
    assert removed == [f"{base}/sandboxd-x/run-a", f"{base}/sandboxd-x/run-b"]
    assert sorted(os.listdir(base / "sandboxd-x")) == sorted(
        n for n in os.listdir(base / "sandboxd-x") if not n.startswith("run-"))
    assert (base / "sandboxd-x/keep").is_dir() and (base / "sibling").is_dir()
    assert (base / "sandboxd-x-other/run-a/cgroup.procs").read_text().split() == [str(FAKE_PID)]
    assert fresh.cleanup_stale() == []


# -- v1 layouts this host does not have -----------------------------------------------------------

def v1(tmp_path, *, memsw=True, swap_kb=0, hierarchies=None) -> FakeKernel:
    h = hierarchies or {"memory": "memory", "pids": "pids", "cpu,cpuacct": "cpu,cpuacct",
                        "cpuset": "cpuset", "freezer": "freezer"}
    k = FakeKernel(tmp_path, v1=h, swap_kb=swap_kb,
                   features=("memsw",) if memsw else ())
    k.mkdir(str(k.p("memory/svc")))
    k.set_self_cgroup("".join(f"{i}:{c}:{'/svc' if c == 'memory' else '/'}\n"
                              for i, c in enumerate(h.values(), 1)) + "0::/\n")
    k.log.clear()
    return k


def test_v1_comounted_cpu_cpuacct_is_one_directory(tmp_path):
    k = v1(tmp_path)
    mgr = k.detect(instance="i")
    assert mgr.version == 1
    run = mgr.create("r", Limits(memory_bytes=64 << 20, pids=8, cpu_quota=1.5))
    leaf = "sandboxd-i/run-r"
    assert run.procs_files == [str(k.p(f"{h}/{leaf}/cgroup.procs")) for h in
                               ("memory/svc", "pids", "cpu,cpuacct", "cpuset", "freezer")]
    assert k.written(f"cpu,cpuacct/{leaf}") == {"cpu.cfs_period_us": "100000",
                                                "cpu.cfs_quota_us": "150000"}
    assert k.written(f"memory/svc/{leaf}") == {
        "memory.limit_in_bytes": str(64 << 20), "memory.memsw.limit_in_bytes": str(64 << 20),
        "memory.oom_control": "0", "memory.swappiness": "0"}
    # No cpuset asked: joined anyway, with every CPU, so retune() can narrow it later.
    assert k.written(f"cpuset/{leaf}") == {"cpuset.mems": "0", "cpuset.cpus": "0-3"}
    k.put(f"cpu,cpuacct/{leaf}/cpuacct.usage", "987654321\n")
    assert run.cpu_usage_ns() == 987654321
    k.put(f"memory/svc/{leaf}/memory.oom_control", "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n")
    assert run.oom_kills() == 3
    rb = run.readback()
    assert (rb["memory_limit_bytes"], rb["memsw_limit_bytes"], rb["swap_limit_bytes"],
            rb["memory_swappiness"], rb["cpu_quota_us"]) == (64 << 20, 64 << 20, 0, 0, 150000)
    run.remove()
    assert not any(k.p(f"{h}/{leaf}").exists() for h in ("memory/svc", "pids", "cpu,cpuacct"))


def test_v1_inherited_oom_kill_disable_is_turned_off(tmp_path):
    k = v1(tmp_path)
    orig = k.mkdir

    def mkdir_inheriting(path):                               # as the kernel copies the parent's
        orig(path)
        f = os.path.join(path, "memory.oom_control")
        if os.path.exists(f):
            Path(f).write_text("oom_kill_disable 1\nunder_oom 0\noom_kill 0\n")
    k.mkdir = mkdir_inheriting
    run = k.detect().create("r", Limits())
    assert run.readback()["oom_kill_disable"] == 0
    k.ignore.add("memory.oom_control")
    with pytest.raises(LaunchError, match="oom_kill_disable 1 \\(asked 0\\)"):
        k.detect().create("r2", Limits())


def test_v1_cpuset_copies_the_parent_into_our_instance(tmp_path):
    k = v1(tmp_path)
    run = k.detect(instance="i").create("r", Limits(cpuset="2-3"))
    assert k.written("cpuset/sandboxd-i") == {"cpuset.cpus": "0-3", "cpuset.mems": "0"}
    assert k.written("cpuset/sandboxd-i/run-r") == {"cpuset.mems": "0", "cpuset.cpus": "2-3"}
    assert run.readback()["cpuset_cpus"] == "2-3"


def test_v1_missing_hierarchy_names_the_controller_and_the_mount(tmp_path):
    k = v1(tmp_path, hierarchies={"memory": "memory", "cpu,cpuacct": "cpu,cpuacct"})
    with pytest.raises(HostCapabilityError) as e:
        k.detect()
    assert str(e.value).startswith(
        f"cgroup_detect: required cgroup v1 controllers are not usable: pids: no cgroup v1 "
        f"hierarchy with 'pids' is mounted under {k.top}")
    assert f"mount -t cgroup -o pids cgroup {k.top}/pids" in e.value.hint


def test_v1_without_memsw(tmp_path):
    k = v1(tmp_path, memsw=False, swap_kb=0)
    run = k.detect().create("r", Limits(memory_bytes=64 << 20))
    assert run.readback()["swap"].startswith("off: host has no swap")
    k2 = v1(tmp_path / "b", memsw=False, swap_kb=2048)
    with pytest.raises(HostCapabilityError) as e:
        k2.detect().create("r", Limits(memory_bytes=64 << 20))
    assert not k2.p("memory/svc/sandboxd-default/run-r").exists()
    assert "boot with swapaccount=1" in str(e.value)


def test_v1_cleanup_stale_covers_every_hierarchy(tmp_path):
    k = v1(tmp_path)
    k.detect(instance="i").create("r", Limits(cpuset="0"))   # crashed run
    removed = k.detect(instance="i").cleanup_stale()
    assert sorted(removed) == sorted(str(k.p(f"{h}/sandboxd-i/run-r")) for h in
                                     ("memory/svc", "pids", "cpu,cpuacct", "cpuset", "freezer"))
