"""The built-in WebAssembly enclave runtime: signed, measured WASI modules run on wasmtime.

INSECURE as a TEE: it gives software isolation (the WebAssembly sandbox), not hardware memory encryption; its
local reports are signed with a host key, so they prove only what the host says. ``runtime.WasmRuntime`` is
the PAL; ``measure``, ``signing`` and ``cache`` import no wasmtime (cheap for the CLI). Its local reports
are an evidence format: clave.attestation.wasm_report.
"""
