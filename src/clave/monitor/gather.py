"""Find every shim's metrics socket, scrape them all at once, merge what they say.

One thread and non-blocking sockets (no thread per shim): a node's shims answer in parallel, each in its own
process, and the monitor only waits. Merging works on whole families, never on single samples: every shim
writes each family as one block (``# HELP``, ``# TYPE``, samples), and the exposition format wants each family
exactly once, so the blocks of one name are concatenated under one header.
"""

from __future__ import annotations

import os
import selectors
import socket
import time
from dataclasses import dataclass, field
from typing import TextIO

from clave.shim.prometheus import SHIMS_DIR, SOCKET_NAME, escape, unix_address

REQUEST = b"GET /metrics HTTP/1.1\r\nHost: clave-shim\r\nAccept: text/plain\r\nConnection: close\r\n\r\n"
MAX_RESPONSE = 64 << 20  # a shim answering more than this is broken, not busy


@dataclass(frozen=True)
class Shim:
    namespace: str  # containerd's
    group: str  # the pod's sandbox id (or the lone container's id)
    path: str  # its metrics socket


@dataclass
class Scrape:
    """One gathering: the merged families, and who did not answer."""

    families: dict[str, list[str]] = field(default_factory=dict)  # name -> [header, sample blocks...]
    found: list[Shim] = field(default_factory=list)
    failed: dict[Shim, str] = field(default_factory=dict)
    seconds: float = 0.0


def discover(namespaces: set[str] | None = None, root: str = SHIMS_DIR) -> list[Shim]:
    """Every shim directory under ``root`` (``<namespace>/<pod>/metrics.sock``), optionally of some namespaces."""
    shims: list[Shim] = []
    try:
        spaces = [e for e in os.scandir(root) if e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return []
    for space in spaces:
        if namespaces and space.name not in namespaces:
            continue
        try:
            groups = [e for e in os.scandir(space.path) if e.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            continue  # went away with its last shim
        shims.extend(Shim(space.name, g.name, os.path.join(g.path, SOCKET_NAME)) for g in groups)
    return shims


class _Connection:
    def __init__(self, shim: Shim) -> None:
        self.shim = shim
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.setblocking(False)
        self.response = bytearray()

    def connect(self) -> bool:
        """True once connected and the request is sent; False to try again (the shim's backlog is full)."""
        address, fd = unix_address(self.shim.path)
        try:
            self.sock.connect(address)
        except BlockingIOError:
            return False
        finally:
            if fd is not None:
                os.close(fd)
        self.sock.send(REQUEST)  # a few dozen bytes into an empty buffer: never partial
        return True


def scrape(shims: list[Shim], timeout: float = 2.0) -> Scrape:
    """Ask every shim at once; a shim that has not answered by ``timeout`` counts as failed."""
    began = time.perf_counter()
    result = Scrape(found=[])
    deadline = time.monotonic() + timeout
    selector = selectors.DefaultSelector()
    waiting: list[_Connection] = []  # not connected yet
    bodies: list[bytes] = []
    for shim in shims:
        conn = _Connection(shim)
        try:
            if conn.connect():
                selector.register(conn.sock, selectors.EVENT_READ, conn)
            else:
                waiting.append(conn)
        except (FileNotFoundError, NotADirectoryError):
            conn.sock.close()  # a directory without a socket yet, or being removed: no shim there
            continue
        except OSError as exc:
            conn.sock.close()
            result.failed[shim] = exc.strerror or str(exc)
        result.found.append(shim)
    try:
        while selector.get_map() or waiting:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            for conn in list(waiting):
                try:
                    if conn.connect():
                        waiting.remove(conn)
                        selector.register(conn.sock, selectors.EVENT_READ, conn)
                except OSError as exc:
                    waiting.remove(conn)
                    conn.sock.close()
                    result.failed[conn.shim] = exc.strerror or str(exc)
            events = selector.select(min(remaining, 0.005) if waiting else remaining)
            for key, _ in events:
                conn = key.data
                try:
                    chunk = conn.sock.recv(1 << 16)
                except OSError as exc:
                    chunk, error = b"", exc.strerror or str(exc)
                else:
                    error = ""
                if chunk and len(conn.response) < MAX_RESPONSE:
                    conn.response += chunk
                    continue
                selector.unregister(conn.sock)
                conn.sock.close()
                body, problem = _body(bytes(conn.response)) if not error else (b"", error)
                if problem:
                    result.failed[conn.shim] = problem
                else:
                    bodies.append(body)
    finally:
        for key in list(selector.get_map().values()):
            result.failed[key.data.shim] = f"no answer within {timeout:g} s"
            key.fileobj.close()  # type: ignore[union-attr]
        for conn in waiting:
            result.failed[conn.shim] = f"could not connect within {timeout:g} s"
            conn.sock.close()
        selector.close()
    result.families = merge(bodies)
    result.seconds = time.perf_counter() - began
    return result


def _body(response: bytes) -> tuple[bytes, str]:
    """The body of an HTTP/1.x response, or the reason it is not a 200."""
    head, sep, body = response.partition(b"\r\n\r\n")
    if not sep:
        return b"", "incomplete HTTP response" if response else "closed without answering"
    status = head.split(b"\r\n", 1)[0].split(b" ", 2)
    if len(status) < 2 or status[1] != b"200":
        return b"", "HTTP " + b" ".join(status[1:]).decode(errors="replace")
    return body, ""


def merge(bodies: list[bytes], families: dict[str, list[str]] | None = None) -> dict[str, list[str]]:
    """Shims' expositions by family: name -> [``# HELP`` and ``# TYPE`` lines, then each shim's samples]."""
    families = {} if families is None else families
    for body in bodies:
        for block in body.decode(errors="replace").split("# HELP ")[1:]:
            name = block[:block.find(" ")]
            end = block.find("\n") + 1
            if block.startswith("# TYPE ", end):
                end = block.find("\n", end) + 1
            entry = families.get(name)
            if entry is None:
                families[name] = ["# HELP " + block[:end], block[end:]]
            else:
                entry.append(block[end:])
    return families


class Monitor:
    """The node's shims as one exposition; remembers totals across scrapes and reports its own figures."""

    def __init__(self, namespaces: set[str] | None = None, timeout: float = 2.0, root: str = SHIMS_DIR,
                 log: TextIO | None = None) -> None:
        self.namespaces = namespaces
        self.timeout = timeout
        self.root = root
        self.scrapes = 0
        self.shim_failures = 0
        self.log = log
        self.reported: dict[Shim, str] = {}  # the last failure said of each shim (said once, not every scrape)

    def exposition(self) -> bytes:
        began = time.perf_counter()
        result = scrape(discover(self.namespaces, self.root), self.timeout)
        self.scrapes += 1
        self.shim_failures += len(result.failed)
        self._report(result.failed)
        seconds = time.perf_counter() - began
        own = [
            ("clave_monitor_scrape_duration_seconds", "gauge", "Time this scrape of the node's shims took.",
             [("", repr(seconds))]),
            ("clave_monitor_shims", "gauge", "Shim metrics sockets found on this scrape.",
             [("", str(len(result.found)))]),
            ("clave_monitor_shims_failed", "gauge", "Shims that did not answer this scrape.",
             [("", str(len(result.failed)))]),
            ("clave_monitor_shim_up", "gauge", "Whether each shim found answered this scrape (1) or not (0).",
             [(f'containerd_namespace="{escape(s.namespace)}",shim="{escape(s.group)}"',
               "0" if s in result.failed else "1") for s in result.found]),
            ("clave_monitor_scrapes_total", "counter", "Scrapes served since the monitor started.",
             [("", str(self.scrapes))]),
            ("clave_monitor_shim_failures_total", "counter", "Shim scrapes that failed since the monitor started.",
             [("", str(self.shim_failures))]),
        ]
        out = ["".join(entry) for entry in result.families.values()]
        for name, kind, help_text, samples in own:
            out.append(f"# HELP {name} {help_text}\n# TYPE {name} {kind}\n")
            out.extend(f"{name}{{{labels}}} {value}\n" if labels else f"{name} {value}\n"
                       for labels, value in samples)
        return "".join(out).encode()

    def _report(self, failed: dict[Shim, str]) -> None:
        if self.log is None:
            return
        for shim, reason in failed.items():
            if self.reported.get(shim) != reason:
                self.log.write(f"clave-monitor: shim {shim.namespace}/{shim.group}: {reason}\n")
        self.reported = {s: r for s, r in self.reported.items() if s in failed}
        self.reported.update(failed)
