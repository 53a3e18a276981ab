"""The runtime-spec features document (features.md): what this build and host support."""

from __future__ import annotations

import os
from typing import Any

from clave.config.spec import HOOK_KINDS, NAMESPACE_TYPES
from clave.linux.rootfs import _FLAG_OPTIONS, PROPAGATION_OPTIONS

SECCOMP_ACTIONS = [
    "SCMP_ACT_ALLOW", "SCMP_ACT_ERRNO", "SCMP_ACT_KILL", "SCMP_ACT_KILL_PROCESS", "SCMP_ACT_KILL_THREAD",
    "SCMP_ACT_LOG", "SCMP_ACT_NOTIFY", "SCMP_ACT_TRACE", "SCMP_ACT_TRAP",
]
SECCOMP_OPERATORS = [
    "SCMP_CMP_EQ", "SCMP_CMP_GE", "SCMP_CMP_GT", "SCMP_CMP_LE", "SCMP_CMP_LT", "SCMP_CMP_MASKED_EQ", "SCMP_CMP_NE",
]
SECCOMP_FLAGS = ["SECCOMP_FILTER_FLAG_LOG", "SECCOMP_FILTER_FLAG_SPEC_ALLOW", "SECCOMP_FILTER_FLAG_TSYNC"]


def features() -> dict[str, Any]:
    from clave.config.defaults import DEFAULT_CAPABILITIES  # noqa: F401  (keeps one source of names)

    try:
        from clave.linux.capabilities import CAPABILITIES

        caps = sorted(CAPABILITIES, key=CAPABILITIES.__getitem__)
    except ImportError:
        caps = []
    v2 = os.path.exists("/sys/fs/cgroup/cgroup.controllers")
    v1 = not v2
    return {
        "ociVersionMin": "1.0.0",
        "ociVersionMax": "1.2.0",
        "hooks": list(HOOK_KINDS),
        "mountOptions": sorted(set(_FLAG_OPTIONS) | set(PROPAGATION_OPTIONS)),
        "linux": {
            "namespaces": list(NAMESPACE_TYPES),
            "capabilities": caps,
            "cgroup": {"v1": v1 or os.path.isdir("/sys/fs/cgroup/unified"), "v2": True, "systemd": False,
                       "systemdUser": False, "rdma": False},
            "seccomp": {
                "enabled": True,
                "actions": SECCOMP_ACTIONS,
                "operators": SECCOMP_OPERATORS,
                "archs": ["SCMP_ARCH_AARCH64", "SCMP_ARCH_X32", "SCMP_ARCH_X86", "SCMP_ARCH_X86_64"],
                "knownFlags": SECCOMP_FLAGS,
                "supportedFlags": SECCOMP_FLAGS,
            },
            "apparmor": {"enabled": os.path.isdir("/sys/kernel/security/apparmor")},
            "selinux": {"enabled": os.path.isdir("/sys/fs/selinux")},
            "intelRdt": {"enabled": False},
            "mountExtensions": {"idmap": {"enabled": False}},
        },
        "annotations": {
            "io.github.clave.handlers": "native",
            "org.opencontainers.runc.checkpoint.enabled": "false",
        },
    }
