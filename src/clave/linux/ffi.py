"""The C library's functions, for the system calls Python 3.11 lacks, straight from ``_ctypes``.

``import ctypes`` costs about 12 M instructions (3-4 ms on this project's machines) on every container
start: its Python layer builds dozens of types, caches and function pointers at import, while the runtime needs
a handful of libc functions and plain buffers. This module gives exactly that part of ctypes' API, built on
the same C extension (``_ctypes``): the simple types below, ``Structure``, ``create_string_buffer``,
``addressof``, ``byref``, ``sizeof``, ``get_errno`` and libc's functions with ``use_errno`` (``function``).
Calls behave as through ``ctypes.CDLL(None, use_errno=True)``: an int argument is a C ``int`` unless wrapped
in one of the types, bytes are ``char *``, None is NULL, and the result is a C ``int`` unless asked otherwise.
For type checkers it is ctypes itself.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from ctypes import (
        CDLL,
        Array,
        Structure,
        addressof,
        byref,
        c_char,
        c_int,
        c_long,
        c_size_t,
        c_uint,
        c_uint32,
        c_uint64,
        c_ulong,
        create_string_buffer,
        get_errno,
        sizeof,
    )
    from typing import Any

    def function(name: str, restype: type[Any] = ...) -> Any: ...

    def libc() -> CDLL: ...

else:
    import _ctypes
    from _ctypes import Array, Structure, addressof, byref, get_errno, sizeof

    class c_char(_ctypes._SimpleCData):
        _type_ = "c"

    class c_int(_ctypes._SimpleCData):
        _type_ = "i"

    class c_uint(_ctypes._SimpleCData):
        _type_ = "I"

    class c_long(_ctypes._SimpleCData):
        _type_ = "l"

    class c_ulong(_ctypes._SimpleCData):
        _type_ = "L"

    c_size_t = c_ulong  # LP64 (x86_64, arm64), as ctypes defines them there
    c_uint64 = c_ulong
    c_uint32 = c_uint

    def create_string_buffer(init, size=None):
        """ctypes.create_string_buffer: a mutable char array holding ``init`` (bytes), or ``init`` zero bytes."""
        if isinstance(init, bytes):
            buf = (c_char * (len(init) + 1 if size is None else size))()
            buf.value = init
            return buf
        if isinstance(init, int):
            return (c_char * init)()
        raise TypeError(init)

    class _Libc:
        """What ctypes.CDLL(None, use_errno=True) is, for the functions asked for by name."""

        _handle = _ctypes.dlopen(None, 0)  # RTLD_LOCAL: ctypes' default mode

        def __getattr__(self, name):
            fn = function(name)
            setattr(self, name, fn)
            return fn

    _LIBC = _Libc()
    _function_types = {}
    _functions = {}

    def function(name, restype=c_int):
        """libc's ``name`` as a callable that records errno (read it with get_errno) and returns ``restype``."""
        fn = _functions.get((name, restype))
        if fn is None:
            kind = _function_types.get(restype)
            if kind is None:
                kind = _function_types[restype] = type(_ctypes.CFuncPtr)("_Function", (_ctypes.CFuncPtr,), {
                    "_flags_": _ctypes.FUNCFLAG_CDECL | _ctypes.FUNCFLAG_USE_ERRNO, "_restype_": restype})
            fn = _functions[(name, restype)] = kind((name, _LIBC))
        return fn

    def libc():
        """The C library, its functions as attributes (ctypes.CDLL(None, use_errno=True)'s way)."""
        return _LIBC


__all__ = [
    "Array", "Structure", "addressof", "byref", "c_char", "c_int", "c_long", "c_size_t", "c_uint", "c_uint32",
    "c_uint64", "c_ulong", "create_string_buffer", "function", "get_errno", "libc", "sizeof",
]
