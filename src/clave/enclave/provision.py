"""What an enclave container's runtime hands its app before the app runs: its own attestation, and secrets
released by a key broker to that attestation.

A WebAssembly app cannot run `clave attest` or open a socket (WASI preview 1 has neither), so the enclave
runtime, which holds the enclave's identity, does it for the app, as Gramine's `gramine-ratls` and Occlum's
init do. Settings (rune-style: env first, then annotation):

- ``ENCLAVE_ATTESTATION_DIR`` / ``enclave.attestation.dir``: a directory on a tmpfs mount of the container that
  receives ``cert.pem`` and ``key.pem`` (an RA-TLS certificate whose evidence binds that fresh key: what
  `clave attest --format cert` prints) and ``evidence.json`` (what `clave attest --format json` prints);
- ``ENCLAVE_KBS_URL`` / ``enclave.kbs.url`` (https://host:port), ``ENCLAVE_KBS_CA`` / ``enclave.kbs.ca`` (a host
  path: the CA certificate the KBS's TLS certificate must chain to) and ``ENCLAVE_KBS_RESOURCES`` /
  ``enclave.kbs.resources``: ``repo/type/tag=/container/path,...``. Each resource is fetched through the KBS
  protocol with the enclave's evidence and written, mode 0400 and owned by the process user, to its path, which
  must be on a tmpfs mount of the container (secrets never touch a disk).

Any failure stops the container before the app runs, with one line naming the step (`clave start` reports it).
``fetch_secret`` serves `clave attest ID --kbs URL --resource R --out PATH` for a running container.
"""

from __future__ import annotations

import binascii
import hashlib
import os
import stat

from clave import fastjson
from clave.enclave.runtime import EnclaveError, EnclaveRuntime
from clave.linux import rootfs

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

MAX_CA_FILE = 1 << 20

class Provisioning:
    """Parsed settings, plus what must be opened or imported before pivot_root."""

    def __init__(self, settings: dict[str, str]) -> None:
        self.attestation_dir = settings.get("attestation_dir") or None
        self.kbs_url = settings.get("kbs_url") or None
        self.resources: list[tuple[str, str]] = []
        for item in (settings.get("kbs_resources") or "").split(","):
            if not item.strip():
                continue
            resource, sep, path = item.strip().partition("=")
            if not sep or not path.startswith("/") or resource.count("/") != 2:
                raise EnclaveError(f"enclave.kbs.resources: {item!r} is not repo/type/tag=/absolute/path")
            self.resources.append((resource, path))
        if self.resources and not self.kbs_url:
            raise EnclaveError("enclave.kbs.resources needs enclave.kbs.url")
        self.kbs_ca = settings.get("kbs_ca") or None
        if self.kbs_ca and (not self.kbs_ca.startswith("/") or os.path.normpath(self.kbs_ca) != self.kbs_ca):
            raise EnclaveError(f"enclave.kbs.ca {self.kbs_ca!r} must be an absolute, normalised host path")
        self.ca_fd: int | None = None
        self.preloaded = False

    def wanted(self) -> bool:
        return bool(self.attestation_dir or self.resources)

    def before_pivot(self) -> None:
        """Open the host's CA file and import what the steps need: the host's files are out of reach after
        pivot_root."""
        if self.kbs_ca:
            try:
                self.ca_fd = os.open(self.kbs_ca, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            except OSError as exc:
                raise EnclaveError(f"enclave.kbs.ca {self.kbs_ca}: {exc.strerror}") from None
            st = os.fstat(self.ca_fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_CA_FILE:
                raise EnclaveError(f"enclave.kbs.ca {self.kbs_ca} is not a certificate file (a regular file of at "
                                   f"most {MAX_CA_FILE >> 10} KiB)")
        if self.attestation_dir or self.kbs_url:
            preload()
            self.preloaded = True

    def run(self, runtime: EnclaveRuntime, uid: int, gid: int) -> None:
        """In the init after pivot_root and pal_init, before the app: write what was asked for."""
        if self.attestation_dir:
            write_attestation(runtime, self.attestation_dir, uid, gid)
        for resource, path in self.resources:
            assert self.kbs_url is not None
            fetch_secret(runtime, self.kbs_url, resource, path, uid, gid, self.ca_file())

    def fetch_for_agent(self, runtime: EnclaveRuntime, request: dict[str, Any]) -> None:
        """`clave attest ID --kbs URL --resource R --out PATH` on a running container: its runtime attests and
        writes the secret into the container, as the current (process) user."""
        if not self.preloaded:
            raise EnclaveError("this container was started without enclave.kbs.url: its enclave runtime has no KBS "
                               "client loaded")
        ca_file = self.ca_file()
        if request.get("ca"):
            fd = os.memfd_create("kbs-ca", os.MFD_CLOEXEC)
            os.write(fd, str(request["ca"]).encode())
            ca_file = f"/proc/self/fd/{fd}"
        try:
            fetch_secret(runtime, str(request.get("url") or self.kbs_url), str(request["resource"]),
                         str(request["path"]), os.geteuid(), os.getegid(), ca_file)
        finally:
            if request.get("ca"):
                os.close(int(ca_file.rsplit("/", 1)[1]))  # type: ignore[union-attr]

    def ca_file(self) -> str | None:
        return f"/proc/self/fd/{self.ca_fd}" if self.ca_fd is not None else None


def preload() -> None:
    """Import every module the attestation and KBS steps use (the init cannot import after pivot_root)."""
    import http.client  # noqa: F401
    import ssl  # noqa: F401

    from clave.attestation import ratls
    from clave.attestation.base import Evidence
    from clave.kbs import client

    class Rehearsal:  # an RA-TLS certificate over empty evidence: loads what ratls imports when it runs
        name = tee = "wasm"

        def attest(self, report_data: bytes) -> Evidence:
            return Evidence(tee="wasm", data=b"", insecure=True)

    cert = ratls.create_certificate(Rehearsal())  # type: ignore[arg-type]
    cert.cert_pem()
    cert.key_pem()
    client.preload()


class EnclaveAttester:
    """The enclave runtime's local report as an attester (the RA-TLS and KBS code take attesters)."""

    name = "enclave"

    def __init__(self, runtime: EnclaveRuntime) -> None:
        self.runtime = runtime
        self.tee = runtime.name
        self.priority = 0

    def available(self) -> None:
        pass

    def attest(self, report_data: bytes) -> Any:
        from clave.attestation.base import Evidence

        return Evidence(tee=self.tee, data=self.runtime.local_report(b"", report_data),
                        insecure=self.runtime.insecure)


def check_tmpfs(path: str) -> None:
    directory = os.path.dirname(path) or "/"
    if not os.path.isdir(directory):
        raise EnclaveError(f"{directory} does not exist in the container")
    if rootfs.filesystem_type(directory) != "tmpfs":
        raise EnclaveError(f"{path} is not on a tmpfs mount of the container: secrets and keys are written only to "
                           "memory (add a tmpfs mount there)")


def _write(path: str, data: bytes, uid: int, gid: int, mode: int = 0o400, checked: bool = False) -> None:
    if not checked:
        check_tmpfs(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        os.write(fd, data)
        os.fchown(fd, uid, gid)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def write_attestation(runtime: EnclaveRuntime, directory: str, uid: int, gid: int) -> None:
    from clave.attestation import ratls

    try:
        os.makedirs(directory, exist_ok=True)
        cert = ratls.create_certificate(EnclaveAttester(runtime))  # type: ignore[arg-type]
        nonce = os.urandom(32)
        report_data = hashlib.sha256(nonce).digest()
        evidence = runtime.local_report(b"", report_data)
        document = {"tee": runtime.name, "attester": "enclave", "insecure": runtime.insecure,
                    "measurement": runtime.measurement(), "nonce": nonce.hex(), "report_data": report_data.hex(),
                    "evidence": binascii.b2a_base64(evidence, newline=False).decode()}
        _write(os.path.join(directory, "cert.pem"), cert.cert_pem(), uid, gid, 0o444)
        _write(os.path.join(directory, "key.pem"), cert.key_pem(), uid, gid)
        _write(os.path.join(directory, "evidence.json"), fastjson.dumps_indented(document).encode() + b"\n", uid,
               gid, 0o444)
    except OSError as exc:
        raise EnclaveError(f"attestation files in {directory}: {exc.strerror or exc}") from None


def fetch_secret(runtime: EnclaveRuntime, url: str, resource: str, path: str, uid: int, gid: int,
                 ca_file: str | None) -> None:
    from clave.kbs import client

    check_tmpfs(path)

    def attest(report_data: bytes) -> tuple[str, bytes]:
        return runtime.name, runtime.local_report(b"", report_data)

    try:
        secret = client.fetch_resource(url, resource, attest, ca_file=ca_file)
    except client.KbsError as exc:
        raise EnclaveError(f"kbs: {resource}: {exc}") from None
    write_secret(path, secret, uid, gid)


def write_secret(path: str, secret: bytes, uid: int, gid: int, checked: bool = False) -> None:
    """A released secret, readable by ``uid`` only, on a tmpfs (``checked``: the caller made sure of that)."""
    try:
        _write(path, secret, uid, gid, checked=checked)
    except OSError as exc:
        raise EnclaveError(f"cannot write {path}: {exc.strerror}") from None
