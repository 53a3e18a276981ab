"""Measured boot of the guest: which PCRs hold what, the event log format, and the reference values.

Shared by the guest agent (which extends the PCRs of its vTPM and keeps the log) and the host (``clave vm
measure``, which computes the same values from the build-guest outputs). Light on purpose: the agent imports it
under TCG, so only hashlib, os and struct.

PCRs (SHA-256 bank; SeaBIOS measures itself into 0-7, whose values depend on QEMU's firmware build, so the guest
uses two PCRs of its own):

- ``GUEST_PCR`` 8, extended at the agent's start, in this order: the kernel and the initramfs (their digests
  come from the host on the kernel command line, ``clave.measure=kernel:HEX,initramfs:HEX``: nothing inside the
  guest can re-read what QEMU loaded), the guest image (hashed by the agent from the block device it booted
  from) and the agent (the digest of the Clave sources in the mounted image, computed as ``agent_digest``).
- ``CONTAINER_PCR`` 11, extended before each container starts with the container's image digest and the SHA-256
  of the OCI config the agent received.

Each extension is one event of a TCG crypto-agile event log (a ``Spec ID Event03`` header, then
TCG_PCR_EVENT2 records, SHA-256 only), which clave.attestation's TPM verifier replays against the quote.
"""

from __future__ import annotations

import hashlib
import os
import struct

GUEST_PCR = 8
# Not 9: Linux's EFI stub measures the initrd it loads into PCR 9 (the guest boots through OVMF when it has a
# TPM), and 10-15 carry IMA's and systemd's conventions, of which only 11 (a unified kernel image) never
# happens in this guest.
CONTAINER_PCR = 11
QUOTED_PCRS = (*range(8), GUEST_PCR, CONTAINER_PCR)  # the firmware's 0-7 and the guest's own
ALG_SHA256 = 0x000B
EV_NO_ACTION = 0x00000003
EV_IPL = 0x0000000D  # "Initial Program Loader": what a boot loader measures
BOOT_COMPONENTS = ("kernel", "initramfs", "image", "agent")  # the order of GUEST_PCR's events
CMDLINE_KEY = "clave.measure="


def extend(pcr: bytes, digest: bytes) -> bytes:
    return hashlib.sha256(pcr + digest).digest()


def replay(digests: list[bytes]) -> bytes:
    """A PCR's value after extending a zero PCR with ``digests`` in order."""
    value = bytes(32)
    for digest in digests:
        value = extend(value, digest)
    return value


def event_data(component: str, detail: str = "") -> bytes:
    """The event's description: ``clave:<component>[ <detail>]``."""
    return f"clave:{component}{' ' + detail if detail else ''}".encode()


def log_header() -> bytes:
    """The TCG_PCClientPCREvent that starts a crypto-agile log (TCG PC Client PFP, Spec ID Event03)."""
    spec = (b"Spec ID Event03\0" + struct.pack("<IBBBB", 0, 0, 2, 0, 2)
            + struct.pack("<I", 1) + struct.pack("<HH", ALG_SHA256, 32) + b"\0")
    return struct.pack("<II", 0, EV_NO_ACTION) + bytes(20) + struct.pack("<I", len(spec)) + spec


def log_event(pcr: int, digest: bytes, data: bytes, event_type: int = EV_IPL) -> bytes:
    """One TCG_PCR_EVENT2 with a SHA-256 digest."""
    return (struct.pack("<III", pcr, event_type, 1) + struct.pack("<H", ALG_SHA256) + digest
            + struct.pack("<I", len(data)) + data)


def boot_cmdline(digests: dict[str, str]) -> str:
    """The kernel argument that hands the guest the digests of what QEMU loaded."""
    return f"{CMDLINE_KEY}kernel:{digests['kernel']},initramfs:{digests['initramfs']}"


def parse_cmdline(cmdline: str) -> dict[str, str]:
    for arg in cmdline.split():
        if arg.startswith(CMDLINE_KEY):
            return dict(item.partition(":")[::2] for item in arg[len(CMDLINE_KEY):].split(",") if item)
    return {}


def agent_digest_of(files: list[tuple[str, str]]) -> str:
    """The agent's digest from ``(path in the package dir, file sha256 hex)`` pairs in walk order."""
    h = hashlib.sha256()
    for rel, sha in files:
        h.update(rel.encode() + b"\0" + sha.encode() + b"\n")
    return h.hexdigest()


def package_files(root: str) -> list[tuple[str, str]]:
    """``(clave/..., absolute path)`` of every .py and .pem file under the ``clave`` package at ``root``, in the
    order the digest uses (sorted directories and names, __pycache__ skipped)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for fname in sorted(filenames):
            if fname.endswith((".py", ".pem")):
                full = os.path.join(dirpath, fname)
                out.append((os.path.join("clave", os.path.relpath(full, root)), full))
    return out


def file_sha256(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(chunk):
            h.update(data)
    return h.hexdigest()


def container_digests(image_digest: str, oci_json: bytes) -> tuple[bytes, bytes]:
    """What CONTAINER_PCR is extended with for one container: its image digest (``sha256:HEX`` as 32 bytes,
    anything else hashed) and the SHA-256 of its OCI config as the agent received it."""
    algo, _, hexpart = image_digest.partition(":")
    if algo == "sha256" and len(hexpart) == 64:
        try:
            image = bytes.fromhex(hexpart)
        except ValueError:
            image = hashlib.sha256(image_digest.encode()).digest()
    else:
        image = hashlib.sha256(image_digest.encode()).digest()
    return image, hashlib.sha256(oci_json).digest()


def reference_pcrs(digests: dict[str, str]) -> dict[int, str]:
    """GUEST_PCR's value for a guest with these component digests (Guest.digests()): what a quote from a guest
    that booted exactly these files holds."""
    return {GUEST_PCR: replay([bytes.fromhex(digests[c]) for c in BOOT_COMPONENTS]).hex()}


def reference_log(digests: dict[str, str]) -> bytes:
    """The event log a guest with these component digests keeps for GUEST_PCR."""
    return log_header() + b"".join(log_event(GUEST_PCR, bytes.fromhex(digests[c]), event_data(c))
                                   for c in BOOT_COMPONENTS)


def policy(digests: dict[str, str]) -> dict[str, object]:
    """A clave-verify policy pinning GUEST_PCR (claim ``pcrs.8``) to this guest's reference value."""
    return {"reference_values": {f"pcrs.{pcr}": [value] for pcr, value in reference_pcrs(digests).items()}}
