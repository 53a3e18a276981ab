"""The vm handler's network (clave.vm.network, Kata's tcfilter): a pod network namespace's veth reaches the guest
through a tap and tc mirred redirects, with its MAC, addresses, routes and MTU; a server in the VM answers a
peer namespace over the veth pair; a namespace with only lo gives the guest lo only; host networking is refused
in one line; delete (and delete --force after the keeper is killed) leaves no tap and no filter.

Two VM boots in all (~4 s of TCG each); the namespaces and veths are the test's own (random suffixes) and are
removed whatever happens. Real QEMU, the real guest; root is needed."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers import reap_children

from clave.errors import InvalidArgument
from clave.vm import network
from clave.vm.guest import Guest
from tests.vm.conftest import _skip_reason
from tests.vm.test_handler import Cli, assert_gone, reap, vm_config

POD_ADDR, PEER_ADDR, PREFIX, MTU, PORT = "10.231.7.2", "10.231.7.1", 24, 1400, 8080
SECOND_ADDR = "10.231.8.2"  # eth1, a second veth to the peer: each guest NIC must get its own interface's MAC
SERVE = """#!/bin/sh
# one answer per connection: what the guest made of the namespace's interface
echo "kernel $(uname -r)"
echo "mtu $(cat /sys/class/net/eth0/mtu)"
echo "mac $(cat /sys/class/net/eth0/address)"
echo "mac1 $(cat /sys/class/net/eth1/address)"
ip -4 -o addr show dev eth0
ip -4 -o addr show dev eth1
ip route
"""


def sh(*args: str, check: bool = True) -> str:
    done = subprocess.run(args, capture_output=True, text=True)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


@dataclass
class Net:
    """A pod namespace (eth0, addressed, default route) and a peer namespace on the other end of its veth."""

    pod: str
    peer: str

    @property
    def pod_path(self) -> str:
        return f"/var/run/netns/{self.pod}"

    def in_pod(self, *args: str) -> str:
        return sh("ip", "netns", "exec", self.pod, *args)

    def mac(self, name: str) -> str:
        return str(json.loads(sh("ip", "-n", self.pod, "-j", "link", "show", name))[0]["address"])

    def taps(self) -> list[str]:
        links = json.loads(sh("ip", "-n", self.pod, "-j", "-d", "link", "show"))
        return [link["ifname"] for link in links if (link.get("linkinfo") or {}).get("info_kind") == "tun"]

    def ingress(self) -> bool:
        """Whether eth0 or eth1 has an ingress qdisc (a redirect)."""
        return any(q.get("kind") == "ingress" for dev in ("eth0", "eth1")
                   for q in json.loads(self.in_pod("tc", "-j", "qdisc", "show", "dev", dev)))

    def ask(self, timeout: float = 60) -> str:
        """Connect from the peer namespace until the server in the VM answers (its loop restarts nc)."""
        deadline = time.monotonic() + timeout
        while True:
            done = subprocess.run(["ip", "netns", "exec", self.peer, "busybox", "nc", "-w", "5", POD_ADDR, str(PORT)],
                                  capture_output=True, text=True, stdin=subprocess.DEVNULL)
            if done.returncode == 0 and done.stdout.strip():
                return done.stdout
            assert time.monotonic() < deadline, f"no answer from {POD_ADDR}:{PORT}: {done.stderr.strip()}"
            time.sleep(0.3)


@pytest.fixture(scope="module")
def guest_built() -> Guest:
    from clave.errors import ClaveError
    from clave.vm.guest import build_guest, current_guest

    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    try:
        return current_guest()
    except ClaveError:
        return build_guest()


@pytest.fixture(scope="module")
def rootfs(guest_built: Guest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from clave.tools.bundles import make_busybox_rootfs

    base = tmp_path_factory.mktemp("netrootfs")
    base.chmod(0o755)
    tree = Path(make_busybox_rootfs(str(base / "rootfs")))
    (tree / "serve.sh").write_text(SERVE)
    (tree / "serve.sh").chmod(0o755)
    return tree


@pytest.fixture
def net() -> Iterator[Net]:
    suffix = secrets.token_hex(3)
    n = Net(f"cvpod{suffix}", f"cvpeer{suffix}")
    try:
        sh("ip", "netns", "add", n.pod)
        sh("ip", "netns", "add", n.peer)
        sh("ip", "link", "add", f"cv{suffix}", "netns", n.peer, "type", "veth", "peer", "name", "eth0", "netns", n.pod)
        sh("ip", "-n", n.pod, "link", "set", "eth0", "mtu", str(MTU), "up")
        sh("ip", "-n", n.pod, "addr", "add", f"{POD_ADDR}/{PREFIX}", "dev", "eth0")
        sh("ip", "-n", n.pod, "route", "add", "default", "via", PEER_ADDR)
        sh("ip", "-n", n.peer, "link", "set", f"cv{suffix}", "mtu", str(MTU), "up")
        sh("ip", "-n", n.peer, "addr", "add", f"{PEER_ADDR}/{PREFIX}", "dev", f"cv{suffix}")
        sh("ip", "link", "add", f"cw{suffix}", "netns", n.peer, "type", "veth", "peer", "name", "eth1", "netns", n.pod)
        sh("ip", "-n", n.pod, "link", "set", "eth1", "up")
        sh("ip", "-n", n.pod, "addr", "add", f"{SECOND_ADDR}/{PREFIX}", "dev", "eth1")
        yield n
    finally:
        for name in (n.pod, n.peer):
            sh("ip", "netns", "del", name, check=False)  # the veth pair goes with them


@pytest.fixture
def cli(tmp_path: Path, rootfs: Path, net: Net) -> Iterator[Cli]:
    """After ``net``, so containers are deleted before the namespaces go."""
    from clave.linux import sys as lsys

    lsys.prctl(36, 1)  # PR_SET_CHILD_SUBREAPER: keepers outlive the `clave` that forked them
    c = Cli(tmp_path, rootfs)
    try:
        yield c
    finally:
        for cid in os.listdir(c.root) if c.root.exists() else []:
            c("delete", "--force", cid, check=False)
        for t in c.traces:
            assert_gone(t)
        reap_children()
        lsys.prctl(36, 0)


def with_netns(config: dict[str, Any], path: str | None) -> dict[str, Any]:
    """``config`` with its network namespace at ``path`` (None: no network namespace, the host's network)."""
    namespaces = [ns for ns in config["linux"]["namespaces"] if ns["type"] != "network"]
    if path is not None:
        namespaces.append({"type": "network", "path": path})
    config["linux"]["namespaces"] = namespaces
    return config


def test_attach_and_detach_without_a_vm(net: Net) -> None:
    """The host side alone: the plan names a tap per Ethernet interface, attach makes it with both redirects
    and reads what the guest needs, detach removes all of it (twice is harmless), a missing namespace is
    refused and a namespace that is gone is nothing to clean."""
    doc = network.plan(with_netns({"linux": {"namespaces": []}}, net.pod_path))
    assert [link["name"] for link in doc["links"]] == ["eth0", "eth1"]
    assert all(len(link["tap"]) <= 15 for link in doc["links"])
    nics, interfaces, routes = network.attach(doc)
    try:
        assert [(nic.mac, nic.name) for nic in nics] == [(net.mac("eth0"), "eth0"), (net.mac("eth1"), "eth1")]
        assert sorted(net.taps()) == sorted(link["tap"] for link in doc["links"]) and net.ingress()
        eth0 = next(i for i in interfaces if i["name"] == "eth0")
        assert eth0["mtu"] == MTU and eth0["hwAddr"] == net.mac("eth0")
        assert {"family": 0, "address": POD_ADDR, "mask": str(PREFIX)} in eth0["IPAddresses"]
        assert [(r["dest"], r["gateway"], r["device"]) for r in routes] == [("default", PEER_ADDR, "eth0")]
        assert [i["name"] for i in interfaces] == ["eth0", "eth1"]  # lo is up from the guest's boot
    finally:
        for nic in nics:
            os.close(nic.fd)
    network.detach(doc)
    network.detach(doc)
    assert net.taps() == [] and not net.ingress()
    with pytest.raises(InvalidArgument, match="host's network"):
        network.plan({"linux": {"namespaces": [{"type": "pid"}]}})
    with pytest.raises(InvalidArgument, match="does not exist"):
        network.plan(with_netns({"linux": {"namespaces": []}}, "/var/run/netns/clave-no-such-ns"))
    network.detach({**doc, "netns": "/var/run/netns/clave-no-such-ns"})


def test_server_in_the_vm_is_reached_from_the_peer_namespace(cli: Cli, net: Net) -> None:
    """One VM: its server answers over the veth with the guest's kernel, the namespace's MTU, MAC, address and
    default route; a second VM on the same namespace is refused in one line and leaves the first's redirect
    alone; the keeper killed, delete --force removes the tap and the filters."""
    cid = cli.id("srv")
    cli.write(with_netns(vm_config(["sh", "-c", f"while true; do nc -l -p {PORT} -e /serve.sh; done"],
                                   cli.rootfs), net.pod_path))
    keeper = cli.create(cid)
    cli("start", cid)
    assert len(net.taps()) == 2 and net.ingress()
    answer = net.ask()
    assert f"kernel {os.uname().release}" not in answer and "kernel " in answer  # the guest's own kernel
    assert f"mtu {MTU}" in answer and f"mac {net.mac('eth0')}" in answer and f"mac1 {net.mac('eth1')}" in answer
    assert f"inet {POD_ADDR}/{PREFIX}" in answer and f"inet {SECOND_ADDR}/{PREFIX}" in answer
    assert f"default via {PEER_ADDR} dev eth0" in answer

    line = cli.fail("create", "--bundle", str(cli.bundle), cli.id("second"))
    assert "eth0" in line and "one VM per network namespace" in line
    assert len(net.taps()) == 2 and net.ingress()
    assert "kernel " in net.ask()  # the first VM still has the interface

    os.kill(keeper, signal.SIGKILL)
    reap(keeper)
    cli("delete", "--force", cid)
    assert net.taps() == [] and not net.ingress()
    assert_gone(cli.traces[-1])


def test_network_none_gives_the_guest_lo_only_and_host_network_is_refused(cli: Cli) -> None:
    """A namespace with only lo (--network none): no NIC, the guest's lo is up; no network namespace at all:
    one line, before any VM boots, nothing left."""
    bare = f"cvnone{secrets.token_hex(3)}"
    sh("ip", "netns", "add", bare)
    try:
        cli.write(with_netns(vm_config(["sh", "-c", "ls /sys/class/net; ip -o -4 addr show dev lo; ip link show lo"],
                                       cli.rootfs), f"/var/run/netns/{bare}"))
        done = cli("run", "--bundle", str(cli.bundle), cli.id("none"), handler=True)
        out = done.stdout.decode()
        assert out.split("\n", 1)[0].split() == ["lo"], out
        assert "inet 127.0.0.1/8" in out and ",UP" in out
        assert len(sh("ip", "-n", bare, "-o", "link", "show").splitlines()) == 1  # nothing made in it
    finally:
        sh("ip", "netns", "del", bare, check=False)

    cli.write(with_netns(vm_config(["true"], cli.rootfs), None))
    line = cli.fail("run", "--bundle", str(cli.bundle), cli.id("host"))
    assert "host's network" in line
    assert not (cli.root / cli.id("host")).exists()
