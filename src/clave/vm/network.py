"""The pod network namespace's interfaces in the guest: Kata Containers' ``tcfilter`` model.

For each Ethernet interface of the container's network namespace other than lo (a CNI veth, podman's, a
test's), a tap device is made in that same namespace and tc moves every frame both ways: an ingress qdisc on
each with a ``mirred egress redirect`` filter to the other. QEMU gets the tap as an open fd (``-netdev
tap,fd=N``) and a virtio-net NIC with the interface's MAC address; the guest agent gives that NIC the
interface's name, MTU, addresses and routes (UpdateInterface / UpdateRoutes, as Kata's agent). To the peer, the
VM *is* the interface; the namespace's own stack sees none of its traffic. tc rather than a bridge or macvtap
because it works for any Ethernet-like interface and touches nothing outside the namespace.

No interfaces besides lo (``--network none``, or a new namespace: a config's network entry without a path, as
`clave spec` writes, since no host process of a vm container would ever own one): the VM gets no NIC and the
guest has its lo only. No network namespace at all (host networking) is refused (Kata does not support it
either): a VM cannot be on the host's network stack, and giving it some other network would silently break what
was asked.

What is made is recorded before it is made (``plan`` goes into the container's state): the namespace path, the
(interface, tap) pairs and a random cookie carried by our tc actions. ``detach`` removes an ingress qdisc only
when its filter carries that cookie and deletes the taps by name, so it is safe after a crash at any step and
never touches another VM's redirect.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import struct
import subprocess

from clave.errors import InvalidArgument
from clave.vm.errors import AgentError, VmError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import Any

    from clave.vm.client import AgentClient

IP = "ip"
TC = "tc"
TUN = "/dev/net/tun"
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000  # QEMU then negotiates checksum and segmentation offloads with the guest
CLONE_NEWNET = 0x40000000
SCOPES = {"global": 0, "site": 200, "link": 253, "host": 254, "nowhere": 255}
FAMILY_V4, FAMILY_V6 = 0, 1  # Kata's IPFamily


class NetworkError(VmError):
    """The namespace's interfaces could not be handed to the VM, or taken back."""


class Nic:
    """A tap fd for QEMU and the MAC address its virtio-net device answers to."""

    def __init__(self, fd: int, mac: str, name: str) -> None:
        self.fd = fd
        self.mac = mac
        self.name = name  # the namespace's interface it stands for (for messages)


# -- the plan (at prepare, before anything is made) -----------------------------------------------------------


def netns_path(config: dict[str, Any]) -> str:
    """The config's network namespace path ("" for a new one); host networking is refused."""
    for ns in config.get("linux", {}).get("namespaces", []):
        if ns.get("type") == "network":
            return str(ns.get("path") or "")
    raise InvalidArgument("a vm container cannot use the host's network (no network namespace in "
                          "linux.namespaces): give it one, or --network none")


def plan(config: dict[str, Any]) -> dict[str, Any]:
    """What attach() will make: the namespace's Ethernet interfaces, each with a tap name of ours (a container
    that joins its pod's VM records one too and never attaches it; detach() then finds nothing of its own)."""
    path = netns_path(config)
    cookie = secrets.token_hex(4)
    doc: dict[str, Any] = {"netns": path, "cookie": cookie, "links": []}
    if not path:
        return doc
    if not os.path.exists(path):
        raise InvalidArgument(f"network namespace {path} does not exist")
    with in_netns(path):
        for i, link in enumerate(_ethernet_links()):
            doc["links"].append({"name": link["ifname"], "tap": f"tap{i}_{cookie[:6]}"})
    return doc


# -- attach (in the VM's keeper, before QEMU starts) -------------------------------------------------------------


def attach(doc: dict[str, Any]) -> tuple[list[Nic], list[dict[str, Any]], list[dict[str, Any]]]:
    """Make the taps and redirects of ``doc`` (from plan()): (NICs for QEMU, Kata Interfaces, Kata Routes).
    The guest's lo is up from its boot (clave.vm.guest's stage 2): nothing to ask for it."""
    path = doc.get("netns", "")
    if not path:
        return [], [], []
    nics: list[Nic] = []
    interfaces: list[dict[str, Any]] = []
    try:
        with in_netns(path):
            for entry in doc.get("links", []):
                name, tap = entry["name"], entry["tap"]
                link = _link(name)
                if any(q.get("kind") == "ingress" for q in _json([TC, "-j", "qdisc", "show", "dev", name])):
                    raise NetworkError(f"interface {name} of network namespace {path} already has an ingress qdisc "
                                       "(another VM takes its traffic): one VM per network namespace")
                fd = _open_tap(tap)
                nics.append(Nic(fd, link["address"], name))
                mtu = int(link.get("mtu") or 1500)
                _run([IP, "link", "set", "dev", tap, "mtu", str(mtu), "up"])
                _run([IP, "link", "set", "dev", name, "up"])
                _redirect(name, tap, doc["cookie"])
                _redirect(tap, name, doc["cookie"])
                interfaces.append({"name": name, "hwAddr": link["address"], "mtu": mtu,
                                   "IPAddresses": _addresses(name)})
            routes = _routes({e["name"] for e in doc.get("links", [])})
    except BaseException:
        for nic in nics:
            os.close(nic.fd)
        raise
    return nics, interfaces, routes


def configure_guest(agent: AgentClient, interfaces: list[dict[str, Any]], routes: list[dict[str, Any]]) -> None:
    """Give the guest's NICs the namespace's names, MTUs and addresses, then its routes (Kata's agent calls)."""
    from clave.proto.generated import clave_agent_v1 as pb

    for iface in interfaces:
        request = pb.UpdateInterfaceRequest(interface=pb.Interface(
            name=iface["name"], hwAddr=iface["hwAddr"], mtu=iface["mtu"],
            IPAddresses=[pb.IPAddress(family=a["family"], address=a["address"], mask=a["mask"])
                         for a in iface["IPAddresses"]]))
        _forward(agent, "UpdateInterface", request.encode())
    if routes:
        request_routes = pb.UpdateRoutesRequest(routes=pb.Routes(Routes=[
            pb.Route(dest=r["dest"], gateway=r["gateway"], device=r["device"], source=r["source"],
                     scope=r["scope"], family=r["family"]) for r in routes]))
        _forward(agent, "UpdateRoutes", request_routes.encode())


def _forward(agent: AgentClient, method: str, payload: bytes) -> None:
    from clave.ttrpc import TtrpcError
    from clave.vm.client import AGENT, DEFAULT_TIMEOUT

    try:
        agent.forward(AGENT, method, payload, DEFAULT_TIMEOUT)
    except TtrpcError as exc:
        raise AgentError(f"agent {method}: {exc.message}", exc.code) from None


# -- detach (delete, delete --force, a failed create) -------------------------------------------------------------


def detach(doc: dict[str, Any] | None) -> None:
    """Remove the redirects and taps ``doc`` recorded. Idempotent; a namespace that is gone took them along."""
    if not doc or not doc.get("netns") or not doc.get("links"):
        return
    path = doc["netns"]
    if not os.path.exists(path):
        return  # the namespace is gone, and what was in it
    with in_netns(path):
        for entry in doc["links"]:
            name, tap = entry["name"], entry["tap"]
            if _link_exists(name) and _ours(name, doc["cookie"]):
                _run([TC, "qdisc", "del", "dev", name, "ingress"])
            if _link_exists(tap):
                _run([IP, "link", "del", "dev", tap])


def _ours(dev: str, cookie: str) -> bool:
    for flt in _json([TC, "-j", "filter", "show", "dev", dev, "ingress"]):
        for action in (flt.get("options") or {}).get("actions", []):
            if action.get("cookie") == cookie:
                return True
    return False


# -- inside the namespace -----------------------------------------------------------------------------------------


@contextlib.contextmanager
def in_netns(path: str) -> Iterator[None]:
    """Run this thread (and the commands it starts) in the network namespace at ``path``, then come back."""
    from clave.linux import sys as lsys

    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise NetworkError(f"network namespace {path}: {exc.strerror or exc}") from None
        try:
            lsys.setns(target, CLONE_NEWNET)
        except OSError as exc:
            raise NetworkError(f"network namespace {path}: {exc.strerror or exc}") from None
        finally:
            os.close(target)
        try:
            yield
        finally:
            lsys.setns(own, CLONE_NEWNET)
    finally:
        os.close(own)


def _open_tap(name: str) -> int:
    """A new tap device ``name`` in this thread's namespace; it lasts while an fd of it is open (QEMU's, or
    the keeper's) or until detach() deletes it."""
    fd = os.open(TUN, os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
    except OSError as exc:
        os.close(fd)
        raise NetworkError(f"tap {name}: {exc.strerror or exc}") from None
    return fd


def _redirect(src: str, dst: str, cookie: str) -> None:
    """Every frame arriving on ``src`` leaves through ``dst`` (Kata's tcfilter)."""
    _run([TC, "qdisc", "add", "dev", src, "ingress"])
    _run([TC, "filter", "add", "dev", src, "parent", "ffff:", "protocol", "all", "u32", "match", "u8", "0", "0",
          "action", "mirred", "egress", "redirect", "dev", dst, "cookie", cookie])


def _ethernet_links() -> list[dict[str, Any]]:
    """This namespace's Ethernet interfaces, in index order, without lo and without taps (ours or others')."""
    links = _json([IP, "-j", "-d", "link", "show"])
    return [link for link in links if link.get("link_type") == "ether"
            and (link.get("linkinfo") or {}).get("info_kind") != "tun"]


def _link(name: str) -> dict[str, Any]:
    links = _json([IP, "-j", "link", "show", "dev", name])
    if not links:
        raise NetworkError(f"interface {name} is gone from its network namespace")
    return links[0]


def _link_exists(name: str) -> bool:
    # not /sys/class/net: sysfs shows the namespace it was mounted in, not this thread's
    return subprocess.run([IP, "link", "show", "dev", name], capture_output=True).returncode == 0


def _addresses(name: str) -> list[dict[str, Any]]:
    """The interface's addresses as Kata's IPAddress (IPv6 link-local ones left out: the guest makes its own,
    the same, from the same MAC)."""
    out = []
    for link in _json([IP, "-j", "addr", "show", "dev", name]):
        for a in link.get("addr_info", []):
            v6 = a.get("family") == "inet6"
            if v6 and a.get("scope") == "link":
                continue
            out.append({"family": FAMILY_V6 if v6 else FAMILY_V4, "address": a["local"],
                        "mask": str(a["prefixlen"])})
    return out


def _routes(devices: set[str]) -> list[dict[str, Any]]:
    """The main table's routes through ``devices`` as Kata's Route, on-link ones first (a gateway must be
    reachable when its route is added); the kernel's own (connected, link-local) are left to the guest."""
    routes = []
    for family, flag in ((FAMILY_V4, "-4"), (FAMILY_V6, "-6")):
        for r in _json([IP, "-j", flag, "route", "show", "table", "main"]):
            dst = r.get("dst", "")
            if (r.get("dev") not in devices or r.get("protocol") == "kernel" or r.get("type", "unicast") != "unicast"
                    or dst.startswith(("fe80:", "ff00:"))):
                continue
            routes.append({"dest": dst, "gateway": r.get("gateway", ""), "device": r["dev"],
                           "source": r.get("prefsrc", ""), "scope": SCOPES.get(r.get("scope", "global"), 0),
                           "family": family})
    return sorted(routes, key=lambda r: bool(r["gateway"]))


def _json(args: list[str]) -> list[dict[str, Any]]:
    out = _run(args)
    try:
        doc = json.loads(out or "[]")
    except ValueError:
        raise NetworkError(f"{' '.join(args[:4])}: unreadable output") from None
    return doc if isinstance(doc, list) else []


def _run(args: list[str]) -> str:
    try:
        done = subprocess.run(args, capture_output=True, text=True)
    except FileNotFoundError:
        raise NetworkError(f"{args[0]} not found: install Debian's iproute2") from None
    if done.returncode != 0:
        raise NetworkError(f"{' '.join(args)}: {done.stderr.strip() or f'exit status {done.returncode}'}")
    return done.stdout
