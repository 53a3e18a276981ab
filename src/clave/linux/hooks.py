"""OCI hooks: run each with the container state on stdin, its own args and env, and its timeout."""

from __future__ import annotations

from clave import fastjson

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any


class HookError(Exception):
    """A hook failed or timed out; one line naming the hook kind, index and path."""


def run_hooks(kind: str, hooks: list[dict[str, Any]], state: dict[str, Any],
              warn: Callable[[str], None] | None = None) -> None:
    """Run ``hooks`` in order. Without ``warn`` the first failure raises HookError; with it (poststart and
    poststop: runtime.md says the remaining hooks and the lifecycle go on) each failure is reported through
    ``warn`` and the next hook runs."""
    if not hooks:
        return
    payload = fastjson.dumps(state).encode()
    for index, hook in enumerate(hooks):
        try:
            _run_one(kind, index, hook, payload)
        except HookError as exc:
            if warn is None:
                raise
            warn(f"error running {exc}")


def _run_one(kind: str, index: int, hook: dict[str, Any], payload: bytes) -> None:
    import subprocess  # only paid for when there are hooks

    path = hook["path"]
    args = hook.get("args") or [path]
    try:
        result = subprocess.run(
            args,
            executable=path,
            input=payload,
            env=_env(hook.get("env", [])),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=hook.get("timeout"),
            close_fds=True,
        )
    except subprocess.TimeoutExpired:
        raise HookError(f"{kind} hook #{index} ({path}) timed out after {hook['timeout']}s") from None
    except OSError as exc:
        raise HookError(f"{kind} hook #{index} ({path}): {exc.strerror}") from None
    if result.returncode != 0:
        detail = result.stderr.decode(errors="replace").strip().splitlines()
        why = f"exit status {result.returncode}" if result.returncode > 0 else f"signal {-result.returncode}"
        tail = f": {detail[-1]}" if detail else ""
        raise HookError(f"{kind} hook #{index} ({path}) failed with {why}{tail}")


def _env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        env[key] = value
    return env
