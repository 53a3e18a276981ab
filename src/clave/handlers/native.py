"""The native handler: isolation from Linux namespaces, cgroups and the process's confinement (what runc does)."""

from __future__ import annotations

import os

from clave.config import spec as oci
from clave.errors import ClaveError
from clave.handlers import Handler

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from clave.engine.container import CreateOptions
    from clave.engine.state import State, StateDir
    from clave.linux.spawn import InitPlan


class NativeHandler(Handler):
    name = "native"

    def prepare(self, state: State, notice: Callable[[str], None]) -> None:
        from clave.linux.spawn import ignored_lsm

        for message in ignored_lsm(state.config.get("linux", {})):
            notice(message)

    def spawn(self, state: State, state_dir: StateDir, opts: CreateOptions, cgroup: Any, runtime_hooks: Any) -> int:
        from clave.linux import spawn  # not at import time: delete and state load this module too

        return self.spawn_plan(make_plan(state, state_dir, opts, spawn.native_launch), opts, cgroup, runtime_hooks)

    def spawn_plan(self, plan: InitPlan, opts: CreateOptions, cgroup: Any, runtime_hooks: Any) -> int:
        """Fork the init for ``plan``, with the console socket connected; errors become one-line ClaveErrors."""
        from clave.linux import spawn

        try:
            spawn.check_plan(plan)
            if opts.console_socket:
                from clave.linux import console

                plan.console_fd = console.connect_socket(opts.console_socket)
            try:
                return spawn.spawn(plan, cgroup.add_process, runtime_hooks)
            finally:
                if plan.console_fd is not None:
                    os.close(plan.console_fd)
        except (spawn.SpawnError, OSError) as exc:
            raise ClaveError(str(exc)) from None
        except Exception as exc:
            if type(exc).__module__.startswith("clave."):
                raise ClaveError(str(exc)) from None
            raise


    def cleanup(self, state: State) -> None:
        inherited = state.extra.get("inherited_mounts")
        if inherited is not None:
            from clave.linux import rootfs

            try:
                rootfs.detach_rootfs(state.rootfs, inherited["rootfs_mount"])
            except rootfs.RootfsError as exc:
                raise ClaveError(str(exc)) from None


def make_plan(state: State, state_dir: StateDir, opts: CreateOptions, launch: Any) -> InitPlan:
    """The init plan shared by every handler that runs a Linux process tree."""
    from clave.linux import spawn

    extra_env = []
    if opts.listen_fds:
        extra_env = [f"LISTEN_FDS={opts.listen_fds}", "LISTEN_PID=1"]
    plan = spawn.InitPlan(
        config=state.config,
        rootfs=state.rootfs,
        state_dir=state_dir.path,
        namespaces=oci.namespaces(state.config),
        cgroup_paths=state.cgroup_paths,
        no_pivot=opts.no_pivot,
        keep_fds=opts.listen_fds + opts.preserve_fds,
        extra_env=extra_env,
        launch=launch,
        bundle=state.bundle,
    )
    plan.stdio = opts.stdio
    if "mount" not in plan.namespaces:
        from clave.linux import rootfs

        # The container's mounts will be the runtime's own: remember what was there, cleanup removes the rest.
        state.extra["inherited_mounts"] = {"rootfs_mount": rootfs.top_mount_id(state.rootfs)}
    return plan
