"""Memory thrashing of a container in the guest, seen through PSI and ended as the kernel's OOM killer would.

A cgroup at its ``memory.max`` with no swap can stall for minutes instead of being OOM-killed: each charge
reclaims the container's own file pages (its programs' text), which it faults back in at once, and the kernel
counts that as progress. Under an emulated CPU every refault is slow, so a memory hog that a host kills in
seconds ran on here for minutes (seen in a CRI pod: 33 MB of anon at a 32 MiB limit, file refaults climbing,
no OOM kill for over 100 s). The agent therefore puts a PSI trigger on each limited container's
``memory.pressure``; when every task of the container has been stalled on memory for most of a window while it
sits at its limit, the agent kills the cgroup and reports an OOM kill (what systemd-oomd and Android's lmkd do
on hosts)."""

from __future__ import annotations

import os
import select
import threading

from clave.linux.cgroups.common import CgroupError, read_optional, write_text

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

TRIGGER = b"full 3000000 5000000"  # all of the container's tasks stalled on memory for 3 s of a 5 s window
NEAR_LIMIT = 1 << 20  # memory.current this close to memory.max counts as at the limit


class PressureWatch:
    """One thread that waits on the PSI triggers of every watched cgroup; ``on_kill(container_id)`` is called
    after it killed one."""

    def __init__(self, on_kill: Callable[[str], None]) -> None:
        self._on_kill = on_kill
        self._watched: dict[int, tuple[str, str]] = {}  # trigger fd -> (container id, cgroup directory)
        self._poller = select.poll()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def watch(self, container_id: str, cgroup_dir: str) -> None:
        """Watch a container's cgroup when it has a memory limit (and the guest kernel has PSI); once."""
        with self._lock:
            if any(watched == container_id for watched, _dir in self._watched.values()):
                return
        if _limit(cgroup_dir) is None:
            return
        try:
            fd = os.open(os.path.join(cgroup_dir, "memory.pressure"), os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return  # no PSI: the kernel's OOM killer alone
        try:
            os.write(fd, TRIGGER)
        except OSError:
            os.close(fd)
            return
        with self._lock:
            self._watched[fd] = (container_id, cgroup_dir)
            self._poller.register(fd, select.POLLPRI)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="memory-pressure", daemon=True)
                self._thread.start()

    def forget(self, container_id: str) -> None:
        with self._lock:
            for fd, (watched, _dir) in list(self._watched.items()):
                if watched == container_id:
                    self._drop(fd)

    def _drop(self, fd: int) -> None:
        del self._watched[fd]
        self._poller.unregister(fd)
        os.close(fd)

    def _run(self) -> None:
        while True:
            for fd, events in self._poller.poll(1000):  # a timeout: triggers registered meanwhile join the poll
                with self._lock:
                    target = self._watched.get(fd)
                    if target is None:
                        continue
                    if events & (select.POLLERR | select.POLLNVAL):  # the cgroup is gone
                        self._drop(fd)
                        continue
                if events & select.POLLPRI and _kill_if_at_limit(target[1]):
                    self._on_kill(target[0])


def _limit(cgroup_dir: str) -> int | None:
    """The cgroup's memory.max in bytes; None when it has none (or no such file)."""
    text = (read_optional(os.path.join(cgroup_dir, "memory.max")) or "max").strip()
    return None if text == "max" else int(text)


def _kill_if_at_limit(cgroup_dir: str) -> bool:
    try:
        limit = _limit(cgroup_dir)
        current = int(read_optional(os.path.join(cgroup_dir, "memory.current")) or 0)
        if limit is None or current + NEAR_LIMIT < limit:
            return False  # stalled for another reason (its limit was raised meanwhile, say)
        write_text(os.path.join(cgroup_dir, "cgroup.kill"), "1", "memory pressure kill")
        return True
    except (CgroupError, ValueError):
        return False
