"""TPM 2.0 attester: real quotes from a TPM, spoken to directly in the TPM 2.0 command protocol.

Which TPM: ``CLAVE_TPM_TCTI`` when set, either ``swtpm:host=127.0.0.1,port=2321`` (swtpm's TCP server channel,
raw TPM commands) or ``device:/dev/tpmrm0``; otherwise the kernel resource manager ``/dev/tpmrm0``.

The attestation key (AK) is a restricted signing key (ECC P-256/ECDSA-SHA256 by default; RSA-2048 with
RSASSA or RSA-PSS on request) created under a storage primary key (ECC P-256, the TCG SRK template) in the
owner hierarchy. The primary key is re-derived from the TPM's seed on each use; the AK's wrapped private and
public blobs are kept in a state directory (``CLAVE_TPM_STATE``, default ``/var/lib/clave/tpm``) as
``ak-<type>.priv`` / ``ak-<type>.pub`` (TPM2B-marshalled, loadable by ``tpm2_load``) and reused; when they no
longer load (the TPM was cleared or replaced) a new AK is created.

``attest(report_data)`` quotes PCRs 0-7 of the SHA-256 bank with ``qualifying_data(report_data)`` as the
quote's qualifying data: report data up to 32 bytes as is, longer report data replaced by its SHA-256 (TPMs
cap qualifying data at their largest digest size). It returns Clave TPM evidence (see
``clave.attestation.verifiers.tpm``). Evidence from swtpm is marked insecure: it is a software TPM.
No EK certificate or AK certificate is attached: the AK is not endorsed (the verifier says so).
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from clave.attestation import tpm_wire as wire
from clave.attestation.base import Attester, AttesterUnavailable, Evidence

DEFAULT_DEVICE = "/dev/tpmrm0"
DEFAULT_STATE_DIR = "/var/lib/clave/tpm"
QUOTED_PCRS = wire.PcrSelection(wire.ALG_SHA256, tuple(range(8)))

_ST_NO_SESSIONS = 0x8001
_ST_SESSIONS = 0x8002
_RH_OWNER = 0x40000001
_RS_PW = 0x40000009
# Empty-password authorization: handle, empty nonce, continueSession, empty HMAC.
_PASSWORD_AUTH = struct.pack(">IHBH", _RS_PW, 0, 0x01, 0)
_CC_CREATE_PRIMARY = 0x131
_CC_CREATE = 0x153
_CC_LOAD = 0x157
_CC_QUOTE = 0x158
_CC_FLUSH_CONTEXT = 0x165
_CC_PCR_READ = 0x17E
_RC_WARN_RETRY = {0x908, 0x90A, 0x922}  # TPM_RC_YIELDED, TPM_RC_TESTING, TPM_RC_RETRY
_COMMAND_NAMES = {_CC_CREATE_PRIMARY: "TPM2_CreatePrimary", _CC_CREATE: "TPM2_Create", _CC_LOAD: "TPM2_Load",
                  _CC_QUOTE: "TPM2_Quote", _CC_FLUSH_CONTEXT: "TPM2_FlushContext", _CC_PCR_READ: "TPM2_PCR_Read"}
# Response codes worth explaining: format-1 errors by their low 6 bits, warnings by full value.
_FORMAT1_MEANINGS = {0x0E: "authorization failed", 0x1F: "integrity check failed (blob from another TPM?)",
                     0x22: "wrong authorization value (is an owner hierarchy password set?)"}
_WARNING_MEANINGS = {0x902: "out of memory for objects", 0x921: "dictionary-attack lockout"}


def _describe_rc(rc: int) -> str:
    meaning = _FORMAT1_MEANINGS.get(rc & 0x3F) if rc & 0x80 else _WARNING_MEANINGS.get(rc)
    return f"0x{rc:03x}" + (f" ({meaning})" if meaning else "")

_KEY_ATTRS = (wire.ATTR_FIXED_TPM | wire.ATTR_FIXED_PARENT | wire.ATTR_SENSITIVE_DATA_ORIGIN
              | wire.ATTR_USER_WITH_AUTH | wire.ATTR_NO_DA)
SRK_TEMPLATE = wire.marshal_public(wire.ALG_ECC, _KEY_ATTRS | wire.ATTR_RESTRICTED | wire.ATTR_DECRYPT,
                                   symmetric=True)
AK_TEMPLATES = {
    "ecc": wire.marshal_public(wire.ALG_ECC, _KEY_ATTRS | wire.ATTR_RESTRICTED | wire.ATTR_SIGN,
                               scheme=wire.ALG_ECDSA),
    "rsassa": wire.marshal_public(wire.ALG_RSA, _KEY_ATTRS | wire.ATTR_RESTRICTED | wire.ATTR_SIGN,
                                  scheme=wire.ALG_RSASSA),
    "rsapss": wire.marshal_public(wire.ALG_RSA, _KEY_ATTRS | wire.ATTR_RESTRICTED | wire.ATTR_SIGN,
                                  scheme=wire.ALG_RSAPSS),
}


class TpmError(RuntimeError):
    """A TPM command failed or the TPM could not be reached."""


class _Transport(Protocol):
    def transact(self, command: bytes) -> bytes: ...

    def close(self) -> None: ...


class _SocketTransport:
    """swtpm's TCP server channel: raw TPM commands and responses."""

    def __init__(self, host: str, port: int, timeout: float = 60.0) -> None:
        try:
            self.sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise TpmError(f"cannot connect to swtpm at {host}:{port}: {exc.strerror or exc}") from None

    def _read(self, n: int) -> bytes:
        data = bytearray()
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise TpmError("swtpm closed the connection mid-response")
            data += chunk
        return bytes(data)

    def transact(self, command: bytes) -> bytes:
        self.sock.sendall(command)
        header = self._read(10)
        size = int.from_bytes(header[2:6], "big")
        return header + self._read(size - 10)

    def close(self) -> None:
        self.sock.close()


class _DeviceTransport:
    """A TPM character device: one write per command, one read per response."""

    def __init__(self, path: str) -> None:
        try:
            self.fd = os.open(path, os.O_RDWR)
        except OSError as exc:
            raise TpmError(f"cannot open {path}: {exc.strerror}") from None

    def transact(self, command: bytes) -> bytes:
        os.write(self.fd, command)
        return os.read(self.fd, 8192)

    def close(self) -> None:
        os.close(self.fd)


@dataclass(frozen=True)
class Tcti:
    """Where the TPM is: kind "swtpm" (host, port) or "device" (path)."""

    kind: str
    host: str = "127.0.0.1"
    port: int = 2321
    path: str = DEFAULT_DEVICE

    @classmethod
    def parse(cls, spec: str) -> Tcti:
        """``swtpm:host=H,port=P`` (either part optional) or ``device:/dev/tpmrm0``."""
        kind, _, conf = spec.partition(":")
        if kind == "device":
            return cls("device", path=conf or DEFAULT_DEVICE)
        if kind != "swtpm":
            raise ValueError(f"unsupported TCTI {spec!r}: use swtpm:host=H,port=P or device:PATH")
        options = dict(item.partition("=")[::2] for item in conf.split(",") if item)
        unknown = set(options) - {"host", "port"}
        if unknown:
            raise ValueError(f"unknown swtpm TCTI option(s) {sorted(unknown)} in {spec!r}")
        try:
            port = int(options.get("port", 2321))
        except ValueError:
            raise ValueError(f"bad port in TCTI {spec!r}") from None
        return cls("swtpm", host=options.get("host", "127.0.0.1"), port=port)

    def open(self) -> _Transport:
        if self.kind == "swtpm":
            return _SocketTransport(self.host, self.port)
        return _DeviceTransport(self.path)

    def __str__(self) -> str:
        return f"swtpm:host={self.host},port={self.port}" if self.kind == "swtpm" else f"device:{self.path}"


class TpmClient:
    """The handful of TPM 2.0 commands the attester needs, with empty-password authorization."""

    def __init__(self, transport: _Transport) -> None:
        self.transport = transport

    def _command(self, code: int, handles: tuple[int, ...] = (), params: bytes = b"", *, auth: bool = False,
                 response_handles: int = 0) -> tuple[list[int], bytes]:
        body = b"".join(struct.pack(">I", h) for h in handles)
        if auth:
            body += struct.pack(">I", len(_PASSWORD_AUTH)) + _PASSWORD_AUTH
        body += params
        tag = _ST_SESSIONS if auth else _ST_NO_SESSIONS
        command = struct.pack(">HII", tag, 10 + len(body), code) + body
        name = _COMMAND_NAMES.get(code, f"command 0x{code:x}")
        for _ in range(20):
            try:
                response = self.transport.transact(command)
            except OSError as exc:
                raise TpmError(f"{name}: TPM I/O failed: {exc.strerror or exc}") from None
            if len(response) < 10:
                raise TpmError(f"{name}: short response ({len(response)} bytes)")
            rc = int.from_bytes(response[6:10], "big")
            if rc not in _RC_WARN_RETRY:
                break
            time.sleep(0.05)
        if rc != 0:
            raise TpmError(f"{name} failed with response code {_describe_rc(rc)}")
        r = wire.Reader(response[10:], f"{name} response")
        out_handles = [r.u32() for _ in range(response_handles)]
        if auth:
            return out_handles, r.take(r.u32())
        return out_handles, response[10 + r.offset :]

    def create_primary(self, hierarchy: int, template: bytes) -> tuple[int, bytes]:
        """A primary key from ``template``: (transient handle, TPMT_PUBLIC)."""
        params = _EMPTY_SENSITIVE + _tpm2b(template) + _tpm2b(b"") + struct.pack(">I", 0)
        (handle,), out = self._command(_CC_CREATE_PRIMARY, (hierarchy,), params, auth=True,
                                       response_handles=1)
        return handle, wire.Reader(out, "TPM2_CreatePrimary response").tpm2b()

    def create(self, parent: int, template: bytes) -> tuple[bytes, bytes]:
        """A new key under ``parent``: (TPM2B_PRIVATE contents, TPMT_PUBLIC)."""
        params = _EMPTY_SENSITIVE + _tpm2b(template) + _tpm2b(b"") + struct.pack(">I", 0)
        _, out = self._command(_CC_CREATE, (parent,), params, auth=True)
        r = wire.Reader(out, "TPM2_Create response")
        return r.tpm2b(), r.tpm2b()

    def load(self, parent: int, private: bytes, public: bytes) -> int:
        (handle,), _ = self._command(_CC_LOAD, (parent,), _tpm2b(private) + _tpm2b(public), auth=True,
                                     response_handles=1)
        return handle

    def quote(self, key: int, qualifying: bytes, selection: wire.PcrSelection) -> tuple[bytes, bytes]:
        """TPM2_Quote with the key's own scheme: (TPMS_ATTEST, TPMT_SIGNATURE)."""
        in_scheme = struct.pack(">H", wire.ALG_NULL)  # the AK's own scheme
        params = _tpm2b(qualifying) + in_scheme + wire.marshal_pcr_selections([selection])
        _, out = self._command(_CC_QUOTE, (key,), params, auth=True)
        r = wire.Reader(out, "TPM2_Quote response")
        attest = r.tpm2b()
        return attest, out[r.offset :]

    def pcr_read(self, selection: wire.PcrSelection) -> dict[int, bytes]:
        """Values of the selected PCRs (several round trips when the TPM returns fewer than asked)."""
        values: dict[int, bytes] = {}
        remaining = list(selection.pcrs)
        while remaining:
            wanted = wire.PcrSelection(selection.hash_alg, tuple(remaining))
            _, out = self._command(_CC_PCR_READ, params=wire.marshal_pcr_selections([wanted]))
            r = wire.Reader(out, "TPM2_PCR_Read response")
            r.u32()  # pcrUpdateCounter
            returned = [pcr for sel in r.pcr_selections() for pcr in sel.pcrs]
            digests = [r.tpm2b() for _ in range(r.u32())]
            if not returned or len(returned) != len(digests):
                raise TpmError(f"TPM returned no values for PCRs {remaining} of bank {selection.bank}")
            values.update(zip(returned, digests, strict=True))
            remaining = [pcr for pcr in remaining if pcr not in values]
        return values

    def flush(self, handle: int) -> None:
        self._command(_CC_FLUSH_CONTEXT, params=struct.pack(">I", handle))


_EMPTY_SENSITIVE = struct.pack(">HHH", 4, 0, 0)  # TPM2B_SENSITIVE_CREATE: no auth value, no data


def _tpm2b(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


class TpmAttester(Attester):
    name = "tpm"
    tee = "tpm"
    priority = 40

    def __init__(self, tcti: str | None = None, state_dir: str | os.PathLike[str] | None = None,
                 ak_type: str = "ecc") -> None:
        if ak_type not in AK_TEMPLATES:
            raise ValueError(f"unknown AK type {ak_type!r}; choose one of {sorted(AK_TEMPLATES)}")
        self.tcti_spec = tcti if tcti is not None else os.environ.get("CLAVE_TPM_TCTI") or None
        self.state_dir = Path(state_dir or os.environ.get("CLAVE_TPM_STATE") or DEFAULT_STATE_DIR)
        self.ak_type = ak_type

    def _tcti(self) -> Tcti:
        if self.tcti_spec:
            try:
                return Tcti.parse(self.tcti_spec)
            except ValueError as exc:
                raise AttesterUnavailable(f"CLAVE_TPM_TCTI: {exc}") from None
        if os.path.exists(DEFAULT_DEVICE):
            return Tcti("device", path=DEFAULT_DEVICE)
        raise AttesterUnavailable(f"no TPM: {DEFAULT_DEVICE} is absent and CLAVE_TPM_TCTI is not set "
                                  "(e.g. CLAVE_TPM_TCTI=swtpm:host=127.0.0.1,port=2321)")

    def available(self) -> None:
        tcti = self._tcti()
        if tcti.kind == "device":
            if not os.path.exists(tcti.path):
                raise AttesterUnavailable(f"no TPM: {tcti.path} does not exist")
            if not os.access(tcti.path, os.R_OK | os.W_OK):
                raise AttesterUnavailable(f"no permission to use {tcti.path} "
                                          "(need read/write, e.g. membership of group tss)")
        else:
            try:
                socket.create_connection((tcti.host, tcti.port), timeout=2).close()
            except OSError as exc:
                raise AttesterUnavailable(f"swtpm at {tcti.host}:{tcti.port} is not reachable: "
                                          f"{exc.strerror or exc}") from None
        probe = self.state_dir if self.state_dir.exists() else _existing_parent(self.state_dir)
        if not os.access(probe, os.W_OK):
            raise AttesterUnavailable(f"TPM state directory {self.state_dir} is not writable "
                                      "(set CLAVE_TPM_STATE)")

    def attest(self, report_data: bytes) -> Evidence:
        tcti = self._tcti()
        qualifying = wire.qualifying_data(report_data)
        try:
            with _session(tcti) as tpm:
                ak_handle, ak_public = self._load_ak(tpm)
                try:
                    attest, signature, pcrs = _quote_consistently(tpm, ak_handle, qualifying)
                finally:
                    tpm.flush(ak_handle)
        except (TpmError, wire.WireError) as exc:
            raise TpmError(f"TPM quote via {tcti} failed: {exc}") from None
        evidence = wire.TpmEvidence(attest, signature, ak_public, {QUOTED_PCRS.bank: pcrs},
                                    event_log=_event_log(tcti))
        return Evidence(tee=self.tee, data=evidence.encode(), insecure=tcti.kind == "swtpm")

    def _load_ak(self, tpm: TpmClient) -> tuple[int, bytes]:
        """Load the saved AK under a freshly derived SRK, creating (and saving) one if needed."""
        private_path = self.state_dir / f"ak-{self.ak_type}.priv"
        public_path = self.state_dir / f"ak-{self.ak_type}.pub"
        srk, _ = tpm.create_primary(_RH_OWNER, SRK_TEMPLATE)
        try:
            if private_path.is_file() and public_path.is_file():
                with contextlib.suppress(TpmError, wire.WireError):  # stale or damaged blobs: make a new AK
                    public = _read_tpm2b(public_path)
                    return tpm.load(srk, _read_tpm2b(private_path), public), public
            private, public = tpm.create(srk, AK_TEMPLATES[self.ak_type])
            self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            _write_atomically(private_path, _tpm2b(private))
            _write_atomically(public_path, _tpm2b(public))
            return tpm.load(srk, private, public), public
        finally:
            tpm.flush(srk)


@contextlib.contextmanager
def _session(tcti: Tcti) -> Iterator[TpmClient]:
    transport = tcti.open()
    try:
        yield TpmClient(transport)
    finally:
        transport.close()


def _quote_consistently(tpm: TpmClient, ak_handle: int, qualifying: bytes
                        ) -> tuple[bytes, bytes, dict[int, bytes]]:
    """Quote, then read the PCRs; retry if a PCR was extended in between so values match the quote."""
    for _ in range(5):
        attest, signature = tpm.quote(ak_handle, qualifying, QUOTED_PCRS)
        pcrs = tpm.pcr_read(QUOTED_PCRS)
        quoted = wire.parse_quote_attest(attest)
        digest_alg = wire.hash_alg(wire.parse_signature(signature).hash_alg)
        values = {QUOTED_PCRS.hash_alg: pcrs}
        if wire.pcr_digest(digest_alg, quoted.pcr_selections, values) == quoted.pcr_digest:
            return attest, signature, pcrs
    raise TpmError("PCRs kept changing while quoting; giving up after 5 attempts")


def _event_log(tcti: Tcti) -> bytes | None:
    """The firmware event log of a kernel-managed TPM, when readable (tpmrm0 -> tpm0)."""
    if tcti.kind != "device":
        return None
    name = Path(tcti.path).name.replace("tpmrm", "tpm")
    try:
        return Path(f"/sys/kernel/security/{name}/binary_bios_measurements").read_bytes()
    except OSError:
        return None


def _read_tpm2b(path: Path) -> bytes:
    data = path.read_bytes()
    r = wire.Reader(data, str(path))
    body = r.tpm2b()
    r.end()
    return body


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


PLUGINS = (TpmAttester,)
