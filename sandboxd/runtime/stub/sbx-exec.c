/*
 * sbx-exec: the last steps of a sandboxd run, in a process whose memory is small.
 *
 * Why this exists. A run's init is a fork of the Python launcher. Its containment (namespaces,
 * root, capabilities, no_new_privs, the Landlock ruleset) is done in Python ahead of time, in a
 * spare. But execve() from a forked Python process first tears down a copy-on-write image of
 * the whole interpreter (about a millisecond here), and that would sit on every run's path. So
 * the spare's init execs this small static program while it is still a spare (in init mode,
 * below: it stays pid 1 and forks the workload), and the workload waits for the run and does
 * only what depends on it:
 *
 *   1. receive the GO message (below) and the run's stdin on fd 3 (the sync socket)
 *   2. stdin to fd 0
 *   3. rlimits (lowering needs no capability; the hard limits were never raisable here)
 *   4. resolve the executable in PATH (inside the new root)
 *   5. AppArmor: ask for the profile at the next execve (before Landlock: /proc becomes read-only)
 *   6. Landlock: add the rule for argv[0] to the ruleset the Python side built (fd 4), restrict
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
 * Started as: sbx-exec <ruleset-fd or -> [<CPU>:<SET> or -] [<status-fd> or -], with fds 0-2
 * the stdio, 3 the sync socket.
 *
 * Init mode (a status fd given): the Python side that execs us is the run's pid 1 (it built the
 * root and contained itself: no capabilities, no_new_privs). Then this program is the run's
 * init from here on (run_init): it forks, the child goes on with the steps above, and pid 1
 * only forwards signals to it, reaps every process, writes the child's wait status to the
 * status fd once it ends, and waits to be killed by the supervisor. So no Python process is
 * left in the sandbox once a spare is staged, and none is forked for the workload.
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
		} else {
			out[n++] = (char)c;
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
	int n = snprintf(frame, sizeof frame,
			 "E{\"kind\":\"LaunchError\",\"message\":\"%s\",\"step\":\"%s\","
			 "\"path\":%s%s%s,\"errno\":%d,\"hint\":null}",
			 m, step, path ? "\"" : "", path ? p : "null", path ? "\"" : "", err);
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

int main(int argc, char **argv)
{
	int ruleset_fd = -1;
	if (argc > 1 && strcmp(argv[1], "-") != 0)
		ruleset_fd = atoi(argv[1]);
	if (argc > 3 && strcmp(argv[3], "-") != 0)
		run_init(atoi(argv[3]), ruleset_fd); /* returns in the workload */
	int restore = avoid_cpu(argc > 2 ? argv[2] : NULL);
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
