"""Handlers build a container's isolation; the engine picks one per container.

A handler is found by name in HANDLERS and imported only when used, so a native container never pays for
the enclave or VM machinery.
"""

from __future__ import annotations

import importlib

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from clave.engine.container import CreateOptions
    from clave.engine.state import State, StateDir


HANDLERS: dict[str, str] = {
    "native": "clave.handlers.native:NativeHandler",
    "enclave": "clave.handlers.enclave:EnclaveHandler",
}


class Handler:
    """The interface every handler implements."""

    name = "base"

    def prepare(self, state: State, notice: Callable[[str], None]) -> None:
        """Validate and adjust the container before anything is created (may record state.extra); ``notice``
        tells the user about slow work (the runtime's log)."""

    def spawn(self, state: State, state_dir: StateDir, opts: CreateOptions, cgroup: Any, runtime_hooks: Any) -> int:
        """Create the container's init, waiting for start; returns its pid."""
        raise NotImplementedError

    def cleanup(self, state: State) -> None:
        """Remove anything the handler made outside the cgroup and the state dir."""


def select_handler_name(config: dict[str, Any]) -> str:
    """Which handler a config asks for. Enclave containers are recognised by rune's settings (ENCLAVE_TYPE in
    the process env, or the enclave.type annotation)."""
    from clave.enclave.config import is_enclave

    return "enclave" if is_enclave(config) else "native"


def handler_for(config: dict[str, Any], name: str | None = None) -> Handler:
    name = name or select_handler_name(config)
    target = HANDLERS.get(name)
    if target is None:
        from clave.errors import ClaveError

        raise ClaveError(f"unknown container handler {name!r} (known: {', '.join(sorted(HANDLERS))})")
    module_name, _, cls_name = target.partition(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    handler: Handler = cls()
    return handler
