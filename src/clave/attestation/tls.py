"""Attested TLS: ssl sockets whose peer proved, with fresh TEE evidence, what it runs.

rats-tls certificates carry no per-session nonce, so a recorded certificate could be replayed by anyone
holding its key. Clave adds a tiny exchange before the TLS handshake in which each verifier sends a fresh
nonce; the attesting side then issues an RA-TLS certificate (see :mod:`clave.attestation.ratls`) whose claims
carry that nonce, and the verifier checks it. Wire format, all on the plain TCP stream::

    client -> server   hello  (38 bytes)  b"CLAT" | version u8 = 1 | flags u8 | client nonce (32 bytes)
                                          flags bit 0: the client can attest itself (mutual possible)
    server -> client   reply  (38 bytes)  b"CLAT" | version u8 = 1 | flags u8 | server nonce (32 bytes)
                                          flags bit 0: the server requires client attestation; the server
                                          nonce is all zero otherwise
    mutual only:
    client -> server   length u32 big-endian | DER of the client's RA-TLS certificate, bound to the
                       server nonce
    then an ordinary TLS (1.2+) handshake:
      the server presents a fresh RA-TLS certificate bound to the client nonce; the client verifies it after
      the handshake (evidence, key binding, nonce, policy) before any application data;
      in mutual mode the server has appraised the announced client certificate before the handshake and
      then requires the client to present exactly that certificate, so TLS proves possession of its key.

The client certificate travels in the clear in mutual mode (TLS 1.3 would encrypt it): its evidence is
visible to on-path observers. A peer that fails appraisal is disconnected.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

from clave.attestation import ratls, registry
from clave.attestation.base import Attester, VerifyContext
from clave.attestation.policy import DEFAULT_POLICY, Policy

MAGIC = b"CLAT"
VERSION = 1
NONCE_SIZE = 32
HELLO = struct.Struct(f"!4sBB{NONCE_SIZE}s")
FLAG_ATTEST = 0x01  # hello: the client can attest; reply: the server requires it
MAX_CERT_SIZE = 1 << 20


class AttestedTLSError(ConnectionError):
    """The peer broke the attested-TLS protocol (not an attestation verdict: those are VerificationError)."""


def recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(size - len(chunks))
        if not chunk:
            raise AttestedTLSError(f"peer closed the connection after {len(chunks)} of {size} bytes")
        chunks += chunk
    return bytes(chunks)


def _no_delay(sock: socket.socket) -> None:
    """The pre-handshake messages are small writes followed by more writes: without TCP_NODELAY, Nagle's
    algorithm meets the peer's delayed ACK and each connection stalls about 40 ms."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def send_hello(sock: socket.socket, flags: int, nonce: bytes) -> None:
    """Send a hello (client) or reply (server): same layout both ways."""
    sock.sendall(HELLO.pack(MAGIC, VERSION, flags, nonce))


def read_hello(sock: socket.socket) -> tuple[int, bytes]:
    magic, version, flags, nonce = HELLO.unpack(recv_exact(sock, HELLO.size))
    if magic != MAGIC:
        raise AttestedTLSError("peer does not speak Clave attested TLS (bad magic)")
    if version != VERSION:
        raise AttestedTLSError(f"unsupported attested TLS version {version}")
    return flags, nonce


def _load_identity(context: ssl.SSLContext, identity: ratls.AttestedCertificate) -> None:
    """ssl loads certificates only from files: use an anonymous memory file where Linux has one."""
    pem = identity.cert_pem() + identity.key_pem()
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("clave-ratls", os.MFD_CLOEXEC)
        try:
            with open(fd, "wb", closefd=False) as f:
                f.write(pem)
            context.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory() as tmp:  # private (0700) directory, removed at once
        path = os.path.join(tmp, "identity.pem")
        with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as f:
            f.write(pem)
        context.load_cert_chain(path)


def server_context(
    identity: ratls.AttestedCertificate, client_cert_der: bytes | None = None
) -> ssl.SSLContext:
    """A server SSLContext presenting ``identity``; with ``client_cert_der``, requiring that exact peer."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_identity(context, identity)
    if client_cert_der is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cadata=client_cert_der)  # the self-signed cert is its own anchor
    return context


def client_context(identity: ratls.AttestedCertificate | None = None) -> ssl.SSLContext:
    """A client SSLContext that leaves the server certificate to RA-TLS verification."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # no PKI: the certificate is judged by its evidence below
    if identity is not None:
        _load_identity(context, identity)
    return context


@dataclass
class AttestedConnection:
    """A server-side connection: the TLS socket and, in mutual mode, what the client proved."""

    socket: ssl.SSLSocket
    peer: ratls.AttestedPeer | None


class AttestedServer:
    """Wraps accepted sockets in TLS with a fresh RA-TLS certificate bound to each client's nonce.

    ``attester`` defaults to the best one available on this host. With ``require_client_attestation``,
    clients must present their own RA-TLS certificate, appraised against ``client_policy``.
    """

    def __init__(
        self,
        attester: Attester | None = None,
        *,
        require_client_attestation: bool = False,
        client_policy: Policy = DEFAULT_POLICY,
        verify_context: Callable[[], VerifyContext] = VerifyContext,
        handshake_timeout: float = 30.0,
    ) -> None:
        self.attester = attester or registry.attester()
        self.require_client_attestation = require_client_attestation
        self.client_policy = client_policy
        self.verify_context = verify_context
        self.handshake_timeout = handshake_timeout
        self.key = ratls.generate_key()  # one key per server; each connection gets a fresh certificate

    def wrap_socket(self, sock: socket.socket) -> AttestedConnection:
        """Run the attested handshake on an accepted socket; closes it and raises on failure."""
        previous_timeout = sock.gettimeout()
        sock.settimeout(self.handshake_timeout)
        _no_delay(sock)
        try:
            flags, client_nonce = read_hello(sock)
            server_nonce = os.urandom(NONCE_SIZE) if self.require_client_attestation else bytes(NONCE_SIZE)
            send_hello(sock, FLAG_ATTEST if self.require_client_attestation else 0, server_nonce)
            client_peer = client_der = None
            if self.require_client_attestation:
                if not flags & FLAG_ATTEST:
                    raise AttestedTLSError("client cannot attest itself and this server requires it")
                (size,) = struct.unpack("!I", recv_exact(sock, 4))
                if not 0 < size <= MAX_CERT_SIZE:
                    raise AttestedTLSError(f"client certificate size {size} out of range")
                client_der = recv_exact(sock, size)
                client_peer = ratls.verify_certificate(
                    client_der, policy=self.client_policy, nonce=server_nonce, ctx=self.verify_context()
                )
            identity = ratls.create_certificate(self.attester, nonce=client_nonce, key=self.key)
            tls = server_context(identity, client_der).wrap_socket(sock, server_side=True)
        except BaseException:
            sock.close()
            raise
        try:
            if client_der is not None and tls.getpeercert(binary_form=True) != client_der:
                raise AttestedTLSError("client presented a different certificate than it announced")
            tls.settimeout(previous_timeout)
        except BaseException:
            tls.close()
            raise
        return AttestedConnection(tls, client_peer)

    def accept(self, listener: socket.socket) -> tuple[AttestedConnection, object]:
        sock, address = listener.accept()
        return self.wrap_socket(sock), address


def wrap_client(
    sock: socket.socket,
    policy: Policy = DEFAULT_POLICY,
    *,
    attester: Attester | None = None,
    ctx: VerifyContext | None = None,
    server_hostname: str | None = None,
    timeout: float = 30.0,
) -> tuple[ssl.SSLSocket, ratls.AttestedPeer]:
    """Run the attested handshake on a connected socket; return the TLS socket and the server's verified
    attestation. ``attester`` lets this client attest itself when the server asks (mutual attestation).
    Raises VerificationError (naming the layer) when the server's evidence is not acceptable; the socket is
    closed then."""
    previous_timeout = sock.gettimeout()
    sock.settimeout(timeout)
    _no_delay(sock)
    nonce = os.urandom(NONCE_SIZE)
    try:
        send_hello(sock, FLAG_ATTEST if attester is not None else 0, nonce)
        flags, server_nonce = read_hello(sock)
        identity = None
        if flags & FLAG_ATTEST:
            if attester is None:
                raise AttestedTLSError("server requires client attestation: pass an attester")
            identity = ratls.create_certificate(attester, nonce=server_nonce)
            sock.sendall(struct.pack("!I", len(identity.der)) + identity.der)
        tls = client_context(identity).wrap_socket(sock, server_hostname=server_hostname)
    except BaseException:
        sock.close()
        raise
    try:
        server_der = tls.getpeercert(binary_form=True)
        if server_der is None:
            raise AttestedTLSError("server presented no certificate")
        peer = ratls.verify_certificate(server_der, policy=policy, nonce=nonce, ctx=ctx)
        tls.settimeout(previous_timeout)
    except BaseException:
        with contextlib.suppress(OSError):
            tls.close()
        raise
    return tls, peer


def connect(
    address: tuple[str, int],
    policy: Policy = DEFAULT_POLICY,
    *,
    attester: Attester | None = None,
    ctx: VerifyContext | None = None,
    timeout: float = 30.0,
) -> tuple[ssl.SSLSocket, ratls.AttestedPeer]:
    """Open a TCP connection to ``address`` and run :func:`wrap_client` on it."""
    sock = socket.create_connection(address, timeout=timeout)
    return wrap_client(sock, policy, attester=attester, ctx=ctx, server_hostname=address[0], timeout=timeout)
