"""A vm pod's key broker resources, fetched by its guest (Confidential Containers' model: the attestation agent
is in the guest, and only the guest's evidence can release a secret to it).

The guest has no route to the broker of its own (no NIC, or a pod network that does not reach it), so the host
carries the guest's one TCP connection as bytes over the agent's ``FetchResources`` stream: the guest speaks TLS
to the broker end to end (the host sees ciphertext), attests with its TPM quote bound to the broker's nonce and
an ephemeral key, decrypts the released JWE and writes each secret into the created container (on a tmpfs of
it, mode 0400, the process user's). Settings are the enclave containers' (clave.enclave.provision), read from
the annotations: ``enclave.kbs.url``, ``enclave.kbs.resources`` (``repo/type/tag=/path,...``) and
``enclave.kbs.ca`` (a host path).
"""

from __future__ import annotations

import json
import socket
import threading
import urllib.parse

from clave.proto.generated import clave_agent_v1 as pb
from clave.ttrpc import TtrpcError
from clave.vm.errors import VmError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from clave.vm.client import AgentClient

URL, RESOURCES, CA = "enclave.kbs.url", "enclave.kbs.resources", "enclave.kbs.ca"
MAX_CA_FILE = 1 << 20


class KbsRefused(VmError):
    """The broker did not release a resource to the guest (or the guest could not ask it): the pod does not
    start."""


def wanted(annotations: dict[str, str]) -> bool:
    return bool(annotations.get(RESOURCES))


def job(container_id: str, annotations: dict[str, str], process: dict[str, Any]) -> dict[str, Any]:
    """What the guest needs, checked on the host first: one line for a malformed setting."""
    url = annotations.get(URL, "")
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme != "https" or not parsed.hostname:
        raise KbsRefused(f"{URL} {url!r} must be https://host[:port] ({RESOURCES} needs it)")
    resources = []
    for item in annotations.get(RESOURCES, "").split(","):
        resource, sep, path = item.strip().partition("=")
        if not sep or not path.startswith("/") or resource.count("/") != 2:
            raise KbsRefused(f"{RESOURCES}: {item.strip()!r} is not repo/type/tag=/absolute/path")
        resources.append([resource, path])
    ca_pem = None
    if annotations.get(CA):
        try:
            with open(annotations[CA], "rb") as f:
                ca_pem = f.read(MAX_CA_FILE + 1).decode()
        except (OSError, UnicodeDecodeError) as exc:
            raise KbsRefused(f"{CA} {annotations[CA]}: {getattr(exc, 'strerror', None) or exc}") from None
    user = process.get("user", {})
    return {"container_id": container_id, "url": url, "resources": resources, "ca_pem": ca_pem,
            "uid": int(user.get("uid", 0)), "gid": int(user.get("gid", 0))}


def fetch(agent: AgentClient, job: dict[str, Any], timeout: float = 120.0) -> None:
    """Run the guest's fetch, carrying its connection to the broker; raises KbsRefused with the guest's reason."""
    parsed = urllib.parse.urlsplit(job["url"])
    try:
        broker = socket.create_connection((parsed.hostname, parsed.port or 443), timeout=timeout)
    except OSError as exc:
        raise KbsRefused(f"key broker {job['url']} unreachable from this host: {exc.strerror or exc}") from None
    stream = agent.forward_stream(pb.AgentServiceService.NAME, "FetchResources",
                                  pb.IORequest(data=json.dumps(job).encode()).encode())

    def from_broker() -> None:
        try:
            while data := broker.recv(65536):
                stream.send(pb.IORequest(data=data).encode())
        except OSError:
            pass
        finally:
            try:
                stream.close_send()
            except Exception:  # noqa: BLE001  # the stream already ended
                pass

    threading.Thread(target=from_broker, name="kbs-tunnel", daemon=True).start()
    result: dict[str, Any] = {"ok": False, "error": "the guest ended the fetch without a result"}
    try:
        for payload in stream:
            chunk = pb.IOChunk.decode(payload)
            if chunk.fd == 1:
                broker.sendall(chunk.data)
            elif chunk.fd == 2:
                result = json.loads(chunk.data)
    except OSError as exc:
        result = {"ok": False, "error": f"key broker connection: {exc.strerror or exc}"}
    except TtrpcError as exc:
        result = {"ok": False, "error": f"the guest's fetch: {exc.message}"}
    finally:
        broker.close()
    if not result.get("ok"):
        raise KbsRefused(f"kbs: {result.get('error')}")


__all__ = ["KbsRefused", "fetch", "job", "wanted"]
