"""The guest's vTPM (inside the VM): measured boot, container measurements, quotes and a clone's new identity.

At start (only when the kernel found a TPM: q35 with a per-VM swtpm) the agent measures its boot in a thread
(clave.vm.measure: kernel and initramfs digests from the host's command line, the guest image hashed from the
block device it booted from, the agent's own sources) so that Health answers at once; container measurements
and quotes wait for it. The TPM commands and the evidence format are clave.attestation's (TpmClient,
TpmAttester's attestation key, TpmEvidence): one mechanism, verified by the same verifier. Those modules need
cryptography and cbor2 (Debian's, in /usr/lib/python3/dist-packages), imported on first use only.
"""

from __future__ import annotations

import os
import shutil
import struct
import sys
import threading

from clave.vm import measure
from clave.vm.agent import disks

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

DEVICE = "/dev/tpmrm0"
STATE_DIR = "/run/clave-agent/tpm"  # the attestation key's blobs (guest RAM: a clone renews them)
DIST_PACKAGES = "/usr/lib/python3/dist-packages"
IMAGE_SERIAL = "clave-guest"
AGENT_ROOT = "/usr/lib/clave/clave"
_CC_PCR_EXTEND = 0x182
_CC_STIR_RANDOM = 0x146
_CC_CLEAR = 0x126
_RH_LOCKOUT = 0x4000000A


class TpmUnavailable(RuntimeError):
    """The guest has no TPM (not a measured-boot VM) or its boot measurement failed."""


class GuestTpm:
    def __init__(self) -> None:
        self.present = os.path.exists(DEVICE)
        self.log = bytearray(measure.log_header())
        self.error = ""
        self.ready = threading.Event()
        self.lock = threading.Lock()  # one TPM session at a time, and the log in PCR order
        self.boot_digests: dict[str, str] = {}

    def start(self) -> None:
        if not self.present:
            self.ready.set()
            return
        threading.Thread(target=self._measure_boot, name="measure", daemon=True).start()

    # -- TPM access --------------------------------------------------------------------------------------------
    def _client(self) -> Any:
        if DIST_PACKAGES not in sys.path:
            sys.path.append(DIST_PACKAGES)
        from clave.attestation.attesters.tpm import Tcti, TpmClient

        return TpmClient(Tcti("device", path=DEVICE).open())

    def _command(self, code: int, handles: tuple[int, ...], params: bytes, auth: bool = True) -> None:
        tpm = self._client()
        try:
            tpm._command(code, handles, params, auth=auth)
        finally:
            tpm.transport.close()

    def _extend(self, pcr: int, digest: bytes, data: bytes) -> None:
        """TPM2_PCR_Extend (SHA-256 bank only) and the matching event in the log."""
        params = struct.pack(">IH", 1, measure.ALG_SHA256) + digest
        self._command(_CC_PCR_EXTEND, (pcr,), params)
        self.log += measure.log_event(pcr, digest, data)

    # -- boot ----------------------------------------------------------------------------------------------------
    def _measure_boot(self) -> None:
        try:
            with open("/proc/cmdline") as f:
                digests = measure.parse_cmdline(f.read())
            missing = [c for c in ("kernel", "initramfs") if c not in digests]
            if missing:
                raise TpmUnavailable(f"the host passed no digest for {', '.join(missing)} (clave.measure=)")
            image = disks.find(IMAGE_SERIAL)
            if image is None:
                raise TpmUnavailable(f"no virtio-blk disk with serial {IMAGE_SERIAL!r}")
            digests["image"] = measure.file_sha256(image)
            files = measure.package_files(AGENT_ROOT)
            digests["agent"] = measure.agent_digest_of([(rel, measure.file_sha256(p)) for rel, p in files])
            with self.lock:
                for component in measure.BOOT_COMPONENTS:
                    self._extend(measure.GUEST_PCR, bytes.fromhex(digests[component]), measure.event_data(component))
            self.boot_digests = digests
            self._client().transport.close()  # imports the attester now (a template's clones inherit it)
            from clave.attestation import tpm_wire  # noqa: F401
        except Exception as exc:  # noqa: BLE001  # reported by every later TPM call
            self.error = f"measured boot failed: {exc}"
            print(f"clave-agent: {self.error}", flush=True)
        finally:
            self.ready.set()

    def _wait(self) -> None:
        if not self.present:
            raise TpmUnavailable(f"no TPM in this guest ({DEVICE} absent): boot the VM with a vTPM (VmConfig tpm)")
        self.ready.wait()
        if self.error:
            raise TpmUnavailable(self.error)

    # -- RPCs ----------------------------------------------------------------------------------------------------
    def measure_container(self, container_id: str, image_digest: str, oci_json: bytes) -> bytes:
        """Extend CONTAINER_PCR with the image digest and the config; the PCR's new value."""
        self._wait()
        image, config = measure.container_digests(image_digest, oci_json)
        with self.lock:
            self._extend(measure.CONTAINER_PCR, image, measure.event_data("container-image", f"{container_id} "
                                                                          f"{image_digest}"))
            self._extend(measure.CONTAINER_PCR, config, measure.event_data("container-config", container_id))
            return self._pcrs((measure.CONTAINER_PCR,))[measure.CONTAINER_PCR]

    def _pcrs(self, pcrs: tuple[int, ...]) -> dict[int, bytes]:
        from clave.attestation import tpm_wire as wire

        tpm = self._client()
        try:
            values: dict[int, bytes] = tpm.pcr_read(wire.PcrSelection(wire.ALG_SHA256, pcrs))
            return values
        finally:
            tpm.transport.close()

    def quote(self, nonce: bytes) -> tuple[bytes, bytes]:
        """Clave TPM evidence over QUOTED_PCRS bound to ``nonce`` (TpmAttester's key, this guest's own), and the
        event log."""
        self._wait()
        from clave.attestation import tpm_wire as wire
        from clave.attestation.attesters.tpm import TpmAttester

        selection = wire.PcrSelection(wire.ALG_SHA256, measure.QUOTED_PCRS)
        attester = TpmAttester(tcti=f"device:{DEVICE}", state_dir=STATE_DIR)
        with self.lock:
            tpm = self._client()
            try:
                ak, ak_public = attester._load_ak(tpm)
                try:
                    for _ in range(5):  # a PCR extended between quote and read: quote again
                        attest, signature = tpm.quote(ak, wire.qualifying_data(nonce), selection)
                        pcrs = tpm.pcr_read(selection)
                        quoted = wire.parse_quote_attest(attest)
                        alg = wire.hash_alg(wire.parse_signature(signature).hash_alg)
                        if wire.pcr_digest(alg, quoted.pcr_selections, {wire.ALG_SHA256: pcrs}) == quoted.pcr_digest:
                            break
                finally:
                    tpm.flush(ak)
            finally:
                tpm.transport.close()
            log = bytes(self.log)
        evidence = wire.TpmEvidence(attest, signature, ak_public, {"sha256": pcrs}, event_log=log)
        return evidence.encode(), log

    def renew_identity(self, entropy: bytes) -> None:
        """A clone's TPM arrived with the template's state: stir the host's entropy into its generator, then
        TPM2_Clear (new storage primary seed: every key derived before, the attestation key included, is gone)
        and forget the key's blobs. PCRs survive a clear: they hold this guest's boot, which the clone shares."""
        self._wait()
        with self.lock:
            if entropy:
                self._command(_CC_STIR_RANDOM, (), struct.pack(">H", len(entropy[:128])) + entropy[:128],
                              auth=False)
            self._command(_CC_CLEAR, (_RH_LOCKOUT,), b"")
            shutil.rmtree(STATE_DIR, ignore_errors=True)

