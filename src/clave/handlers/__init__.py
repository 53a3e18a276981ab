"""Handlers build a container's isolation; the engine picks one per container (clave.handlers.base is the
contract each implements).

A handler is found by name in HANDLERS and imported only when used, so a native container never pays for the
enclave or VM machinery. A fourth handler is one more entry here and one module implementing the contract.
"""

from __future__ import annotations

import sys

from clave.handlers.base import Handler

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

HANDLERS: dict[str, str] = {
    "native": "clave.handlers.native:NativeHandler",
    "enclave": "clave.handlers.enclave:EnclaveHandler",
    "vm": "clave.handlers.vm:VmHandler",
}
# The annotation that names a handler (ctr --annotation, podman, CRI pod annotations).
HANDLER_ANNOTATION = "io.clave.handler"


def select_handler_name(config: dict[str, Any], default: str | None = None) -> str:
    """Which handler a config asks for: enclave containers are recognised by rune's settings (ENCLAVE_TYPE in
    the process env, or the enclave.type annotation); otherwise the io.clave.handler annotation, then the
    caller's default (--handler, a shim's runtime options), then native."""
    from clave.enclave.config import is_enclave

    if is_enclave(config):
        return "enclave"
    chosen = config.get("annotations", {}).get(HANDLER_ANNOTATION) or default or "native"
    # "enclave" cannot be imposed from outside: a container is one by its own settings, as rune decides (a pod
    # of the clave-enclave runtime still runs its sandbox container natively).
    return "native" if chosen == "enclave" else chosen


def handler_for(config: dict[str, Any], name: str | None = None, default: str | None = None) -> Handler:
    name = name or select_handler_name(config, default)
    target = HANDLERS.get(name)
    if target is None:
        from clave.errors import InvalidArgument

        raise InvalidArgument(f"unknown container handler {name!r} (known: {', '.join(sorted(HANDLERS))})")
    module_name, _, cls_name = target.partition(":")
    __import__(module_name)  # not importlib: `clave state` would pay for it and the warnings module
    cls = getattr(sys.modules[module_name], cls_name)
    handler: Handler = cls()
    return handler


__all__ = ["HANDLERS", "HANDLER_ANNOTATION", "Handler", "handler_for", "select_handler_name"]
