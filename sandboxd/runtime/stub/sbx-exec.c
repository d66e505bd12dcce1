/*
 * sbx-exec: a sandboxd run's init and its workload, in a process whose memory is small.
 *
 * Why this exists. The supervisor of a run is a fork of the Python launcher. A process forked
 * from it pays for the interpreter it copies: page tables copied at fork, a page copied at
 * each first write (a reference count is one), the whole image torn down at execve or exit.
 * Measured here that was about a third of a run's CPU, so no process of the sandbox is Python:
 * the supervisor posix_spawns this program ("sbx-exec init", build mode, build_main below),
 * which clones the run's init; init sets the sandbox up from a blob the launcher compiled once
 * per layout, stays pid 1 and forks the workload, which waits for the run and does only what
 * depends on it:
 *
 *   1. receive the GO message (below) and the run's stdin on fd 3 (the sync socket)
 *   2. stdin to fd 0
 *   3. rlimits (lowering needs no capability; the hard limits were never raisable here)
 *   4. resolve the executable in PATH (inside the new root)
 *   5. AppArmor: ask for the profile at the next execve (before Landlock: /proc becomes read-only)
 *   6. Landlock: add the rule for argv[0] to the ruleset init built (fd 4), restrict
 *   7. seccomp: install the filter compiled by the launcher; LAST: after it come only read()
 *      (of the two /proc files opened at start), sendmsg() on fd 3 (the one rule the compiler
 *      adds) and execve
 *   8. read back /proc/self/status and /proc/self/limits: the kernel's view of every control
 *      now in place, seccomp included
 *   9. send EXEC (the read-back, the time, and the seccomp listener) to the supervisor and
 *      execve the program (fd 3 is close-on-exec: its EOF tells the supervisor we exec'd).
 *      There is no handshake: the launcher read the cgroup's CPU baseline before sending GO,
 *      so the microseconds of steps 2-9 count as the run's CPU time.
 *
 * Any failure sends ERROR (a JSON SandboxError naming the step, path and errno) and exits 127.
 * Started as "sbx-exec init" (build mode: every run), or directly, for tests and debugging, as
 * sbx-exec <ruleset-fd or -> [<CPU>:<SET> or -] [<status-fd> or -], with fds 0-2 the stdio, 3
 * the sync socket: with a status fd, this process becomes an init (run_init) as build mode's
 * does; without, it is the workload itself.
 *
 * Init (run_init) only forwards signals to the workload, reaps every process, writes the
 * workload's wait status to the status fd once it ends, and waits to be killed by the
 * supervisor.
 *
 * While the workload waits for GO, the launcher's CPU (CPU) is left out of its affinity (see
 * avoid_cpu); before step 2 its affinity is SET again, the CPUs the launcher was started with.
 *
 * GO message (one SOCK_SEQPACKET frame, native byte order, built by sandboxd.runtime.stubgo):
 *   u32 magic "SBX1", u32 flags, u32 n_rlimits, u32 seccomp_flags, u32 bpf_len, u32 argc,
 *   u32 envc, u32 reserved, u64 landlock_exec_access,
 *   n_rlimits x { u32 resource, u32 reserved, u64 soft, u64 hard },
 *   bpf_len bytes of struct sock_filter[],
 *   NUL-terminated strings: search PATH, Landlock argv[0] path, AppArmor attr path,
 *   AppArmor attr data, argv[0..argc), envp[0..envc).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <linux/filter.h>
#include <linux/landlock.h>
#include <linux/seccomp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <linux/capability.h>
#include <net/if.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/ptrace.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define SYNC_FD 3
#define GO_MAGIC 0x31584253u /* "SBX1" little-endian */
#define F_SECCOMP 1u
#define F_LANDLOCK 2u
#define F_LANDLOCK_EXEC_RULE 4u
#define F_APPARMOR 8u
#define MAX_GO (1u << 18)
#define MAX_ARGS 65536u

struct go_header {
	uint32_t magic, flags, n_rlimits, seccomp_flags, bpf_len, argc, envc, reserved;
	uint64_t landlock_exec_access;
};

struct go_rlimit {
	uint32_t resource, reserved;
	uint64_t soft, hard;
};

static unsigned char msg[MAX_GO];
static char readback[16384];
static char *argv_buf[MAX_ARGS + 1];
static char *envp_buf[MAX_ARGS + 1];

/* JSON string body of s (quotes and control characters escaped) into out. */
static size_t json_escape(char *out, size_t room, const char *s)
{
	size_t n = 0;
	for (; s && *s && n + 7 < room; s++) {
		unsigned char c = (unsigned char)*s;
		if (c == '"' || c == '\\') {
			out[n++] = '\\';
			out[n++] = (char)c;
		} else if (c < 0x20) {
			n += (size_t)snprintf(out + n, room - n, "\\u%04x", c);
		} else if (c < 0x80) {
			out[n++] = (char)c;
		} else {
			/* A whole UTF-8 sequence or nothing: a cut one would make the frame undecodable.
			 * Bytes that are not UTF-8 become '?'. */
			size_t len = c >= 0xf0 && c < 0xf5 ? 4 : c >= 0xe0 ? 3 : c >= 0xc2 && c < 0xe0 ? 2 : 0;
			size_t k = 1;
			while (len && k < len && ((unsigned char)s[k] & 0xc0) == 0x80)
				k++;
			if (!len || k < len) {
				out[n++] = '?';
				continue;
			}
			if (n + len + 7 >= room)
				break;
			memcpy(out + n, s, len);
			n += len;
			s += len - 1;
		}
	}
	out[n] = 0;
	return n;
}

/* Report a failed step to the supervisor and exit. sendmsg on SYNC_FD stays allowed even
 * after the seccomp filter is installed (the compiler adds exactly that rule). */
static void fail(const char *step, const char *message, const char *path, int err)
{
	static char frame[8192];
	char m[2048], p[4096];
	json_escape(m, sizeof m, message);
	json_escape(p, sizeof p, path);
	char e[16] = "null";       /* 0: no errno (a check failed, not a call) */
	if (err)
		snprintf(e, sizeof e, "%d", err);
	int n = snprintf(frame, sizeof frame,
			 "E{\"kind\":\"LaunchError\",\"message\":\"%s\",\"step\":\"%s\","
			 "\"path\":%s%s%s,\"errno\":%s,\"hint\":null}",
			 m, step, path ? "\"" : "", path ? p : "null", path ? "\"" : "", e);
	struct iovec iov = {frame, n > 0 && (size_t)n < sizeof frame ? (size_t)n : sizeof frame - 1};
	struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1};
	sendmsg(SYNC_FD, &mh, MSG_NOSIGNAL);
	_exit(127);
}

/* Receive the GO frame and the stdin fd. EOF (the spare was retired): exit quietly. */
static size_t recv_go(int *stdin_fd)
{
	union {
		struct cmsghdr align;
		char buf[CMSG_SPACE(sizeof(int) * 4)];
	} cbuf;
	struct iovec iov = {msg, sizeof msg};
	struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf.buf,
			    .msg_controllen = sizeof cbuf.buf};
	ssize_t n;
	do {
		n = recvmsg(SYNC_FD, &mh, MSG_CMSG_CLOEXEC);
	} while (n < 0 && errno == EINTR);
	if (n <= 0)
		_exit(0);
	if (mh.msg_flags & (MSG_TRUNC | MSG_CTRUNC))
		fail("stub", "GO frame truncated", NULL, EMSGSIZE);
	*stdin_fd = -1;
	for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c)) {
		if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
			size_t k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
			int fds[4];
			memcpy(fds, CMSG_DATA(c), k * sizeof(int));
			for (size_t i = 0; i < k; i++) {
				if (*stdin_fd < 0)
					*stdin_fd = fds[i];
				else
					close(fds[i]);
			}
		}
	}
	if (*stdin_fd < 0)
		fail("stub", "GO frame without a stdin fd", NULL, EINVAL);
	return (size_t)n;
}

/* Next NUL-terminated string at *pos, bounded by len. */
static char *next_str(size_t *pos, size_t len)
{
	if (*pos >= len)
		fail("stub", "GO frame: strings cut short", NULL, EINVAL);
	char *s = (char *)msg + *pos;
	char *end = memchr(s, 0, len - *pos);
	if (!end)
		fail("stub", "GO frame: unterminated string", NULL, EINVAL);
	*pos += (size_t)(end - s) + 1;
	return s;
}

/* PATH search as the Python runtime does it: a name with a slash is taken as it is. */
static const char *resolve(const char *name, const char *path)
{
	static char cand[4096];
	struct stat st;
	if (strchr(name, '/'))
		return name;
	const char *p = path && *path ? path : "/usr/bin:/bin";
	while (1) {
		const char *colon = strchr(p, ':');
		size_t dl = colon ? (size_t)(colon - p) : strlen(p);
		int n = snprintf(cand, sizeof cand, "%.*s/%s", (int)dl, dl ? p : ".", name);
		if (n > 0 && (size_t)n < sizeof cand && stat(cand, &st) == 0 && S_ISREG(st.st_mode) &&
		    access(cand, X_OK) == 0)
			return cand;
		if (!colon)
			break;
		p = colon + 1;
	}
	static char m[4352];
	snprintf(m, sizeof m, "executable '%s' not found in PATH %s", name, path);
	fail("execve", m, name, ENOENT);
	return NULL;
}

/* While waiting for GO, stay off the launcher's CPU: a wakeup lands on the waker's CPU here,
 * and there the launcher still has START to send. `arg` is "CPU:SET" (SET a comma-separated
 * list: the launcher's CPUs before it pinned itself), or "-". Narrowing is best effort (if the
 * mask cannot be narrowed, nothing changed). Returns whether SET was given: then restore_cpus
 * must follow, narrowed or not. */
static cpu_set_t full_cpus;

static int avoid_cpu(const char *arg)
{
	if (!arg || strcmp(arg, "-") == 0)
		return 0;
	char *end;
	long cpu = strtol(arg, &end, 10);
	if (end == arg || *end != ':' || cpu < 0 || cpu >= CPU_SETSIZE)
		fail("stub", "bad CPU argument (want CPU:SET)", arg, EINVAL);
	CPU_ZERO(&full_cpus);
	const char *p = end;
	do {                           /* p at ':' or ',': a CPU number must follow */
		long c = strtol(++p, &end, 10);
		if (end == p || c < 0 || c >= CPU_SETSIZE || (*end && *end != ','))
			fail("stub", "bad CPU argument (want CPU:SET)", arg, EINVAL);
		CPU_SET(c, &full_cpus);
		p = end;
	} while (*p);
	cpu_set_t away;
	if (sched_getaffinity(0, sizeof away, &away) == 0 && CPU_ISSET(cpu, &away) && CPU_COUNT(&away) > 1) {
		CPU_CLR(cpu, &away);
		(void)sched_setaffinity(0, sizeof away, &away);
	}
	return 1;
}

/* The program gets the launcher's original set (the kernel narrows it to this run's cpuset, set
 * before GO), never the narrowed one nor the one the stub was staged with: a spare is staged
 * in the cgroup tuned for its layout's first run, whose cpuset may not be this run's, and a
 * mask once set with sched_setaffinity stays the task's own across later cpuset changes. */
static void restore_cpus(void)
{
	if (sched_setaffinity(0, sizeof full_cpus, &full_cpus) != 0)
		fail("stub", "restore the CPU affinity (the launcher's CPUs and the run's cpuset may "
		     "not overlap)", NULL, errno);
}

/* Init mode. What a signal to pid 1 means outside (kill -TERM 1, a terminal's SIGINT/SIGWINCH),
 * it means to the program: pid 1 passes these on. SIGKILL and SIGSTOP cannot be caught, and
 * the kernel does not deliver them to a pid namespace's init from inside it. */
static const int forwarded[] = {SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGCONT, SIGWINCH};
#define N_FORWARDED (sizeof forwarded / sizeof forwarded[0])
static volatile pid_t workload_pid;

static void forward(int sig)
{
	if (workload_pid > 0)
		kill(workload_pid, sig);
}

/* wait4 for any child; a stop is never an end. A process of the run may have made us its tracer
 * (PTRACE_TRACEME needs no permission from the parent), and then its stops are reported here:
 * let it go with the signal it stopped for, as if nothing traced it, so it is not left stopped
 * and its status is never mistaken for its end. */
static pid_t reap(int *st, struct rusage *ru)
{
	for (;;) {
		pid_t p = wait4(-1, st, 0, ru);
		if (p > 0 && WIFSTOPPED(*st)) {
			int sig = WSTOPSIG(*st) & 0x7f;
			ptrace(PTRACE_DETACH, p, NULL, (void *)(long)sig);
			continue;
		}
		if (p > 0 || errno != EINTR)
			return p;
	}
}

/* Returns in the child (the workload, which goes on to wait for GO); never in pid 1. */
static void run_init(int status_fd, int ruleset_fd)
{
	/* exec made us dumpable again: a program of the same uid could ptrace its init or open
	 * /proc/1/mem. Nothing else runs in the pid namespace yet. */
	if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0)
		fail("init", "prctl(PR_SET_DUMPABLE, 0)", NULL, errno);
	sigset_t block, old;
	sigemptyset(&block);
	for (size_t i = 0; i < N_FORWARDED; i++)
		sigaddset(&block, forwarded[i]);
	/* Blocked over the fork: a signal sent meanwhile is forwarded once the child's pid is known. */
	sigprocmask(SIG_BLOCK, &block, &old);
	struct sigaction sa = {.sa_handler = forward, .sa_flags = SA_RESTART};
	sigemptyset(&sa.sa_mask);
	for (size_t i = 0; i < N_FORWARDED; i++)
		sigaction(forwarded[i], &sa, NULL);
	/* Named before the fork: once the child has said W, whoever looks at pid 1 sees init. */
	prctl(PR_SET_NAME, "sbx-init", 0, 0, 0);
	pid_t pid = fork();
	if (pid < 0)
		fail("init", "fork the workload", NULL, errno);
	if (pid == 0) {
		struct sigaction dfl = {.sa_handler = SIG_DFL};
		for (size_t i = 0; i < N_FORWARDED; i++)
			sigaction(forwarded[i], &dfl, NULL);
		sigprocmask(SIG_SETMASK, &old, NULL);
		close(status_fd);
		prctl(PR_SET_NAME, "sbx-exec", 0, 0, 0);
		/* The program leads its own session and process group, as it did when it was init's
		 * only child made by Python: kill(0, sig) then reaches it and its children, not init
		 * (which would forward it a second time). */
		if (setsid() < 0)
			fail("init", "setsid for the workload", NULL, errno);
		return;
	}
	workload_pid = pid;
	/* pid 1 keeps nothing of the run open: held here, the stdio pipes and the sync socket
	 * would keep the supervisor from seeing their ends. */
	close(0);
	close(1);
	close(2);
	close(SYNC_FD);
	if (ruleset_fd >= 0)
		close(ruleset_fd);
	sigprocmask(SIG_SETMASK, &old, NULL);
	for (;;) {
		int st;
		struct rusage ru;
		pid_t p = reap(&st, &ru);
		if (p < 0)
			_exit(0); /* ECHILD: cannot happen before the workload's end is reported */
		if (p != pid)
			continue; /* an orphan reparented to us: reaped, nothing to report */
		/* Its pid may be given to another process of the run now: forward nothing more. */
		sigprocmask(SIG_BLOCK, &block, NULL);
		workload_pid = 0;
		sigprocmask(SIG_SETMASK, &old, NULL);
		struct timespec ts;
		clock_gettime(CLOCK_MONOTONIC, &ts);
		char rep[256];
		int n = snprintf(rep, sizeof rep,
				 "{\"wait_status\":%d,\"utime\":%ld.%06ld,\"stime\":%ld.%06ld,"
				 "\"maxrss_kb\":%ld,\"t_exit_ns\":%lld}",
				 st, (long)ru.ru_utime.tv_sec, (long)ru.ru_utime.tv_usec,
				 (long)ru.ru_stime.tv_sec, (long)ru.ru_stime.tv_usec, ru.ru_maxrss,
				 (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec);
		if (n > 0)
			(void)!write(status_fd, rep, (size_t)n);
		/* Not exit: our exit tears the namespaces down, about a millisecond of kernel work
		 * that would take a CPU from the supervisor while it sends the result. It kills us
		 * right after that (or at once, when something of the run outlives the program); if
		 * it dies, the parent-death signal does. Orphans are still reaped meanwhile. */
		for (;;)
			if (reap(&st, &ru) < 0)
				pause();
	}
}

/* ---------------------------------------------------------------------------------------------
 * Build mode: the run's init, from its clone to the workload's fork (started as "sbx-exec init").
 *
 * The supervisor (Python, the run's host uid) posix_spawns this program (vfork + exec: no copy
 * of the interpreter is made or torn down) with fds 0 /dev/null, 1-2 the output pipes, 3 the
 * sync socket, 5 the status pipe and 6 the init socket. Then:
 *
 *   spawn_init  clone(NEWUSER|NEWPID|PARENT): the child is pid 1 of a new pid namespace, holds
 *               every capability of a new user namespace owned by the run's uid, and is the
 *               supervisor's child (CLONE_PARENT), so its parent-death signal is the
 *               supervisor's death. This process sends "F<pid>" on fd 6 and exits.
 *   phase A     (after the launcher mapped our ids and placed us in the cgroup: PLACED
 *               "<uid> <gid> <net>") become the inside ids keeping the capabilities; unshare
 *               mount, ipc, uts, cgroup (and net) namespaces; no user namespaces below this one;
 *               loopback up; send NAMESPACED.
 *   phase B     (LAYOUT: the blob stubgo.encode_layout made once per layout) hostname, the root
 *               (the ops mounts.compile_root made, run in order), non-dumpable, then the
 *               containment order of sandbox.py's docstring: /dev/null as stdin, setsid, cwd,
 *               capabilities dropped, no_new_privs, the Landlock ruleset built (not enforced);
 *               STAGED with the namespace ids and the ruleset's counts; then run_init: this
 *               process stays pid 1 and its fork waits for GO in workload().
 *
 * Layout blob: NUL-terminated strings, numbers in decimal:
 *   "SBXL1" root hostname cwd uid gid keep_caps cpu-arg
 *   n_ops, then each op: its name and its arguments (see run_op)
 *   landlock (last: its ruleset is built after no_new_privs): "0" | "1" attr_size handled_fs
 *             handled_net scoped n_paths {path dir_access file_access optional}* n_ports {port access}*
 */
#define ISOCK_FD 6
#define MAX_LAYOUT (1u << 17)

static unsigned char lay[MAX_LAYOUT + 1]; /* + 1: a frame that fills it was cut */
static size_t lay_len, lay_pos;

static const char *lay_str(void)
{
	if (lay_pos >= lay_len)
		fail("init", "layout: cut short", NULL, EINVAL);
	char *s = (char *)lay + lay_pos;
	char *end = memchr(s, 0, lay_len - lay_pos);
	if (!end)
		fail("init", "layout: unterminated string", NULL, EINVAL);
	lay_pos += (size_t)(end - s) + 1;
	return s;
}

static unsigned long long lay_num(void)
{
	const char *s = lay_str();
	char *end;
	errno = 0;
	unsigned long long v = strtoull(s, &end, 10);
	if (*s < '0' || *s > '9' || *end || errno)
		fail("init", "layout: bad number", s, EINVAL);
	return v;
}

/* A number that must fit in 32 bits (an id, a mode, flags). */
static unsigned lay_u32(void)
{
	unsigned long long v = lay_num();
	if (v > 0xfffffffeULL)
		fail("init", "layout: number out of range", NULL, ERANGE);
	return (unsigned)v;
}

/* One frame from the supervisor on the init socket. EOF: the spare was retired; exit quietly. */
static size_t recv_isock(void *buf, size_t room, char kind)
{
	ssize_t n;
	do {
		n = recv(ISOCK_FD, buf, room, 0);
	} while (n < 0 && errno == EINTR);
	if (n <= 0 || ((char *)buf)[0] != kind)
		_exit(0);
	if ((size_t)n == room)
		fail("init", "init socket: frame too large", NULL, EMSGSIZE);
	return (size_t)n;
}

static void write_file(const char *path, const char *data, const char *step)
{
	int fd = open(path, O_WRONLY | O_CLOEXEC);
	size_t n = strlen(data);
	if (fd < 0)
		fail(step, "open", path, errno);
	ssize_t w = write(fd, data, n);
	if (w != (ssize_t)n)
		fail(step, "write", path, w < 0 ? errno : EIO);
	close(fd);
}

static void loopback_up(void)
{
	int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	struct ifreq ifr;
	memset(&ifr, 0, sizeof ifr);
	strcpy(ifr.ifr_name, "lo");
	if (s < 0 || ioctl(s, SIOCGIFFLAGS, &ifr) != 0)
		fail("network", "bring loopback up", "lo", errno);
	ifr.ifr_flags |= IFF_UP;
	if (ioctl(s, SIOCSIFFLAGS, &ifr) != 0)
		fail("network", "bring loopback up", "lo", errno);
	close(s);
}

/* Read in phase A, from the host's /proc: the new root may have none. */
static int cap_top = -1;

static void read_last_cap(void)
{
	char b[16] = {0};
	int fd = open("/proc/sys/kernel/cap_last_cap", O_RDONLY | O_CLOEXEC);
	ssize_t n = fd >= 0 ? read(fd, b, sizeof b - 1) : -1;
	if (n <= 0)
		fail("capabilities", "read cap_last_cap", "/proc/sys/kernel/cap_last_cap", n == 0 ? EIO : errno);
	close(fd);
	cap_top = atoi(b);
	if (cap_top < 0 || cap_top > 63)
		fail("capabilities", "cap_last_cap out of range", "/proc/sys/kernel/cap_last_cap", ERANGE);
}

static void set_caps(uint64_t eff, uint64_t prm, uint64_t inh)
{
	struct __user_cap_header_struct h = {_LINUX_CAPABILITY_VERSION_3, 0};
	struct __user_cap_data_struct d[2] = {
		{(uint32_t)eff, (uint32_t)prm, (uint32_t)inh},
		{(uint32_t)(eff >> 32), (uint32_t)(prm >> 32), (uint32_t)(inh >> 32)}};
	if (syscall(SYS_capset, &h, d) != 0)
		fail("capset", "capset", NULL, errno);
}

static uint64_t permitted_caps(void)
{
	struct __user_cap_header_struct h = {_LINUX_CAPABILITY_VERSION_3, 0};
	struct __user_cap_data_struct d[2];
	if (syscall(SYS_capget, &h, d) != 0)
		fail("capset", "capget", NULL, errno);
	return (uint64_t)d[0].permitted | (uint64_t)d[1].permitted << 32;
}

static void set_ids(uid_t uid, gid_t gid)
{
	if (setresgid(gid, gid, gid) != 0 || setresuid(uid, uid, uid) != 0) {
		char m[96];
		snprintf(m, sizeof m, "switch to uid %u gid %u", (unsigned)uid, (unsigned)gid);
		fail("identity", m, NULL, errno);
	}
}

/* -- the root ------------------------------------------------------------------------------ */
#define MOUNT_ATTR_RDONLY_ 0x1
#define MOUNT_ATTR_NOSUID_ 0x2
#define MOUNT_ATTR_NODEV_ 0x4
#define MOUNT_ATTR_NOEXEC_ 0x8
#define AT_RECURSIVE_ 0x8000
#define SYS_mount_setattr_ 442

struct mount_attr_ {
	uint64_t attr_set, attr_clr, propagation, userns_fd;
};

static const char *root; /* the new root's mountpoint (a host path), until pivot_root */

static void setattr(const char *path, uint64_t attrs, int recursive)
{
	struct mount_attr_ a = {attrs, 0, 0, 0};
	if (syscall(SYS_mount_setattr_, AT_FDCWD, path, recursive ? AT_RECURSIVE_ : 0, &a, sizeof a))
		fail("mount", "mount_setattr (read-only/nosuid/nodev)", path, errno);
}

static void do_mount(const char *src, const char *tgt, const char *fstype, unsigned long flags,
		     const char *data)
{
	if (mount(src, tgt, fstype, flags, data) != 0) {
		char m[8400];
		snprintf(m, sizeof m, "mount %s %s -> %s flags=%#lx", fstype ? fstype : "bind",
			 src ? src : "", tgt, flags);
		fail("mount", m, tgt, errno);
	}
}

/* root + target into full, creating every missing component (directories; the last one a file
 * when !is_dir) and refusing any that is a symlink: a bound host directory could hold one that
 * points elsewhere, and a mount must never land outside the new root. */
static void ensure(const char *target, int is_dir, char *full, size_t room)
{
	size_t n = strlen(root);
	if (n + strlen(target) + 1 >= room)
		fail("mount", "mount target too long", target, ENAMETOOLONG);
	memcpy(full, root, n + 1);
	const char *p = target;
	while (*p) {
		while (*p == '/')
			p++;
		if (!*p)
			break;
		size_t l = strcspn(p, "/");
		full[n++] = '/';
		memcpy(full + n, p, l);
		n += l;
		full[n] = 0;
		p += l;
		int last = p[strspn(p, "/")] == 0;
		struct stat st;
		if (lstat(full, &st) == 0) {
			if (S_ISLNK(st.st_mode))
				fail("mount", "mount target traverses a symlink", target, 0);
			continue;
		}
		if (errno != ENOENT)
			fail("mount", "create mountpoint", target, errno);
		if (last && !is_dir) {
			int fd = open(full, O_CREAT | O_WRONLY | O_CLOEXEC | O_NOFOLLOW, 0644);
			if (fd < 0)
				fail("mount", "create mountpoint", target, errno);
			close(fd);
		} else if (mkdir(full, 0755) != 0) {
			fail("mount", "create mountpoint", target, errno);
		}
	}
}

static void in_root(const char *target, char *full, size_t room)
{
	if (snprintf(full, room, "%s%s", root, target) >= (int)room)
		fail("mount", "path too long", target, ENAMETOOLONG);
}

#define B_WRITABLE 1u
#define B_OPTIONAL 2u
#define B_DEVICE 4u

/* One op of mounts.compile_root. Targets are inside the new root (checked there: absolute,
 * normalised, no ".."); sources are host paths. */
static void run_op(const char *op)
{
	static char full[4096];
	if (strcmp(op, "mount") == 0) {            /* src tgt fstype flags data ("" = NULL) */
		const char *src = lay_str(), *tgt = lay_str(), *fstype = lay_str();
		unsigned long flags = (unsigned long)lay_num();
		const char *data = lay_str();
		do_mount(*src ? src : NULL, tgt, *fstype ? fstype : NULL, flags, *data ? data : NULL);
	} else if (strcmp(op, "symlink") == 0) {   /* link target */
		const char *link = lay_str(), *tgt = lay_str();
		in_root(tgt, full, sizeof full);
		if (symlink(link, full) != 0)
			fail("mount", "symlink", tgt, errno);
	} else if (strcmp(op, "bind") == 0) {      /* source target B_* flags */
		const char *src = lay_str(), *tgt = lay_str();
		unsigned flags = lay_u32();
		struct stat st;
		if (stat(src, &st) != 0) {
			if (flags & B_OPTIONAL)
				return;
			fail("bind_mount", "bind source missing", src, errno);
		}
		ensure(tgt, S_ISDIR(st.st_mode), full, sizeof full);
		do_mount(src, full, NULL, MS_BIND | MS_REC, NULL);
		setattr(full, MOUNT_ATTR_NOSUID_ | (flags & B_DEVICE ? 0 : MOUNT_ATTR_NODEV_) |
				      (flags & B_WRITABLE ? 0 : MOUNT_ATTR_RDONLY_), 1);
	} else if (strcmp(op, "tmpfs") == 0) {     /* target size mode(octal digits) noexec */
		const char *tgt = lay_str();
		unsigned long long size = lay_num();
		const char *mode = lay_str();
		unsigned long long noexec = lay_num();
		char data[96];
		snprintf(data, sizeof data, "size=%llu,mode=%s", size, mode);
		ensure(tgt, 1, full, sizeof full);
		do_mount("tmpfs", full, "tmpfs", MS_NOSUID | MS_NODEV | (noexec ? MS_NOEXEC : 0), data);
	} else if (strcmp(op, "mkdir") == 0) {     /* target mode */
		const char *tgt = lay_str();
		mode_t mode = (mode_t)lay_u32();
		if (mode & ~07777u)
			fail("init", "layout: bad mode", tgt, EINVAL);
		in_root(tgt, full, sizeof full);
		if (mkdir(full, mode) != 0)
			fail("mount", "mkdir", tgt, errno);
	} else if (strcmp(op, "proc") == 0) {      /* /proc for the new pid namespace */
		ensure("/proc", 1, full, sizeof full);
		do_mount("proc", full, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
	} else if (strcmp(op, "mask") == 0) {      /* target: hidden, if this kernel has it */
		const char *tgt = lay_str();
		struct stat st;
		in_root(tgt, full, sizeof full);
		if (lstat(full, &st) != 0)
			return;
		if (S_ISDIR(st.st_mode)) {
			do_mount("tmpfs", full, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=0");
		} else {
			char null[4096];
			in_root("/dev/null", null, sizeof null);
			do_mount(null, full, NULL, MS_BIND, NULL);
		}
	} else if (strcmp(op, "ro") == 0) {        /* target: read-only, if this kernel has it */
		const char *tgt = lay_str();
		in_root(tgt, full, sizeof full);
		if (access(full, F_OK) != 0)
			return;
		do_mount(full, full, NULL, MS_BIND | MS_REC, NULL);
		setattr(full, MOUNT_ATTR_RDONLY_ | MOUNT_ATTR_NOSUID_ | MOUNT_ATTR_NODEV_ | MOUNT_ATTR_NOEXEC_, 1);
	} else if (strcmp(op, "file") == 0) {      /* target content: a small generated file */
		const char *tgt = lay_str(), *content = lay_str();
		const char *slash = strrchr(tgt, '/');
		if (slash && slash != tgt) {
			char dir[4096];
			snprintf(dir, sizeof dir, "%.*s", (int)(slash - tgt), tgt);
			ensure(dir, 1, full, sizeof full);
		}
		in_root(tgt, full, sizeof full);
		int fd = open(full, O_CREAT | O_WRONLY | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0644);
		if (fd < 0)
			fail("files", "write generated file", tgt, errno);
		size_t n = strlen(content);
		ssize_t w = write(fd, content, n);
		if (w != (ssize_t)n)
			fail("files", "write generated file", tgt, w < 0 ? errno : EIO);
		close(fd);
	} else if (strcmp(op, "pivot") == 0) {     /* enter the new root; detach the host's tree */
		if (chdir(root) != 0)
			fail("pivot_root", "chdir to the new root", root, errno);
		if (syscall(SYS_pivot_root, ".", ".") != 0)
			fail("pivot_root", "pivot_root(., .)", root, errno);
		if (umount2(".", MNT_DETACH) != 0)
			fail("umount", "umount2 the old root", ".", errno);
		if (chdir("/") != 0)
			fail("pivot_root", "chdir /", "/", errno);
		root = "";
	} else if (strcmp(op, "rootro") == 0) {
		setattr("/", MOUNT_ATTR_RDONLY_ | MOUNT_ATTR_NOSUID_ | MOUNT_ATTR_NODEV_, 0);
	} else {
		fail("init", "layout: unknown op", op, EINVAL);
	}
}

/* -- Landlock: the ruleset, built but not enforced (the workload enforces it at GO) --------- */
struct ll_ruleset_attr_ {
	uint64_t handled_access_fs, handled_access_net, scoped;
};
struct ll_net_port_attr_ {
	uint64_t allowed_access, port;
} __attribute__((packed));

/* Returns the ruleset fd, or -1 when the layout has none; appends the counts (JSON) to att. */
static int build_ruleset(char *att, size_t room)
{
	if (lay_num() == 0) {
		snprintf(att, room, "null");
		return -1;
	}
	size_t attr_size = (size_t)lay_num();
	struct ll_ruleset_attr_ ra;
	ra.handled_access_fs = lay_num();
	ra.handled_access_net = lay_num();
	ra.scoped = lay_num();
	if (attr_size > sizeof ra)
		fail("landlock", "layout: bad ruleset attr size", NULL, EINVAL);
	if (prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) != 1)
		fail("landlock", "no_new_privs is not set", NULL, 0);
	int rfd = (int)syscall(SYS_landlock_create_ruleset, &ra, attr_size, 0);
	if (rfd < 0)
		fail("landlock", "landlock_create_ruleset failed", NULL, errno);
	unsigned long long n_paths = lay_num(), added = 0;
	size_t off = 0;
	char skipped[8192];
	skipped[0] = 0;
	for (unsigned long long i = 0; i < n_paths; i++) {
		const char *path = lay_str();
		uint64_t dir_access = lay_num(), file_access = lay_num();
		int optional = (int)lay_num();
		uint64_t access = dir_access;
		int fd = open(path, O_PATH | O_CLOEXEC | O_DIRECTORY);
		if (fd < 0 && errno == ENOTDIR) {
			access = file_access;      /* a file bind or generated file: file rights only */
			fd = open(path, O_PATH | O_CLOEXEC);
			if (fd < 0)
				fail("landlock", "open rule path", path, errno);
		} else if (fd < 0 && errno == ENOENT) {
			if (!optional)
				fail("landlock", "rule path missing in the new root", path, ENOENT);
			char esc[4200];
			json_escape(esc, sizeof esc, path);
			if (off + strlen(esc) + 4 < sizeof skipped)
				off += (size_t)snprintf(skipped + off, sizeof skipped - off, "%s\"%s\"",
							off ? "," : "", esc);
			continue;
		} else if (fd < 0) {
			fail("landlock", "open rule path", path, errno);
		}
		struct landlock_path_beneath_attr pb = {.allowed_access = access, .parent_fd = fd};
		if (syscall(SYS_landlock_add_rule, rfd, LANDLOCK_RULE_PATH_BENEATH, &pb, 0) != 0)
			fail("landlock", "landlock_add_rule path_beneath", path, errno);
		close(fd);
		added++;
	}
	unsigned long long n_ports = lay_num();
	for (unsigned long long i = 0; i < n_ports; i++) {
		struct ll_net_port_attr_ np;
		np.port = lay_num();
		np.allowed_access = lay_num();
		if (syscall(SYS_landlock_add_rule, rfd, 2 /* LANDLOCK_RULE_NET_PORT */, &np, 0) != 0) {
			char m[64];
			snprintf(m, sizeof m, "landlock_add_rule net_port %llu", (unsigned long long)np.port);
			fail("landlock", m, NULL, errno);
		}
	}
	snprintf(att, room, "{\"path_rules\":%llu,\"net_rules\":%llu,\"skipped_optional\":[%s]}",
		 added, n_ports, skipped);
	return rfd;
}

/* Drop to the kept capabilities and the workload's ids (the order of caps.py's docstring). */
static void drop_caps(uint64_t keep, uid_t uid, gid_t gid)
{
	int top = cap_top;
	for (int c = 0; c <= top; c++)
		if (!(keep >> c & 1) && prctl(PR_CAPBSET_DROP, c, 0, 0, 0) != 0)
			fail("capabilities(bounding)", "prctl(PR_CAPBSET_DROP)", NULL, errno);
	if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0)
		fail("capabilities(ambient)", "prctl(PR_CAP_AMBIENT_CLEAR_ALL)", NULL, errno);
	if (prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0) != 0)
		fail("capabilities(keepcaps)", "prctl(PR_SET_KEEPCAPS, 1)", NULL, errno);
	set_ids(uid, gid);
	if (prctl(PR_SET_KEEPCAPS, 0, 0, 0, 0) != 0)
		fail("capabilities(keepcaps)", "prctl(PR_SET_KEEPCAPS, 0)", NULL, errno);
	set_caps(keep, keep, keep);
	for (int c = 0; c <= top; c++)
		if ((keep >> c & 1) && prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, c, 0, 0) != 0)
			fail("capabilities(ambient raise)", "prctl(PR_CAP_AMBIENT_RAISE)", NULL, errno);
}

static size_t read_text(const char *path, char *buf, size_t room)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	ssize_t n = fd >= 0 ? read(fd, buf, room - 1) : -1;
	if (fd >= 0)
		close(fd);
	buf[n > 0 ? n : 0] = 0;
	return n > 0 ? (size_t)n : 0;
}

/* STAGED: {"status": our /proc/self/status, "ns": {name: id}, "landlock": counts or null} */
static void send_staged(const char *ll_att)
{
	static char status[8192], esc[6 * 8192], frame[6 * 8192 + 2048];
	read_text("/proc/self/status", status, sizeof status);
	json_escape(esc, sizeof esc, status);
	static const char *const ns[] = {"user", "pid", "mnt", "net", "ipc", "uts", "cgroup"};
	int n = snprintf(frame, sizeof frame, "T{\"status\":\"%s\",\"ns\":{", esc);
	for (size_t i = 0; i < sizeof ns / sizeof ns[0]; i++) {
		char path[64], id[128];
		snprintf(path, sizeof path, "/proc/self/ns/%s", ns[i]);
		ssize_t l = readlink(path, id, sizeof id - 1);
		if (l < 0) {
			id[0] = '?';
			l = 1;
		}
		id[l] = 0;
		if (n > 0 && (size_t)n < sizeof frame)
			n += snprintf(frame + n, sizeof frame - (size_t)n, "%s\"%s\":\"%s\"", i ? "," : "", ns[i], id);
	}
	if (n > 0 && (size_t)n < sizeof frame)
		n += snprintf(frame + n, sizeof frame - (size_t)n, "},\"landlock\":%s}", ll_att);
	if (n <= 0 || (size_t)n >= sizeof frame)
		fail("init", "STAGED frame too large", NULL, EMSGSIZE);
	if (send(SYNC_FD, frame, (size_t)n, MSG_NOSIGNAL) != n)
		_exit(125);
}

static int build_ruleset_fd = -1;
static const char *build_cpu_arg;

/* Every signal to its default, the mask empty: what a program started from a shell expects, and
 * an ignored signal survives execve (SIGPIPE ignored: writers to a closed pipe spin on EPIPE;
 * SIGXFSZ: the file size limit would become EFBIG instead of the signal the verdict relies on).
 * The raw syscalls: posix_spawn leaves glibc's own signals (32, 33) ignored, and glibc's
 * sigaction refuses to name them. */
struct kernel_sigaction_ {
	void (*handler)(int);
	unsigned long flags;
	void (*restorer)(void);
	uint64_t mask;
};

static void default_signals(void)
{
	struct kernel_sigaction_ dfl = {SIG_DFL, 0, NULL, 0};
	for (int sig = 1; sig <= 64; sig++)
		if (sig != SIGKILL && sig != SIGSTOP && syscall(SYS_rt_sigaction, sig, &dfl, NULL, 8) != 0)
			fail("init", "rt_sigaction SIG_DFL", NULL, errno);
	uint64_t none = 0;
	if (syscall(SYS_rt_sigprocmask, SIG_SETMASK, &none, NULL, 8) != 0)
		fail("init", "rt_sigprocmask", NULL, errno);
}

/* Returns in the workload (the fork of pid 1), which goes on with workload(). `nodump`: the
 * supervisor changed its uid to the run's (a root launcher): init is non-dumpable from the
 * start, as a process that changed uid is (a launcher running as the run's uid must still
 * write the id maps of its own processes). */
static void build_main(int nodump)
{
	/* spawn_init (named: exec'd by fd, this process would be called after the fd's number) */
	prctl(PR_SET_NAME, "sbx-spawn", 0, 0, 0);
	if (nodump && prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0)
		fail("init", "prctl(PR_SET_DUMPABLE, 0)", NULL, errno);
	default_signals();
	pid_t pid = (pid_t)syscall(SYS_clone, CLONE_NEWUSER | CLONE_NEWPID | CLONE_PARENT | SIGCHLD,
				   NULL, NULL, NULL, NULL);
	if (pid < 0)
		fail("init", "clone(CLONE_NEWUSER|CLONE_NEWPID)", NULL, errno);
	if (pid > 0) {
		char f[32];
		int n = snprintf(f, sizeof f, "F%d", (int)pid);
		_exit(send(ISOCK_FD, f, (size_t)n, MSG_NOSIGNAL) == n ? 0 : 1);
	}
	if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) != 0)
		fail("init", "prctl(PR_SET_PDEATHSIG)", NULL, errno);
	prctl(PR_SET_NAME, "sbx-init", 0, 0, 0);
	/* Only what the protocol names (0-3, 5, 6) may be open. */
	close(4);
	if (syscall(SYS_close_range, ISOCK_FD + 1, ~0U, 0) != 0)
		fail("init", "close_range", NULL, errno);
	read_last_cap();

	/* phase A */
	char placed[128];
	size_t n = recv_isock(placed, sizeof placed - 1, 'L');
	placed[n] = 0;
	unsigned uid, gid, net;
	if (sscanf(placed + 1, "%u %u %u", &uid, &gid, &net) != 3)
		fail("init", "PLACED: bad frame", NULL, EINVAL);
	if (prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0) != 0)
		fail("init", "prctl(PR_SET_KEEPCAPS, 1)", NULL, errno);
	set_ids(uid, gid);
	uint64_t full = permitted_caps();
	set_caps(full, full, 0);
	int flags = CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWCGROUP | (net ? CLONE_NEWNET : 0);
	if (unshare(flags) != 0)  /* cgroup ns after the placement: the run's cgroup is its / */
		fail("unshare", "unshare(NEWNS|NEWIPC|NEWUTS|NEWCGROUP[|NEWNET]) failed", NULL, errno);
	/* No user namespaces below this one: with one, a workload could get a full set of
	 * capabilities there again (only seccomp would stand in the way). */
	write_file("/proc/sys/user/max_user_namespaces", "0", "init(max_user_namespaces)");
	if (net)
		loopback_up();
	if (chdir("/") != 0) /* so pivot_root moves our cwd too */
		fail("init", "chdir /", "/", errno);
	/* Until now our net namespace was the host's: a segment is plugged in only after this. */
	if (send(ISOCK_FD, "M", 1, MSG_NOSIGNAL) != 1)
		_exit(0);

	/* phase B */
	lay_len = recv_isock(lay, sizeof lay, 'U');
	lay_pos = 1;
	close(ISOCK_FD);
	if (strcmp(lay_str(), "SBXL1") != 0)
		fail("init", "layout: bad magic", NULL, EINVAL);
	root = lay_str();
	const char *hostname = lay_str(), *cwd = lay_str();
	uid_t in_uid = (uid_t)lay_u32();
	gid_t in_gid = (gid_t)lay_u32();
	uint64_t keep = lay_num();
	build_cpu_arg = lay_str();
	if (sethostname(hostname, strlen(hostname)) != 0)
		fail("sethostname", "sethostname", hostname, errno);
	for (unsigned long long i = 0, k = lay_num(); i < k; i++)
		run_op(lay_str());
	/* For good: the workload cannot ptrace its init or read /proc/1. */
	if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0)
		fail("init", "prctl(PR_SET_DUMPABLE, 0)", NULL, errno);
	/* stdin is the run's; until it comes, the new root's /dev/null holds the place. */
	int dn = open("/dev/null", O_RDONLY | O_CLOEXEC);
	if (dn < 0 || dup2(dn, 0) < 0)
		fail("init", "open /dev/null", "/dev/null", errno);
	close(dn);
	/* The containment order (listed whole in sandbox.py, above spawn_init). */
	if (setsid() < 0)                           /* new session: no TIOCSTI into a terminal */
		fail("init", "setsid", NULL, errno);
	if (chdir(cwd) != 0)
		fail("chdir", "chdir to working directory", cwd, errno);
	drop_caps(keep, in_uid, in_gid);
	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0)
		fail("no_new_privs", "prctl(PR_SET_NO_NEW_PRIVS)", NULL, errno);
	static char ll_att[10240];
	int rfd = build_ruleset(ll_att, sizeof ll_att); /* the blob's last part */
	if (lay_pos != lay_len)
		fail("init", "layout: trailing bytes", NULL, EINVAL);
	if (rfd >= 0 && rfd != 4) {
		if (dup2(rfd, 4) < 0)
			fail("landlock", "dup2 the ruleset", NULL, errno);
		close(rfd);
		rfd = 4;
	}
	send_staged(ll_att);
	build_ruleset_fd = rfd;
	run_init(5, rfd); /* returns in the workload */
}

/* The workload: waits for GO, then the run's own steps (the list at the top). */
static int workload(int ruleset_fd, const char *cpu_arg)
{
	int restore = avoid_cpu(cpu_arg);
	/* Only the program's stdio may survive the final execve. */
	if (fcntl(SYNC_FD, F_SETFD, FD_CLOEXEC) != 0)
		_exit(125);
	if (ruleset_fd >= 0 && fcntl(ruleset_fd, F_SETFD, FD_CLOEXEC) != 0)
		fail("landlock", "ruleset fd missing", NULL, errno);
	/* Opened now, read after seccomp: a seq_file is generated at its first read. */
	int status_fd = open("/proc/self/status", O_RDONLY | O_CLOEXEC);
	int limits_fd = open("/proc/self/limits", O_RDONLY | O_CLOEXEC);
	/* Running and waiting: only now is the spare ready for a run. */
	if (send(SYNC_FD, "W", 1, MSG_NOSIGNAL) != 1)
		_exit(125);

	/* 1. the run */
	int stdin_fd;
	size_t len = recv_go(&stdin_fd);
	if (restore)
		restore_cpus();
	struct go_header h;
	if (len < sizeof h)
		fail("stub", "GO frame too short", NULL, EINVAL);
	memcpy(&h, msg, sizeof h);
	if (h.magic != GO_MAGIC)
		fail("stub", "GO frame: bad magic", NULL, EINVAL);
	if (h.flags & ~(F_SECCOMP | F_LANDLOCK | F_LANDLOCK_EXEC_RULE | F_APPARMOR))
		fail("stub", "GO frame: unknown flags", NULL, EINVAL); /* a newer launcher: refuse */
	size_t pos = sizeof h;
	if (h.n_rlimits > 64 || h.bpf_len % 8 || h.bpf_len > BPF_MAXINSNS * 8 || h.argc == 0 ||
	    h.argc > MAX_ARGS || h.envc > MAX_ARGS ||
	    len - pos < (size_t)h.n_rlimits * sizeof(struct go_rlimit) + h.bpf_len)
		fail("stub", "GO frame: bad sizes", NULL, EINVAL);
	const unsigned char *rl = msg + pos;
	pos += (size_t)h.n_rlimits * sizeof(struct go_rlimit);
	const unsigned char *bpf = msg + pos;
	pos += h.bpf_len;
	const char *search = next_str(&pos, len);
	const char *ll_path = next_str(&pos, len);
	const char *aa_path = next_str(&pos, len);
	const char *aa_data = next_str(&pos, len);
	for (uint32_t i = 0; i < h.argc; i++)
		argv_buf[i] = next_str(&pos, len);
	argv_buf[h.argc] = NULL;
	for (uint32_t i = 0; i < h.envc; i++)
		envp_buf[i] = next_str(&pos, len);
	envp_buf[h.envc] = NULL;

	/* 2. stdin */
	if (dup2(stdin_fd, 0) < 0)
		fail("stdin", "dup2 stdin", NULL, errno);
	close(stdin_fd);

	/* 3. rlimits */
	for (uint32_t i = 0; i < h.n_rlimits; i++) {
		struct go_rlimit r;
		memcpy(&r, rl + i * sizeof r, sizeof r);
		struct rlimit v = {(rlim_t)r.soft, (rlim_t)r.hard};
		if (setrlimit((int)r.resource, &v) != 0) {
			char m[128];
			snprintf(m, sizeof m, "setrlimit %u=%llu", r.resource, (unsigned long long)r.soft);
			fail("rlimits", m, NULL, errno);
		}
	}

	/* 4. the executable, inside the new root */
	const char *exe = resolve(argv_buf[0], search);

	/* 5. AppArmor: the profile takes effect at execve */
	if (h.flags & F_APPARMOR) {
		int fd = open(aa_path, O_WRONLY | O_CLOEXEC);
		if (fd < 0)
			fail("apparmor_exec", "open the AppArmor exec attribute", aa_path, errno);
		size_t dl = strlen(aa_data);
		if (write(fd, aa_data, dl) != (ssize_t)dl)
			fail("apparmor_exec", aa_data, aa_path, errno);
		close(fd);
	}

	/* 6. Landlock: the program's own file rule, then restrict */
	if (h.flags & F_LANDLOCK) {
		if (ruleset_fd < 0)
			fail("landlock", "restrict asked without a ruleset", NULL, EBADF);
		if (h.flags & F_LANDLOCK_EXEC_RULE) {
			int fd = open(ll_path, O_PATH | O_CLOEXEC);
			if (fd >= 0) {
				struct landlock_path_beneath_attr pb = {
					.allowed_access = h.landlock_exec_access, .parent_fd = fd};
				if (syscall(SYS_landlock_add_rule, ruleset_fd, LANDLOCK_RULE_PATH_BENEATH, &pb, 0))
					fail("landlock", "landlock_add_rule path_beneath (argv[0])", ll_path, errno);
				close(fd);
			} else if (errno != ENOENT) {
				fail("landlock", "open rule path", ll_path, errno);
			} /* missing: execve reports ENOENT below, as without Landlock */
		}
		if (syscall(SYS_landlock_restrict_self, ruleset_fd, 0) != 0)
			fail("landlock", "landlock_restrict_self failed", NULL, errno);
		close(ruleset_fd);
	}

	/* The exec time, taken before the filter (vDSO on most clocksources, a syscall on some). */
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);

	/* 7. seccomp, last */
	int listener = -1;
	if (h.flags & F_SECCOMP) {
		struct sock_fprog prog = {(unsigned short)(h.bpf_len / 8), (struct sock_filter *)bpf};
		long r = syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, h.seccomp_flags, &prog);
		if (r < 0)
			fail("seccomp", "seccomp(SECCOMP_SET_MODE_FILTER) failed", NULL, errno);
		if (h.seccomp_flags & SECCOMP_FILTER_FLAG_NEW_LISTENER)
			listener = (int)r;
	}

	/* 8. read-back: "<monotonic ns>\0<status>\0<limits>" */
	size_t off = (size_t)snprintf(readback, 32, "%lld", (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec) + 1;
	int rfds[2] = {status_fd, limits_fd};
	for (int i = 0; i < 2; i++) {
		ssize_t n = rfds[i] >= 0 ? read(rfds[i], readback + off, sizeof readback / 2 - 64) : -1;
		off += n > 0 ? (size_t)n : 0;
		readback[off++] = 0;
	}

	/* 9. EXEC (+ listener), then the program */
	struct iovec iov[2] = {{(void *)"X", 1}, {readback, off}};
	union {
		struct cmsghdr align;
		char buf[CMSG_SPACE(sizeof(int))];
	} cbuf;
	struct msghdr mh = {.msg_iov = iov, .msg_iovlen = 2};
	if (listener >= 0) {
		mh.msg_control = cbuf.buf;
		mh.msg_controllen = sizeof cbuf.buf;
		struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
		c->cmsg_level = SOL_SOCKET;
		c->cmsg_type = SCM_RIGHTS;
		c->cmsg_len = CMSG_LEN(sizeof(int));
		memcpy(CMSG_DATA(c), &listener, sizeof(int));
	}
	if (sendmsg(SYNC_FD, &mh, MSG_NOSIGNAL) < 1)
		_exit(126);

	execve(exe, argv_buf, envp_buf);
	char m[4352];
	snprintf(m, sizeof m, "execve %s", argv_buf[0]);
	fail("execve", m, exe, errno);
	return 127;
}

int main(int argc, char **argv)
{
	if (argc == 3 && strcmp(argv[1], "init") == 0) {
		build_main(strcmp(argv[2], "nodump") == 0); /* returns in the workload */
		return workload(build_ruleset_fd, build_cpu_arg);
	}
	/* Direct modes (tests, debugging): sbx-exec <ruleset-fd|-> [CPU:SET|-] [status-fd|-]. */
	int ruleset_fd = -1;
	if (argc > 1 && strcmp(argv[1], "-") != 0)
		ruleset_fd = atoi(argv[1]);
	if (argc > 3 && strcmp(argv[3], "-") != 0)
		run_init(atoi(argv[3]), ruleset_fd); /* returns in the workload */
	return workload(ruleset_fd, argc > 2 ? argv[2] : NULL);
}
