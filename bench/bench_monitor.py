"""clave-monitor's scrape time: GET /metrics gathering N containers' metrics from their clave shims.

A private containerd (bench_shim's: its own config, socket, root and state; CRI disabled) runs N busybox
`sleep` containers through `containerd-shim-clave-v2` in each of three layouts, one containerd namespace per
layout, and one `clave-monitor --namespace NS` per layout on loopback:

- `N pods x 1`: every container its own shim (N shims answer in parallel);
- `N/10 pods x 10`: ten containers per shim (the io.kubernetes.cri.sandbox-id annotation groups them);
- `1 pod x N`: one shim collects all N (its containers one after the other).

Then `GET /metrics` on each monitor, the layouts interleaved, timed by the client (wall clock, the whole HTTP
exchange); the monitor's own `clave_monitor_scrape_duration_seconds` (discovery, the shims' answers, the merge)
is reported beside it. The goal: under 100 ms for 50 containers.

    .venv/bin/python bench/bench_monitor.py [--containers 50] [--runs 20] [--warmup 2]

Needs root, containerd and ctr (Debian package containerd), busybox-static.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable
from functools import partial
from pathlib import Path

from bench_shim import Containerd, remove_namespace_dirs
from common import interleave, machine_description, print_ratio_table, summarize

from clave.shim.prometheus import SHIMS_DIR
from clave.tools.bundles import make_busybox_rootfs

RUNTIME = "io.containerd.clave.v2"
SANDBOX_ANNOTATION = "io.kubernetes.cri.sandbox-id"
MONITOR = Path(sys.executable).parent / "clave-monitor"


class Layout:
    """N containers in ``per_pod``-sized pods, in a containerd namespace of their own, and a monitor for them."""

    def __init__(self, containerd: Containerd, name: str, containers: int, per_pod: int) -> None:
        self.containerd = containerd
        self.name = name
        self.namespace = f"bmon-{uuid.uuid4().hex[:8]}"
        self.containers = containers
        self.per_pod = per_pod
        self.monitor: subprocess.Popen[str] | None = None
        self.url = ""

    def ctr(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ctr", "--address", self.containerd.address, "-n", self.namespace, *args],
                              capture_output=True, text=True, timeout=120)

    def start(self, rootfs: Path) -> None:
        for i in range(self.containers):
            pod = f"pod{i // self.per_pod}"
            result = self.ctr("run", "-d", "--runtime", RUNTIME, "--annotation", f"{SANDBOX_ANNOTATION}={pod}",
                              "--rootfs", str(rootfs), f"{pod}-c{i}", "/bin/sleep", "3600")
            if result.returncode != 0:
                raise RuntimeError(f"ctr run ({self.name}, container {i}): {result.stderr.strip()}")
        self.monitor = subprocess.Popen([str(MONITOR), "--listen", "127.0.0.1:0", "--namespace", self.namespace],
                                        stdout=subprocess.PIPE, text=True)
        assert self.monitor.stdout is not None
        match = re.search(r"http://(\S+)/metrics", self.monitor.stdout.readline())
        if not match:
            raise RuntimeError("clave-monitor did not start")
        self.url = f"http://{match.group(1)}/metrics"
        deadline = time.monotonic() + 30  # a shim serves metrics from half a second after its start
        while True:
            try:
                self.scrape([])
                return
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def scrape(self, own: list[float]) -> float:
        """One GET /metrics: client wall clock in ms; the monitor's own duration appended to ``own`` (ms)."""
        began = time.perf_counter()
        with urllib.request.urlopen(self.url, timeout=30) as response:
            body = response.read().decode()
        elapsed = (time.perf_counter() - began) * 1000
        counted = len(re.findall(r"^clave_container_info\{", body, re.M))
        failed = re.search(r"^clave_monitor_shims_failed (\S+)$", body, re.M)
        if counted != self.containers or failed is None or failed.group(1) != "0":
            raise RuntimeError(f"{self.name}: {counted} containers of {self.containers} reported, failed shims: "
                               f"{failed.group(1) if failed else '?'}")
        duration = re.search(r"^clave_monitor_scrape_duration_seconds (\S+)$", body, re.M)
        assert duration is not None
        own.append(float(duration.group(1)) * 1000)
        return elapsed

    def close(self) -> None:
        if self.monitor is not None:
            self.monitor.terminate()  # its own pid
            self.monitor.wait(timeout=10)
        tasks = self.ctr("task", "ls", "-q").stdout.split()
        for task in tasks:
            self.ctr("task", "kill", "-s", "SIGKILL", task)
        for task in tasks:
            deadline = time.monotonic() + 10
            while self.ctr("task", "delete", task).returncode != 0 and time.monotonic() < deadline:
                time.sleep(0.1)
        for container in self.ctr("container", "ls", "-q").stdout.split():
            self.ctr("container", "delete", container)
        remove_namespace_dirs(self.namespace)
        try:
            os.rmdir(os.path.join(SHIMS_DIR, self.namespace))
        except OSError:
            pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--containers", type=int, default=50)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench_monitor.py needs root (containerd)")
    for tool in ("containerd", "ctr"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found: install Debian's containerd")
    n = args.containers
    pods = max(n // 10, 1)
    shapes = {f"{n} pods x 1": 1, f"{pods} pod{'s' if pods > 1 else ''} x 10": min(10, n), f"1 pod x {n}": n}
    with tempfile.TemporaryDirectory(prefix="bmon-", dir="/run") as tmp:
        base = Path(tmp)
        rootfs = Path(make_busybox_rootfs(str(base / "rootfs")))
        containerd = Containerd(base)
        layouts = [Layout(containerd, name, n, per_pod) for name, per_pod in shapes.items()]
        try:
            print(machine_description())
            began = time.monotonic()
            for layout in layouts:
                layout.start(rootfs)
            print(f"{len(layouts)} x {n} containers started in {time.monotonic() - began:.0f} s")
            own: dict[str, list[float]] = {layout.name: [] for layout in layouts}
            variants: dict[str, Callable[[], float]] = {
                layout.name: partial(layout.scrape, own[layout.name]) for layout in layouts}
            samples = interleave(variants, args.runs, args.warmup)
        finally:
            for layout in layouts:
                layout.close()
            containerd.close()
    print_ratio_table(f"GET /metrics from clave-monitor, {n} containers, {args.runs} interleaved runs (client)",
                      samples, label="layout")
    print(f"\nthe monitor's own clave_monitor_scrape_duration_seconds (ms; warm-up rounds included, n = "
          f"{args.runs + args.warmup})")
    for name, values in own.items():
        stats = summarize(values)
        print(f"{name:<14}  median {stats.median:7.2f}  p90 {stats.p90:7.2f}  min {stats.minimum:7.2f}")


if __name__ == "__main__":
    main()
