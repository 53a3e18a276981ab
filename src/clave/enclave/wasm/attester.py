"""The ``wasm`` attester: local reports of the built-in WebAssembly enclave runtime. INSECURE: software only.
Registered in clave.attestation.registry by module path (attestation imports no runtime code).

The report (``clave.attestation.wasm_report``) binds a signed module's mrenclave and mrsigner to the report data and
is signed by this host's platform key: it proves only what the host says. Inside an enclave container the
runtime produces it (``WasmRuntime.local_report``); on the host this attester produces it for the module named
by ``CLAVE_WASM_MODULE`` (a signed module; its enclave config is the signed one).
"""

from __future__ import annotations

import os

from clave.attestation.base import Attester, AttesterUnavailable, Evidence

ENV_MODULE = "CLAVE_WASM_MODULE"


class WasmAttester(Attester):
    """Low priority: hardware attesters are preferred when present."""

    name = "wasm"
    tee = "wasm"
    priority = 5

    def __init__(self, module_path: str | None = None, platform_key_path: str | None = None) -> None:
        self.module_path = module_path or os.environ.get(ENV_MODULE)
        self.platform_key_path = platform_key_path

    def available(self) -> None:
        if not self.module_path:
            raise AttesterUnavailable(f"no WebAssembly module to attest: set {ENV_MODULE} to a signed module")
        if not os.path.isfile(self.module_path):
            raise AttesterUnavailable(f"WebAssembly module {self.module_path} does not exist")

    def attest(self, report_data: bytes) -> Evidence:
        from clave.attestation import wasm_report as report
        from clave.enclave.wasm import signing

        self.available()
        assert self.module_path is not None
        with open(self.module_path, "rb") as f:
            module = f.read()
        try:
            with open(signing.signature_path(self.module_path), "rb") as f:
                document: bytes | None = f.read()
        except FileNotFoundError:
            document = None
        signed = signing.verify(module, document, self.module_path)
        key = report.load_platform_key(self.platform_key_path)
        data = report.make_report(key, signed.mrenclave, signed.mrsigner, report_data)
        return Evidence(tee=self.tee, data=data, insecure=True)


PLUGINS = (WasmAttester,)
