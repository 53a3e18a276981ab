"""The relay: answers verifiers over attested TLS with evidence from the node's enclave containers.

The relay is untrusted for the container's verdict: it only carries the verifier's nonce to the container's
enclave runtime and the evidence back. What the evidence's report data binds is defined in
:mod:`clave.relay.protocol`; the verifier (:mod:`clave.relay.client`) checks it end to end.
"""

from __future__ import annotations

import base64
import contextlib
import glob
import logging
import os
import socket
import threading
from typing import Any, Protocol

from clave.attestation import ratls
from clave.attestation.base import Attester
from clave.attestation.tls import AttestedServer
from clave.engine.state import DEFAULT_ROOT
from clave.errors import ClaveError
from clave.relay import protocol
from clave.relay.protocol import ProtocolError
from clave.shim.main import STATE_ROOT as SHIM_STATE_ROOT

# The CLI's root, and one root per containerd namespace for containers run through the shim.
DEFAULT_ROOTS = (DEFAULT_ROOT, f"{SHIM_STATE_ROOT}/*")  # the CLI's and every namespace of the shim's
REQUEST_TIMEOUT = 30.0
MAX_CONNECTIONS = 64  # served at once; more are closed at once rather than queued behind slow peers

log = logging.getLogger("clave.relay")


class RelayError(Exception):
    """A request the relay cannot serve (no such container, not an enclave...); one line for the verifier."""


class EvidenceSource(Protocol):
    """Where the relay gets container evidence: the node's container engine, in production."""

    def attest(self, container_id: str, report_data: bytes) -> dict[str, Any]:
        """``{"tee", "insecure", "measurement": {"mrenclave", "mrsigner"}, "evidence": base64}`` from the
        container's own enclave runtime, with ``report_data`` bound."""
        ...

    def running_enclaves(self) -> list[str]:
        """Ids of the running enclave containers on this node."""
        ...

    def platform_public_key(self) -> bytes | None:
        """PEM of the wasm host platform's public key, when this node has one."""
        ...


class EngineEvidence:
    """Evidence from Clave's container engine, looking the container up in each state root in turn."""

    def __init__(self, roots: list[str] | tuple[str, ...] = DEFAULT_ROOTS) -> None:
        self.roots = tuple(roots)

    def _expanded_roots(self) -> list[str]:
        """Patterns are expanded per request, so that containerd namespaces created later are found."""
        found: list[str] = []
        for root in self.roots:
            found += sorted(glob.glob(root)) if glob.has_magic(root) else [root]
        return found

    def _engine_for(self, container_id: str) -> Any:
        from clave.engine import state
        from clave.engine.container import Engine

        state.validate_id(container_id)
        for root in self._expanded_roots():
            if os.path.isfile(os.path.join(root, container_id, state.STATE_FILE)):
                return Engine(root)
        raise RelayError(f"no container {container_id} on this node")

    def attest(self, container_id: str, report_data: bytes) -> dict[str, Any]:
        return dict(self._engine_for(container_id).attest(container_id, report_data))

    def running_enclaves(self) -> list[str]:
        from clave.engine.container import Engine

        ids: list[str] = []
        for root in self._expanded_roots():
            for doc in Engine(root).list_states():
                if doc.get("enclave") and doc.get("status") == "running":
                    ids.append(doc["id"])
        return ids

    def platform_public_key(self) -> bytes | None:
        from clave.attestation import wasm_report as report

        path = report.platform_key_path()
        if not os.path.isfile(path):  # never create one here: load_platform_key would
            return None
        pem: bytes = report.platform_public_pem(report.load_platform_key(path))
        return pem


class Relay:
    """Serves GETENCLAVEINFO and GETEVIDENCE over attested TLS; one request per connection."""

    def __init__(self, source: EvidenceSource, attester: Attester | None = None,
                 handshake_timeout: float = REQUEST_TIMEOUT) -> None:
        self.source = source
        self.tls = AttestedServer(attester, handshake_timeout=handshake_timeout)
        # Every connection gets a fresh certificate, but over this one key: it names the relay's sessions.
        self.key_hash = protocol.relay_key_hash(ratls.spki_der(self.tls.key))
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    # ------------------------------------------------------------------ requests
    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        """One request -> one reply; failures become an ERROR reply."""
        kind = request.get("type")
        try:
            if kind == protocol.GET_ENCLAVE_INFO:
                return self._enclave_info(request)
            if kind == protocol.GET_EVIDENCE:
                return self._evidence(request)
            raise ProtocolError(f"unknown request type {kind!r}: use {protocol.GET_ENCLAVE_INFO} or "
                                f"{protocol.GET_EVIDENCE}")
        except (RelayError, ProtocolError, ClaveError) as exc:
            return protocol.error_reply(str(exc))

    def _container(self, request: dict[str, Any]) -> str:
        container = request.get("container")
        if container is not None:
            if not isinstance(container, str):
                raise ProtocolError("container must be a string")
            return container
        running = self.source.running_enclaves()
        if len(running) != 1:
            which = ", ".join(running) if running else "none running"
            raise RelayError(f"name the container: this node runs {len(running)} enclave containers ({which})")
        return running[0]

    def _enclave_info(self, request: dict[str, Any]) -> dict[str, Any]:
        container = self._container(request)
        reply = self.source.attest(container, bytes(protocol.REPORT_DATA_SIZE))
        measurement = reply.get("measurement") or {}
        insecure = " (INSECURE: software isolation, no TEE hardware)" if reply.get("insecure") else ""
        return {
            "id": protocol.new_message_id(),
            "msgtype": protocol.ENCLAVE_INFO,
            "version": protocol.VERSION,
            "mrenclave": str(measurement.get("mrenclave", "")).lower(),
            "mrsigner": str(measurement.get("mrsigner", "")).lower(),
            "message": f"clave-relay: container {container}, {reply.get('tee')} enclave{insecure}",
        }

    def _evidence(self, request: dict[str, Any]) -> dict[str, Any]:
        version = request.get("version", protocol.VERSION)
        if version != protocol.VERSION:
            raise ProtocolError(f"unsupported request version {version!r}; this relay speaks {protocol.VERSION}")
        container = request.get("container")
        if not isinstance(container, str) or not container:
            raise ProtocolError(f"{protocol.GET_EVIDENCE} needs a container id")
        nonce = protocol.parse_nonce(request.get("nonce"))
        report_data = protocol.container_report_data(nonce, self.key_hash, container)
        return self.evidence_reply(container, report_data)

    def evidence_reply(self, container: str, report_data: bytes) -> dict[str, Any]:
        """The EVIDENCE reply for ``container`` with ``report_data`` bound in its evidence."""
        reply = self.source.attest(container, report_data)
        evidence = reply.get("evidence")
        if not isinstance(evidence, str):
            raise RelayError(f"container {container}'s runtime returned no evidence")
        try:
            base64.b64decode(evidence, validate=True)  # the runtime's reply is passed on only if well formed
        except ValueError:
            raise RelayError(f"container {container}'s runtime returned evidence that is not base64") from None
        measurement = reply.get("measurement") or {}
        platform_key = self.source.platform_public_key() if reply.get("tee") == "wasm" else None
        return {
            "id": protocol.new_message_id(),
            "msgtype": protocol.EVIDENCE,
            "version": protocol.VERSION,
            "container": container,
            "tee": reply.get("tee"),
            "insecure": bool(reply.get("insecure")),
            "mrenclave": measurement.get("mrenclave"),
            "mrsigner": measurement.get("mrsigner"),
            "report_data": report_data.hex(),
            "evidence": evidence,
            "platform_key": platform_key.decode() if platform_key else None,
        }

    # ------------------------------------------------------------------ connections
    def serve_connection(self, sock: socket.socket, peer: object) -> None:
        try:
            self._serve_connection(sock, peer)
        finally:
            self.slots.release()

    def _serve_connection(self, sock: socket.socket, peer: object) -> None:
        try:
            conn = self.tls.wrap_socket(sock)
        except Exception as exc:  # a failed handshake costs only this connection
            log.warning("%s: attested TLS handshake failed: %s", peer, exc)
            return
        tls = conn.socket
        request: dict[str, Any] = {}
        try:
            tls.settimeout(REQUEST_TIMEOUT)
            try:
                request = protocol.read_message(tls.recv, protocol.MAX_REQUEST)
                reply = self.handle(request)
            except ProtocolError as exc:
                reply = protocol.error_reply(str(exc))
            log.info("%s: %s %s -> %s", peer, request.get("type", "?"), request.get("container", ""),
                     reply["msgtype"])
            tls.sendall(protocol.encode(reply))
        except (OSError, ValueError) as exc:
            log.warning("%s: %s", peer, exc)
        except Exception:
            log.exception("%s: request failed", peer)
        finally:
            with contextlib.suppress(OSError):
                tls.close()

    def serve_forever(self, listener: socket.socket, stop: threading.Event) -> None:
        """Accept until ``stop`` is set; each connection is served in its own thread."""
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                sock, peer = listener.accept()
            except TimeoutError:
                continue
            if not self.slots.acquire(blocking=False):
                log.warning("%s: refused, %d connections in service", peer, MAX_CONNECTIONS)
                sock.close()
                continue
            sock.settimeout(None)
            threading.Thread(target=self.serve_connection, args=(sock, peer), daemon=True,
                             name=f"relay-{peer}").start()


def listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
        listener.listen(64)
    except OSError:
        listener.close()
        raise
    return listener
