"""JSON for the hot path, straight from CPython's C accelerator (``_json``).

``import json`` pulls in ``re`` and ``enum`` (about 10 ms on these machines) only for its pure-Python
fallbacks; every container start reads config.json and writes state, so the runtime's hot path uses the same
C scanner and encoder directly. Output is identical to ``json.dumps`` with default settings (compact
separators optional). Pretty-printing stays with the ``json`` module, off the hot path.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

try:
    import _json
except ImportError:  # another Python implementation: use the standard module
    _json = None  # type: ignore[assignment]


class _ScannerContext:
    """The attributes ``_json.make_scanner`` reads, with json.loads' defaults."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    memo: dict[str, str] = {}

    @staticmethod
    def parse_constant(name: str) -> float:
        return {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}[name]


_WHITESPACE = " \t\n\r"


class JSONDecodeError(ValueError):
    pass


def loads(data: str | bytes) -> Any:
    if _json is None:
        import json

        return json.loads(data)
    text = data.decode("utf-8-sig") if isinstance(data, bytes) else data
    scan = _json.make_scanner(_ScannerContext)  # type: ignore[arg-type]
    start = len(text) - len(text.lstrip(_WHITESPACE))
    try:
        value, end = scan(text, start)
    except StopIteration as exc:
        raise JSONDecodeError(f"Expecting value: char {exc.value}") from None
    except (ValueError, SystemError):
        # _json builds its error from json.decoder, and fails with SystemError when that is not yet
        # imported: let the standard module describe the error (only the error path pays for it).
        import json

        try:
            json.loads(text)
        except ValueError as exc:
            raise JSONDecodeError(str(exc)) from None
        raise
    finally:
        _ScannerContext.memo.clear()
    rest = text[end:].strip(_WHITESPACE)
    if rest:
        raise JSONDecodeError(f"Extra data: char {end}")
    return value


def dumps(obj: Any, compact: bool = False) -> str:
    if _json is None:
        import json

        return json.dumps(obj, separators=(",", ":") if compact else None)

    def unsupported(o: Any) -> Any:
        raise TypeError(f"Object of type {type(o).__name__} is not JSON serializable")

    encoder = _json.make_encoder(
        {}, unsupported, _json.encode_basestring_ascii, None,
        ":" if compact else ": ", "," if compact else ", ", False, False, True,
    )
    return "".join(encoder(obj, 0))


def dumps_indented(obj: Any, indent: str = "  ", _level: int = 0) -> str:
    """``json.dumps(obj, indent=2)``'s output (what runc's state prints), built on the C encoder for scalars."""
    pad = indent * (_level + 1)
    if isinstance(obj, dict) and obj:
        items = [f"{pad}{dumps(str(k))}: {dumps_indented(v, indent, _level + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + indent * _level + "}"
    if isinstance(obj, list) and obj:
        items = [pad + dumps_indented(v, indent, _level + 1) for v in obj]
        return "[\n" + ",\n".join(items) + "\n" + indent * _level + "]"
    return dumps(obj)
