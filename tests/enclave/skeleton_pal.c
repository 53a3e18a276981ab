/* A skeleton enclave runtime for tests: implements the Enclave Runtime PAL API v1, v2 or v3 (chosen with
 * -DPAL_API_VERSION=N), records every call and its arguments in a log file, and "runs" the application by
 * fork+exec, so the whole path from clave to the PAL and back is observable.
 *
 * pal_init args (space separated): log=PATH (default /pal.log), fail_init (pal_init returns -EINVAL),
 * fail_exec (pal_exec returns -ENOEXEC).
 */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef PAL_API_VERSION
#define PAL_API_VERSION 2
#endif

struct pal_attr_t { const char *args; const char *log_level; };
struct pal_attr_v3_t { struct pal_attr_t attr_v1; int fd; uint64_t addr; };
struct pal_stdio_fds { int stdin, stdout, stderr; };
struct pal_create_process_args {
	char *path; char **argv; char **env; struct pal_stdio_fds *stdio; int *pid;
};
struct pal_exec_args { int pid; int *exit_value; };

static char log_path[256] = "/pal.log";
static int fail_exec;
static volatile pid_t children[16];
#if PAL_API_VERSION >= 2
struct process {
	char *path;
	char **argv, **env;
	struct pal_stdio_fds stdio;
};
static struct process processes[16];
static int nprocesses;
#endif

static void record(const char *fmt, ...)
{
	char line[2048];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(line, sizeof(line) - 1, fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	if (n > (int)sizeof(line) - 2)
		n = sizeof(line) - 2;
	line[n++] = '\n';
	int fd = open(log_path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
	if (fd >= 0) {
		ssize_t unused = write(fd, line, n);
		(void)unused;
		close(fd);
	}
}

#if PAL_API_VERSION >= 2
static char **copy_strings(char **src)
{
	int n = 0;
	while (src && src[n])
		n++;
	char **dst = calloc(n + 1, sizeof(char *));
	for (int i = 0; i < n; i++)
		dst[i] = strdup(src[i]);
	return dst;
}

#endif

static void record_strings(const char *what, char **v)
{
	char buf[1024] = "";
	for (int i = 0; v && v[i]; i++) {
		strncat(buf, i ? "|" : "", sizeof(buf) - strlen(buf) - 1);
		strncat(buf, v[i], sizeof(buf) - strlen(buf) - 1);
	}
	record("  %s=%s", what, buf);
}

static int do_init(const struct pal_attr_t *attr)
{
	const char *args = attr && attr->args ? attr->args : "";
	char copy[512];
	snprintf(copy, sizeof(copy), "%s", args);
	for (char *tok = strtok(copy, " "); tok; tok = strtok(NULL, " ")) {
		if (!strncmp(tok, "log=", 4))
			snprintf(log_path, sizeof(log_path), "%s", tok + 4);
		else if (!strcmp(tok, "fail_exec"))
			fail_exec = 1;
	}
	record("pal_init version=%d args=%s log_level=%s", PAL_API_VERSION, args,
	       attr && attr->log_level ? attr->log_level : "");
	if (strstr(args, "fail_init"))
		return -EINVAL;
	return 0;
}

static int run(int slot, char *path, char **argv, char **env, struct pal_stdio_fds *stdio, int *exit_value)
{
	if (fail_exec)
		return -ENOEXEC;
	pid_t child = fork();
	if (child < 0)
		return -errno;
	if (child == 0) {
		dup2(stdio->stdin, 0);
		dup2(stdio->stdout, 1);
		dup2(stdio->stderr, 2);
		if (env)
			execve(path, argv, env);
		else
			execv(path, argv);
		_exit(127);
	}
	children[slot] = child;
	int status = 0;
	while (waitpid(child, &status, 0) < 0 && errno == EINTR)
		;
	children[slot] = 0;
	*exit_value = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
	record("pal_exec done exit_value=%d", *exit_value);
	return 0;
}

#if PAL_API_VERSION >= 2
int pal_get_version(void)
{
	return PAL_API_VERSION;
}
#endif

#if PAL_API_VERSION >= 3
int pal_init(const struct pal_attr_v3_t *attr)
{
	int ret = do_init(&attr->attr_v1);
	record("  fd=%d addr=%llu", attr->fd, (unsigned long long)attr->addr);
	return ret;
}

int pal_get_local_report(void *targetinfo, int targetinfo_len, void *report, int *report_len)
{
	record("pal_get_local_report targetinfo_len=%d report_len=%d", targetinfo_len, *report_len);
	const char tag[] = "SKELETON-REPORT:";
	int n = (int)sizeof(tag) - 1 + targetinfo_len;
	if (n > *report_len)
		return -ENOSPC;
	memcpy(report, tag, sizeof(tag) - 1);
	memcpy((char *)report + sizeof(tag) - 1, targetinfo, targetinfo_len);
	*report_len = n;
	return 0;
}
#else
int pal_init(const struct pal_attr_t *attr)
{
	return do_init(attr);
}
#endif

#if PAL_API_VERSION == 1
int pal_exec(char *path, char *argv[], struct pal_stdio_fds *stdio, int *exit_code)
{
	record("pal_exec path=%s stdio=%d,%d,%d", path, stdio->stdin, stdio->stdout, stdio->stderr);
	record_strings("argv", argv);
	return run(0, path, argv, NULL, stdio, exit_code);
}
#else
int pal_create_process(struct pal_create_process_args *args)
{
	record("pal_create_process path=%s stdio=%d,%d,%d", args->path, args->stdio->stdin, args->stdio->stdout,
	       args->stdio->stderr);
	record_strings("argv", args->argv);
	record_strings("env", args->env);
	if (nprocesses == 16)
		return -EAGAIN;
	struct process *p = &processes[nprocesses];
	p->path = strdup(args->path);
	p->argv = copy_strings(args->argv);
	p->env = copy_strings(args->env);
	p->stdio = *args->stdio;
	*args->pid = 42 + nprocesses++;
	return 0;
}

int pal_exec(struct pal_exec_args *args)
{
	record("pal_exec pid=%d", args->pid);
	int slot = args->pid - 42;
	if (slot < 0 || slot >= nprocesses)
		return -EINVAL;
	struct process *p = &processes[slot];
	return run(slot, p->path, p->argv, p->env, &p->stdio, args->exit_value);
}

int pal_kill(int pid, int sig)
{
	record("pal_kill pid=%d sig=%d", pid, sig);
	for (int slot = 0; slot < 16; slot++)
		if (children[slot] > 0 && (pid == -1 || pid == 42 + slot))
			kill(children[slot], sig);
	return 0;
}
#endif

int pal_destroy(void)
{
	record("pal_destroy");
	return 0;
}
