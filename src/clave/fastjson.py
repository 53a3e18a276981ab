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


class JSONDecodeError(ValueError):
    pass


# Longer integers are no number any JSON reader on the other side (Go, runc) could hold; refusing them here also
# keeps Python's own digit limit (and its message) out of the way.
_MAX_INT_DIGITS = 40


def _parse_int(text: str) -> int:
    if len(text) > _MAX_INT_DIGITS:
        raise JSONDecodeError(f"number {text[:20]}... has {len(text)} digits, too many")
    return int(text)


class _ScannerContext:
    """The attributes ``_json.make_scanner`` reads, with json.loads' defaults (and a bound on integers)."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = staticmethod(_parse_int)
    memo: dict[str, str] = {}

    @staticmethod
    def parse_constant(name: str) -> float:
        return {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}[name]


_WHITESPACE = " \t\n\r"


def loads(data: str | bytes) -> Any:
    """Parse JSON; every malformed input (bad syntax, not UTF-8, nested beyond the parser's recursion limit,
    absurd integers) raises JSONDecodeError with a one-line description."""
    if _json is None:
        import json

        try:
            return json.loads(data)
        except RecursionError:
            raise JSONDecodeError("nested too deeply") from None
    try:
        if isinstance(data, bytes):
            # What decode("utf-8-sig") does, without importing that codec's module on every start.
            text = (data[3:] if data.startswith(b"\xef\xbb\xbf") else data).decode("utf-8")
        else:
            text = data
    except UnicodeDecodeError as exc:
        raise JSONDecodeError(f"not UTF-8 text (byte {exc.start})") from None
    scan = _json.make_scanner(_ScannerContext)  # type: ignore[arg-type]
    start = len(text) - len(text.lstrip(_WHITESPACE))
    try:
        value, end = scan(text, start)
    except StopIteration as exc:
        raise JSONDecodeError(f"Expecting value: char {exc.value}") from None
    except RecursionError:
        raise JSONDecodeError("nested too deeply") from None
    except JSONDecodeError:
        raise
    except (ValueError, SystemError):
        # _json builds its error from json.decoder, and fails with SystemError when that is not yet
        # imported: let the standard module describe the error (only the error path pays for it).
        import json

        try:
            json.loads(text)
        except RecursionError:
            raise JSONDecodeError("nested too deeply") from None
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
