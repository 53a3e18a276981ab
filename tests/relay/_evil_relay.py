"""A compromised clave-relay, for the refusal tests: the real relay (real attested TLS, real container evidence)
with its evidence path subverted in one of these ways (argv[1]):

    replay          answers every request for a container with the first evidence it obtained for it
    stale-nonce     asks the container to bind another nonce than the verifier's
    other-container answers a request for any container with the evidence of the container named "other"
    other-binding   asks the right container, but binds the request to the container id "other"
    forge           forges wasm evidence with the real measurement and binding under its own platform key,
                    and serves that key as the platform key

usage: python _evil_relay.py MODE --listen HOST:PORT --root DIR
"""

from __future__ import annotations

import argparse
import base64
import sys
from typing import Any

from clave.attestation import registry
from clave.relay import protocol
from clave.relay.main import serve
from clave.relay.server import EngineEvidence, Relay


class EvilRelay(Relay):
    def __init__(self, mode: str, root: str) -> None:
        super().__init__(EngineEvidence([root]), registry.attester("sample"))
        self.mode = mode
        self.first: dict[str, dict[str, Any]] = {}

    def evidence_reply(self, container: str, report_data: bytes) -> dict[str, Any]:
        nonce = report_data[: protocol.NONCE_SIZE]
        if self.mode == "replay":
            if container not in self.first:
                self.first[container] = super().evidence_reply(container, report_data)
            return dict(self.first[container], id=protocol.new_message_id())
        if self.mode == "stale-nonce":
            stale = bytes(reversed(nonce))
            return super().evidence_reply(container, protocol.container_report_data(stale, self.key_hash, container))
        if self.mode == "other-container":
            return dict(super().evidence_reply("other", report_data), container=container)
        if self.mode == "other-binding":
            return super().evidence_reply(container, protocol.container_report_data(nonce, self.key_hash, "other"))
        if self.mode == "forge":
            return self._forge(container, report_data)
        raise SystemExit(f"unknown mode {self.mode}")

    def _forge(self, container: str, report_data: bytes) -> dict[str, Any]:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        from clave.attestation import wasm_report as report

        honest = super().evidence_reply(container, report_data)
        key = Ed25519PrivateKey.generate()
        forged = report.make_report(key, bytes.fromhex(honest["mrenclave"]), bytes.fromhex(honest["mrsigner"]),
                                    report_data)
        return dict(honest, evidence=base64.b64encode(forged).decode(),
                    platform_key=report.platform_public_pem(key).decode())


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode")
    parser.add_argument("--listen", required=True)
    parser.add_argument("--root", required=True)
    args = parser.parse_args()
    return serve(EvilRelay(args.mode, args.root), protocol.parse_address(args.listen), insecure=True)


if __name__ == "__main__":
    sys.exit(main())
