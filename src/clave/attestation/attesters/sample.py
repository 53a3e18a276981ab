"""The ``sample`` attester: software-only evidence for development. INSECURE: it proves nothing.

There is no TEE behind this evidence. It is authenticated with HMAC-SHA256 under a development key that
is published in this source file, so anybody can forge it. It exists so that attested TLS, policies and
the verifier CLI can be exercised on any machine; every Evidence it produces has ``insecure=True``.

Format (all of it covered by the MAC)::

    magic   8 bytes  b"CLVSMPL\\x01"
    body    CBOR map {"measurement": bstr .size 32, "svn": uint, "debug": bool, "report_data": bstr .size 64}
    mac     32 bytes HMAC-SHA256(DEVELOPMENT_KEY, magic || body)
"""

from __future__ import annotations

import hashlib
import hmac

from clave.attestation.base import Attester, Evidence

MAGIC = b"CLVSMPL\x01"
MAC_SIZE = 32
REPORT_DATA_SIZE = 64
# Public on purpose: this key makes the MAC an integrity check, not a proof of anything.
DEVELOPMENT_KEY = hashlib.sha256(b"clave sample attester: public development key, proves nothing").digest()
# The "measurement" of the sample enclave when none is given: a fixed, made-up value.
DEFAULT_MEASUREMENT = hashlib.sha256(b"clave sample enclave").digest()


def encode_evidence(measurement: bytes, svn: int, debug: bool, report_data: bytes) -> bytes:
    import cbor2

    body = cbor2.dumps(
        {"measurement": measurement, "svn": svn, "debug": debug, "report_data": report_data}
    )
    signed = MAGIC + body
    return signed + hmac.new(DEVELOPMENT_KEY, signed, hashlib.sha256).digest()


class SampleAttester(Attester):
    """Always available; lowest priority so that real hardware is preferred when present."""

    name = "sample"
    tee = "sample"
    priority = 0

    def __init__(self, measurement: bytes = DEFAULT_MEASUREMENT, svn: int = 1, debug: bool = False) -> None:
        if len(measurement) != 32:
            raise ValueError(f"sample measurement must be 32 bytes, got {len(measurement)}")
        self.measurement = measurement
        self.svn = svn
        self.debug = debug

    def attest(self, report_data: bytes) -> Evidence:
        if len(report_data) > REPORT_DATA_SIZE:
            raise ValueError(f"report data is {len(report_data)} bytes, at most {REPORT_DATA_SIZE} fit")
        padded = report_data.ljust(REPORT_DATA_SIZE, b"\0")
        data = encode_evidence(self.measurement, self.svn, self.debug, padded)
        return Evidence(tee=self.tee, data=data, insecure=True)


PLUGINS = (SampleAttester,)
