/* Containment probe: tries one privileged operation and prints "ok" or the errno name, e.g. "EPERM".
   Built static by the tests (gcc -static) so it runs in a busybox rootfs. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/capability.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <unistd.h>

static int report(long result) {
    if (result >= 0) {
        puts("ok");
        return 0;
    }
    const char *name = strerrorname_np(errno);
    puts(name ? name : "unknown-errno");
    return 1;
}

static long raise_cap(int cap) {
    struct __user_cap_header_struct header = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct data[2];
    if (syscall(SYS_capget, &header, data) != 0)
        return -1;
    data[cap / 32].effective |= 1u << (cap % 32);
    data[cap / 32].permitted |= 1u << (cap % 32);
    return syscall(SYS_capset, &header, data);
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: probe init_module|finit_module|capset|caps|ptrace PID|mount|sethostname NAME|syscall NR\n");
        return 2;
    }
    const char *what = argv[1];
    if (!strcmp(what, "init_module")) {
        static char image[64];
        return report(syscall(SYS_init_module, image, sizeof image, ""));
    }
    if (!strcmp(what, "finit_module")) {
        int fd = open("/bin/busybox", O_RDONLY);
        return report(syscall(SYS_finit_module, fd, "", 0));
    }
    if (!strcmp(what, "capset"))
        return report(raise_cap(CAP_SYS_ADMIN));
    if (!strcmp(what, "ptrace") && argc > 2)
        return report(ptrace(PTRACE_ATTACH, (pid_t)atoi(argv[2]), 0, 0));
    if (!strcmp(what, "mount"))
        return report(mount("none", "/tmp", "tmpfs", 0, ""));
    if (!strcmp(what, "sethostname") && argc > 2)
        return report(sethostname(argv[2], strlen(argv[2])));
    if (!strcmp(what, "caps")) {
        /* What a setuid exec left us: the capability and no_new_privs lines of /proc/self/status. */
        char line[256];
        FILE *status = fopen("/proc/self/status", "r");
        if (!status)
            return report(-1);
        while (fgets(line, sizeof line, status))
            if (!strncmp(line, "Cap", 3) || !strncmp(line, "NoNewPrivs", 10) || !strncmp(line, "Uid", 3))
                fputs(line, stdout);
        return 0;
    }
    if (!strcmp(what, "syscall") && argc > 2)
        return report(syscall(atol(argv[2]), 0, 0, 0, 0, 0, 0));
    fprintf(stderr, "probe: unknown operation %s\n", what);
    return 2;
}
