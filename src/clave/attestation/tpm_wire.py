"""TPM 2.0 structures as they travel on the wire (TPM 2.0 Library, Part 2), shared by the TPM attester and
verifier: parsing of TPMS_ATTEST, TPMT_SIGNATURE and TPMT_PUBLIC, marshalling of the few structures the
attester sends, and the rule that turns report data into a quote's qualifying data.

All TPM integers are big-endian. Parsers raise ``WireError`` (a ValueError) on truncated or malformed input.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import cbor2
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa

# TPM_ALG_ID values used here.
ALG_RSA = 0x0001
ALG_SHA1 = 0x0004
ALG_AES = 0x0006
ALG_SHA256 = 0x000B
ALG_SHA384 = 0x000C
ALG_SHA512 = 0x000D
ALG_NULL = 0x0010
ALG_RSASSA = 0x0014
ALG_RSAPSS = 0x0016
ALG_ECDSA = 0x0018
ALG_ECDAA = 0x001A
ALG_ECC = 0x0023
ALG_CFB = 0x0043

TPM_GENERATED_VALUE = 0xFF544347  # "\xffTCG": only the TPM itself signs structures starting with this
ST_ATTEST_QUOTE = 0x8018

# TPMA_OBJECT bits.
ATTR_FIXED_TPM = 1 << 1
ATTR_FIXED_PARENT = 1 << 4
ATTR_SENSITIVE_DATA_ORIGIN = 1 << 5
ATTR_USER_WITH_AUTH = 1 << 6
ATTR_NO_DA = 1 << 10
ATTR_RESTRICTED = 1 << 16
ATTR_DECRYPT = 1 << 17
ATTR_SIGN = 1 << 18

# TPM_ECC_CURVE values the cryptography package can use.
_CURVES: dict[int, type[ec.EllipticCurve]] = {
    0x0003: ec.SECP256R1, 0x0004: ec.SECP384R1, 0x0005: ec.SECP521R1,
}


@dataclass(frozen=True)
class HashAlg:
    alg_id: int
    name: str  # the PCR bank name as tpm2-tools writes it: sha1, sha256...
    size: int

    def digest(self, data: bytes) -> bytes:
        return hashlib.new(self.name, data).digest()

    def crypto_hash(self) -> hashes.HashAlgorithm:
        algorithms: dict[str, hashes.HashAlgorithm] = {
            "sha1": hashes.SHA1(), "sha256": hashes.SHA256(),
            "sha384": hashes.SHA384(), "sha512": hashes.SHA512(),
        }
        return algorithms[self.name]


HASH_ALGS: dict[int, HashAlg] = {
    h.alg_id: h
    for h in (
        HashAlg(ALG_SHA1, "sha1", 20),
        HashAlg(ALG_SHA256, "sha256", 32),
        HashAlg(ALG_SHA384, "sha384", 48),
        HashAlg(ALG_SHA512, "sha512", 64),
    )
}
HASH_BY_NAME: dict[str, HashAlg] = {h.name: h for h in HASH_ALGS.values()}


class WireError(ValueError):
    """A TPM structure is truncated or malformed."""


def hash_alg(alg_id: int) -> HashAlg:
    try:
        return HASH_ALGS[alg_id]
    except KeyError:
        raise WireError(f"unsupported hash algorithm 0x{alg_id:04x}") from None


def qualifying_data(report_data: bytes) -> bytes:
    """The quote's qualifying data (extraData) for ``report_data``.

    TPMs cap qualifying data at the size of their largest digest (often 32 bytes), so report data longer
    than 32 bytes is replaced by its SHA-256; shorter report data is used as is. Attester and verifier both
    apply this rule.
    """
    return report_data if len(report_data) <= 32 else hashlib.sha256(report_data).digest()


class Reader:
    """Sequential big-endian reader over a TPM structure."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.offset = 0
        self.what = what

    def take(self, n: int) -> bytes:
        if self.offset + n > len(self.data):
            raise WireError(f"{self.what} truncated at offset {self.offset} (needs {n} more bytes)")
        chunk = self.data[self.offset : self.offset + n]
        self.offset += n
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def u32(self) -> int:
        return int.from_bytes(self.take(4), "big")

    def u64(self) -> int:
        return int.from_bytes(self.take(8), "big")

    def tpm2b(self) -> bytes:
        return self.take(self.u16())

    def pcr_selections(self) -> list[PcrSelection]:
        count = self.u32()
        if count > 16:
            raise WireError(f"{self.what}: implausible PCR selection count {count}")
        selections = []
        for _ in range(count):
            alg = self.u16()
            bitmap = self.take(self.u8())
            pcrs = tuple(8 * i + b for i, byte in enumerate(bitmap) for b in range(8) if byte >> b & 1)
            selections.append(PcrSelection(alg, pcrs))
        return selections

    def end(self) -> None:
        if self.offset != len(self.data):
            raise WireError(f"{self.what} has {len(self.data) - self.offset} trailing bytes")


@dataclass(frozen=True)
class PcrSelection:
    """One bank of a TPML_PCR_SELECTION: hash algorithm and PCR indexes in ascending order."""

    hash_alg: int
    pcrs: tuple[int, ...]

    @property
    def bank(self) -> str:
        return hash_alg(self.hash_alg).name


def marshal_pcr_selections(selections: Iterable[PcrSelection]) -> bytes:
    """TPML_PCR_SELECTION with a 3-byte bitmap (PCRs 0-23) per bank."""
    selections = list(selections)
    out = bytearray(struct.pack(">I", len(selections)))
    for sel in selections:
        bitmap = bytearray(3)
        for pcr in sel.pcrs:
            if not 0 <= pcr < 24:
                raise WireError(f"PCR index {pcr} out of range 0-23")
            bitmap[pcr // 8] |= 1 << (pcr % 8)
        out += struct.pack(">HB", sel.hash_alg, 3) + bitmap
    return bytes(out)


def pcr_digest(digest_alg: HashAlg, selections: Iterable[PcrSelection],
               values: Mapping[int, Mapping[int, bytes]]) -> bytes:
    """What a quote's pcrDigest must be: the hash of the selected PCR values concatenated in selection order
    (bank by bank, ascending index). ``values`` maps hash algorithm id -> PCR index -> value."""
    concatenated = bytearray()
    for sel in selections:
        bank = values.get(sel.hash_alg, {})
        for pcr in sel.pcrs:
            if pcr not in bank:
                raise WireError(f"no value for quoted PCR {sel.bank}:{pcr}")
            concatenated += bank[pcr]
    return digest_alg.digest(bytes(concatenated))


@dataclass(frozen=True)
class Attest:
    """A TPMS_ATTEST of type TPM_ST_ATTEST_QUOTE."""

    magic: int
    type: int
    qualified_signer: bytes
    extra_data: bytes
    clock: int
    reset_count: int
    restart_count: int
    safe: bool
    firmware_version: int
    pcr_selections: list[PcrSelection]
    pcr_digest: bytes


def parse_quote_attest(data: bytes) -> Attest:
    """Parse a TPMS_ATTEST and insist that it is a TPM-generated quote."""
    r = Reader(data, "TPMS_ATTEST")
    magic, attest_type = r.u32(), r.u16()
    if magic != TPM_GENERATED_VALUE:
        raise WireError(f"TPMS_ATTEST magic is 0x{magic:08x}, not TPM_GENERATED_VALUE 0xff544347")
    if attest_type != ST_ATTEST_QUOTE:
        raise WireError(f"TPMS_ATTEST type is 0x{attest_type:04x}, not TPM_ST_ATTEST_QUOTE 0x8018")
    qualified_signer, extra_data = r.tpm2b(), r.tpm2b()
    clock, reset_count, restart_count, safe = r.u64(), r.u32(), r.u32(), r.u8()
    firmware_version = r.u64()
    selections = r.pcr_selections()
    digest = r.tpm2b()
    r.end()
    return Attest(magic, attest_type, qualified_signer, extra_data, clock, reset_count, restart_count,
                  safe == 1, firmware_version, selections, digest)


@dataclass(frozen=True)
class Signature:
    """A TPMT_SIGNATURE: RSASSA/RSAPSS carry ``rsa``; ECDSA carries ``r`` and ``s``."""

    sig_alg: int
    hash_alg: int
    rsa: bytes = b""
    r: int = 0
    s: int = 0


def parse_signature(data: bytes) -> Signature:
    rd = Reader(data, "TPMT_SIGNATURE")
    sig_alg = rd.u16()
    if sig_alg in (ALG_RSASSA, ALG_RSAPSS):
        sig = Signature(sig_alg, rd.u16(), rsa=rd.tpm2b())
    elif sig_alg == ALG_ECDSA:
        hash_id = rd.u16()
        r, s = int.from_bytes(rd.tpm2b(), "big"), int.from_bytes(rd.tpm2b(), "big")
        sig = Signature(sig_alg, hash_id, r=r, s=s)
    else:
        raise WireError(f"unsupported signature algorithm 0x{sig_alg:04x}")
    rd.end()
    return sig


@dataclass(frozen=True)
class Public:
    """A TPMT_PUBLIC for an RSA or ECC key, with the cryptography public key it holds."""

    raw: bytes
    type: int
    name_alg: int
    attributes: int
    scheme: int  # the key's fixed signing scheme, ALG_NULL when any scheme is allowed
    scheme_hash: int
    key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey

    def name(self) -> bytes:
        """The TPM Name of the object: nameAlg || H_nameAlg(TPMT_PUBLIC)."""
        return struct.pack(">H", self.name_alg) + hash_alg(self.name_alg).digest(self.raw)

    @property
    def is_restricted_signing_key(self) -> bool:
        wanted = ATTR_RESTRICTED | ATTR_SIGN | ATTR_FIXED_TPM
        return self.attributes & wanted == wanted


def parse_public(data: bytes) -> Public:
    """Parse a TPMT_PUBLIC (without the TPM2B size prefix)."""
    r = Reader(data, "TPMT_PUBLIC")
    key_type, name_alg, attributes = r.u16(), r.u16(), r.u32()
    r.tpm2b()  # authPolicy
    if r.u16() != ALG_NULL:  # symmetric: only storage keys have one
        r.u16(), r.u16()
    scheme = r.u16()
    scheme_hash = ALG_NULL
    if scheme != ALG_NULL:
        scheme_hash = r.u16()
        if scheme == ALG_ECDAA:
            r.u16()  # count
    key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey
    if key_type == ALG_RSA:
        r.u16()  # keyBits: implied by the modulus
        exponent = r.u32() or 65537
        modulus = int.from_bytes(r.tpm2b(), "big")
        try:
            key = rsa.RSAPublicNumbers(exponent, modulus).public_key()
        except ValueError as exc:
            raise WireError(f"TPMT_PUBLIC holds an invalid RSA key: {exc}") from None
    elif key_type == ALG_ECC:
        curve_id = r.u16()
        if r.u16() != ALG_NULL:  # kdf scheme
            r.u16()
        x, y = int.from_bytes(r.tpm2b(), "big"), int.from_bytes(r.tpm2b(), "big")
        curve = _CURVES.get(curve_id)
        if curve is None:
            raise WireError(f"unsupported ECC curve 0x{curve_id:04x}")
        try:
            key = ec.EllipticCurvePublicNumbers(x, y, curve()).public_key()
        except ValueError as exc:
            raise WireError(f"TPMT_PUBLIC holds an invalid EC point: {exc}") from None
    else:
        raise WireError(f"unsupported key type 0x{key_type:04x} (want RSA or ECC)")
    r.end()
    return Public(data, key_type, name_alg, attributes, scheme, scheme_hash, key)


def marshal_public(key_type: int, attributes: int, *, scheme: int = ALG_NULL, scheme_hash: int = ALG_SHA256,
                   symmetric: bool = False, rsa_bits: int = 2048) -> bytes:
    """A TPMT_PUBLIC template (SHA-256 name, empty policy and unique) for TPM2_Create/CreatePrimary."""
    out = struct.pack(">HHI", key_type, ALG_SHA256, attributes) + b"\x00\x00"
    out += struct.pack(">HHH", ALG_AES, 128, ALG_CFB) if symmetric else struct.pack(">H", ALG_NULL)
    out += struct.pack(">HH", scheme, scheme_hash) if scheme != ALG_NULL else struct.pack(">H", ALG_NULL)
    if key_type == ALG_RSA:
        out += struct.pack(">HI", rsa_bits, 0) + b"\x00\x00"
    else:
        out += struct.pack(">HH", 0x0003, ALG_NULL) + b"\x00\x00\x00\x00"  # NIST P-256, no KDF
    return out


# ---------------------------------------------------------------- TCG event logs (PC Client firmware profile)

EV_NO_ACTION = 0x00000003
_SPEC_ID_SIGNATURE = b"Spec ID Event03\0"
_STARTUP_LOCALITY = b"StartupLocality\0"


@dataclass(frozen=True)
class Event:
    """One measurement: the PCR it extends, its type, its digest per hash algorithm id, and its data."""

    pcr: int
    type: int
    digests: dict[int, bytes]
    data: bytes


@dataclass(frozen=True)
class EventLog:
    algorithms: frozenset[int]  # hash algorithm ids every event carries a digest for
    events: list[Event]


class _LittleEndian(Reader):
    """Event logs are little-endian, unlike TPM structures."""

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "little")

    def u32(self) -> int:
        return int.from_bytes(self.take(4), "little")


def parse_event_log(data: bytes) -> EventLog:
    """Parse a TCG event log: SHA-1 format (TCG_PCR_EVENT) or crypto-agile (a Spec ID Event03 header, then
    TCG_PCR_EVENT2 records with a digest per algorithm)."""
    r = _LittleEndian(data, "TCG event log")

    def sha1_event() -> Event:
        pcr, event_type, digest = r.u32(), r.u32(), r.take(20)
        return Event(pcr, event_type, {ALG_SHA1: digest}, r.take(r.u32()))

    first = sha1_event()
    if not (first.type == EV_NO_ACTION and first.data.startswith(_SPEC_ID_SIGNATURE)):
        events = [first]
        while r.offset < len(data):
            events.append(sha1_event())
        return EventLog(frozenset({ALG_SHA1}), events)

    spec = _LittleEndian(first.data[len(_SPEC_ID_SIGNATURE) :], "Spec ID event")
    spec.take(8)  # platformClass, spec version minor/major, errata, uintnSize
    sizes = {}
    for _ in range(spec.u32()):
        alg, size = spec.u16(), spec.u16()
        sizes[alg] = size
    events = []
    while r.offset < len(data):
        pcr, event_type = r.u32(), r.u32()
        digests = {}
        for _ in range(r.u32()):
            alg = r.u16()
            if alg not in sizes:
                raise WireError(f"TCG event log: digest algorithm 0x{alg:04x} not declared in its header")
            digests[alg] = r.take(sizes[alg])
        events.append(Event(pcr, event_type, digests, r.take(r.u32())))
    return EventLog(frozenset(sizes), events)


def replay_event_log(log: EventLog, alg_id: int) -> dict[int, bytes]:
    """The PCR values the log's measurements produce in bank ``alg_id``, for every PCR the log extends.

    PCRs start at zero, except PCR 0 when a StartupLocality event says the platform started at locality 3
    or 4."""
    alg = hash_alg(alg_id)
    pcrs: dict[int, bytes] = {}
    for event in log.events:
        if event.type == EV_NO_ACTION:
            if event.pcr == 0 and event.data.startswith(_STARTUP_LOCALITY) and len(event.data) > 16:
                pcrs[0] = bytes(alg.size - 1) + event.data[16:17]
            continue
        digest = event.digests.get(alg_id)
        if digest is None:
            raise WireError(f"TCG event log: an event for PCR {event.pcr} has no {alg.name} digest")
        pcrs[event.pcr] = alg.digest(pcrs.get(event.pcr, bytes(alg.size)) + digest)
    return pcrs


EVIDENCE_FORMAT = "clave-tpm-quote/1"
_FORMAT_ENTRY = cbor2.dumps("format") + cbor2.dumps(EVIDENCE_FORMAT)  # how encode() starts the map


@dataclass
class TpmEvidence:
    """Clave's TPM evidence container, a CBOR map (see clave.attestation.verifiers.tpm for the layout)."""

    attest: bytes
    signature: bytes
    ak_public: bytes
    pcrs: dict[str, dict[int, bytes]]  # bank name -> PCR index -> value
    ak_certificate: bytes | None = None
    ak_chain: list[bytes] | None = None
    event_log: bytes | None = None

    def encode(self) -> bytes:
        doc: dict[str, object] = {
            "format": EVIDENCE_FORMAT,
            "attest": self.attest,
            "signature": self.signature,
            "ak_public": self.ak_public,
            "pcrs": self.pcrs,
        }
        if self.ak_certificate is not None:
            doc["ak_certificate"] = self.ak_certificate
        if self.ak_chain:
            doc["ak_chain"] = self.ak_chain
        if self.event_log is not None:
            doc["event_log"] = self.event_log
        return bytes(cbor2.dumps(doc))

    @classmethod
    def decode(cls, data: bytes) -> TpmEvidence:
        try:
            doc = cbor2.loads(data)
        except Exception as exc:  # cbor2 raises several types for malformed input
            raise WireError(f"TPM evidence is not CBOR: {exc}") from None
        if not isinstance(doc, dict) or doc.get("format") != EVIDENCE_FORMAT:
            raise WireError(f"TPM evidence is not a {EVIDENCE_FORMAT!r} CBOR map")

        def blob(key: str, required: bool = True) -> bytes | None:
            value = doc.get(key)
            if value is None and not required:
                return None
            if not isinstance(value, bytes):
                raise WireError(f"TPM evidence field {key!r} must be a byte string")
            return value

        pcrs = doc.get("pcrs")
        if not isinstance(pcrs, dict) or not all(
            isinstance(bank, str) and isinstance(values, dict)
            and all(isinstance(i, int) and isinstance(v, bytes) for i, v in values.items())
            for bank, values in pcrs.items()
        ):
            raise WireError("TPM evidence field 'pcrs' must map bank name -> {index: bytes}")
        chain = doc.get("ak_chain") or []
        if not isinstance(chain, list) or not all(isinstance(c, bytes) for c in chain):
            raise WireError("TPM evidence field 'ak_chain' must be a list of DER certificates")
        return cls(
            attest=blob("attest") or b"",
            signature=blob("signature") or b"",
            ak_public=blob("ak_public") or b"",
            pcrs=pcrs,
            ak_certificate=blob("ak_certificate", required=False),
            ak_chain=chain,
            event_log=blob("event_log", required=False),
        )

    @staticmethod
    def sniff(data: bytes) -> bool:
        """Cheap check: a CBOR map whose first entry is "format": EVIDENCE_FORMAT, as ``encode`` writes."""
        return bool(data) and 0xA0 <= data[0] <= 0xB7 and data[1 : 1 + len(_FORMAT_ENTRY)] == _FORMAT_ENTRY
