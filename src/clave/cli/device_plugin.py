"""device-plugin: advertise enclave resources to kubelet (device-plugin API v1beta1).

usage: clave device-plugin [--kubelet-dir DIR] [--wasm-slots N] [--wasm-runtime FILE]... [--interval SECONDS]

Serves clave.io/wasm-enclave (N WebAssembly enclave slots, default 110; 0 advertises none) and, where SGX
exists, alibabacloud.com/sgx_epc_MiB, each on its own socket in DIR (default /var/lib/kubelet/device-plugins),
registered with kubelet's kubelet.sock there. The wasm slots are healthy while every --wasm-runtime FILE exists
(default: wasmtime's C library). Health is checked and kubelet.sock watched every --interval seconds (default 5);
a restarted kubelet gets fresh sockets and a new registration. SIGTERM or SIGINT stops it, removing its sockets.
Needs grpcio (`pip install 'clave[k8s]'`).
"""

from __future__ import annotations

from clave.cli.main import Parsed, UsageError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

DEFAULT_WASM_SLOTS = 110  # kubelet's default pod limit per node: one wasm enclave per pod never runs short
FLAGS: dict[str, tuple[str, tuple[str, ...]]] = {
    "kubelet-dir": ("str", ()), "wasm-slots": ("int", ()), "wasm-runtime": ("list", ()),
    "interval": ("str", ()), "help": ("bool", ("h",)),
}


def run(parsed: Parsed, ctx: Any) -> int:
    if parsed.args:
        raise UsageError(f"clave device-plugin takes no arguments (got {' '.join(parsed.args)!r})")
    slots = parsed.flags.get("wasm-slots", DEFAULT_WASM_SLOTS)
    if slots < 0:
        raise UsageError(f"--wasm-slots must be 0 or more, not {slots}")
    try:
        interval = float(parsed.flags.get("interval", "5"))
    except ValueError:
        raise UsageError(f"invalid value {parsed.flags['interval']!r} for --interval: seconds") from None
    if not 0 < interval <= 3600:
        raise UsageError(f"--interval must be between 0 and 3600 seconds, not {interval}")
    try:
        from clave.k8s import deviceplugin
    except ImportError as exc:
        if exc.name not in ("grpc", "grpcio"):
            raise
        raise UsageError("clave device-plugin needs grpcio: pip install 'clave[k8s]'") from None
    return deviceplugin.main(parsed.flags.get("kubelet-dir", deviceplugin.KUBELET_DIR), slots,
                             parsed.flags.get("wasm-runtime"), interval)
