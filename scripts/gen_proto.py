#!/usr/bin/env python3
"""Generate Clave's protobuf message modules from protos/*.proto.

Parses the subset of proto3 that containerd's shim, event, metrics and ttrpc definitions use (messages with
scalar, enum, message, repeated and map fields; top-level enums; services; options are read and ignored) and
writes one module per proto package into src/clave/proto/generated/, plus a registry of full message names
used by ``Any.unpack``. Each message class gets a specialised encode() and decoder, so no reflection runs on
the hot path.

    python scripts/gen_proto.py          # regenerate
    python scripts/gen_proto.py --check  # exit 1 if the committed modules are stale
"""

from __future__ import annotations

import argparse
import keyword
import re
import sys
from pathlib import Path

GENERATOR_VERSION = "1"
ROOT = Path(__file__).resolve().parents[1]
PROTO_DIR = ROOT / "protos"
OUT_DIR = ROOT / "src" / "clave" / "proto" / "generated"

# Hand-written behaviour mixed into well-known types (module, class).
MIXINS = {
    "google.protobuf.Any": ("clave.proto._wkt", "AnyMixin"),
    "google.protobuf.Timestamp": ("clave.proto._wkt", "TimestampMixin"),
    "google.rpc.Status": ("clave.proto._wkt", "StatusMixin"),
}

VARINT_TYPES = {"int32", "int64", "uint32", "uint64", "sint32", "sint64", "bool"}
FIXED32_TYPES = {"fixed32", "sfixed32", "float"}
FIXED64_TYPES = {"fixed64", "sfixed64", "double"}
SCALARS = VARINT_TYPES | FIXED32_TYPES | FIXED64_TYPES | {"string", "bytes"}
PY_TYPES = {"string": "str", "bytes": "bytes", "bool": "bool", "float": "float", "double": "float"}
DEFAULTS = {"string": '""', "bytes": 'b""', "bool": "False", "float": "0.0", "double": "0.0"}
# Varint post-processing that turns the raw unsigned 64-bit value into the field's value.
VARINT_DECODE = {
    "uint64": "{v}",
    "uint32": "{v} & 0xFFFFFFFF",
    "int64": "_w.to_int64({v})",
    "int32": "_w.to_int32({v})",
    "enum": "_w.to_int32({v})",
    "sint64": "_w.unzigzag({v})",
    "sint32": "_w.to_int32(_w.unzigzag({v}))",
    "bool": "{v} != 0",
}


SHADOWED = {"list", "dict", "str", "int", "bool", "bytes", "float", "None"}


class ProtoError(Exception):
    pass


# --- parsing -------------------------------------------------------------------------------------------------

_TOKEN = re.compile(
    r"""\s+|//[^\n]*|/\*.*?\*/|(?P<tok>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|[A-Za-z_][\w.]*|\.[A-Za-z_][\w.]*|-?\d[\w.]*|[{}()\[\]<>;=,])""",
    re.S,
)


def tokenize(text: str, name: str) -> list[str]:
    tokens = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            line = text.count("\n", 0, pos) + 1
            raise ProtoError(f"{name}:{line}: unexpected character {text[pos]!r}")
        if m.group("tok"):
            tokens.append(m.group("tok"))
        pos = m.end()
    return tokens


class Field:
    def __init__(self, name: str, number: int, type_name: str, label: str, key_type: str = "") -> None:
        self.name = name
        self.number = number
        self.type_name = type_name  # scalar name, or a reference resolved later to a full name
        self.label = label  # "", "repeated" or "map"
        self.key_type = key_type
        self.kind = ""  # "scalar", "enum" or "message", set by resolve()
        self.attr = name + "_" if keyword.iskeyword(name) else name


class MessageDef:
    def __init__(self, package: str, name: str) -> None:
        self.package = package
        self.name = name
        self.full_name = f"{package}.{name}" if package else name
        self.fields: list[Field] = []


class EnumDef:
    def __init__(self, package: str, name: str) -> None:
        self.package = package
        self.name = name
        self.full_name = f"{package}.{name}" if package else name
        self.values: list[tuple[str, int]] = []


class ServiceDef:
    def __init__(self, package: str, name: str) -> None:
        self.package = package
        self.name = name
        self.full_name = f"{package}.{name}" if package else name
        self.methods: list[tuple[str, str, str, bool, bool]] = []  # name, request, response, client/server stream


class ProtoFile:
    def __init__(self, path: str) -> None:
        self.path = path
        self.package = ""
        self.messages: list[MessageDef] = []
        self.enums: list[EnumDef] = []
        self.services: list[ServiceDef] = []


class Parser:
    def __init__(self, tokens: list[str], path: str) -> None:
        self.tokens = tokens
        self.pos = 0
        self.file = ProtoFile(path)

    def peek(self) -> str:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else ""

    def next(self) -> str:
        if self.pos >= len(self.tokens):
            raise ProtoError(f"{self.file.path}: unexpected end of file")
        tok = self.tokens[self.pos]
        self.pos += 1
        return tok

    def expect(self, want: str) -> None:
        got = self.next()
        if got != want:
            raise ProtoError(f"{self.file.path}: expected {want!r}, found {got!r}")

    def skip_statement(self) -> None:
        """Skip to the end of a statement (``option ...;``), balancing brackets."""
        depth = 0
        while True:
            tok = self.next()
            if tok in "{[(":
                depth += 1
            elif tok in "}])":
                depth -= 1
            elif tok == ";" and depth == 0:
                return

    def skip_field_options(self) -> None:
        if self.peek() == "[":
            depth = 0
            while True:
                tok = self.next()
                if tok == "[":
                    depth += 1
                elif tok == "]":
                    depth -= 1
                    if depth == 0:
                        return

    def parse(self) -> ProtoFile:
        while self.pos < len(self.tokens):
            tok = self.next()
            if tok == "syntax":
                self.expect("=")
                if self.next().strip("\"'") != "proto3":
                    raise ProtoError(f"{self.file.path}: only proto3 is supported")
                self.expect(";")
            elif tok == "package":
                self.file.package = self.next()
                self.expect(";")
            elif tok in ("import", "option"):
                self.skip_statement()
            elif tok == "message":
                self.file.messages.append(self.parse_message())
            elif tok == "enum":
                self.file.enums.append(self.parse_enum())
            elif tok == "service":
                self.file.services.append(self.parse_service())
            elif tok == ";":
                continue
            else:
                raise ProtoError(f"{self.file.path}: unexpected {tok!r} at top level")
        return self.file

    def parse_message(self) -> MessageDef:
        msg = MessageDef(self.file.package, self.next())
        self.expect("{")
        while (tok := self.next()) != "}":
            if tok in ("option", "reserved", "extensions"):
                self.skip_statement()
            elif tok in ("message", "enum", "oneof", "group", "extend"):
                raise ProtoError(f"{self.file.path}: {tok} inside message {msg.name} is not supported")
            elif tok == ";":
                continue
            elif tok == "map":
                self.expect("<")
                key = self.next()
                self.expect(",")
                value = self.next()
                self.expect(">")
                msg.fields.append(self.parse_field_rest(value, "map", key))
            elif tok == "repeated":
                msg.fields.append(self.parse_field_rest(self.next(), "repeated"))
            elif tok == "optional":
                raise ProtoError(f"{self.file.path}: proto3 'optional' (field presence) is not supported")
            else:
                msg.fields.append(self.parse_field_rest(tok, ""))
        numbers = [f.number for f in msg.fields]
        if len(set(numbers)) != len(numbers):
            raise ProtoError(f"{self.file.path}: duplicate field number in {msg.name}")
        return msg

    def parse_field_rest(self, type_name: str, label: str, key_type: str = "") -> Field:
        name = self.next()
        self.expect("=")
        number = int(self.next(), 0)
        if not 1 <= number < 2**29:
            raise ProtoError(f"{self.file.path}: field number {number} out of range")
        self.skip_field_options()
        self.expect(";")
        if label == "map" and key_type not in SCALARS - {"bytes", "float", "double"}:
            raise ProtoError(f"{self.file.path}: invalid map key type {key_type}")
        if name in SHADOWED:
            raise ProtoError(f"{self.file.path}: field name {name!r} would shadow a builtin used in annotations")
        return Field(name, number, type_name, label, key_type)

    def parse_enum(self) -> EnumDef:
        enum = EnumDef(self.file.package, self.next())
        self.expect("{")
        while (tok := self.next()) != "}":
            if tok in ("option", "reserved"):
                self.skip_statement()
            elif tok != ";":
                self.expect("=")
                enum.values.append((tok, int(self.next(), 0)))
                self.skip_field_options()
                self.expect(";")
        return enum

    def parse_service(self) -> ServiceDef:
        service = ServiceDef(self.file.package, self.next())
        self.expect("{")
        while (tok := self.next()) != "}":
            if tok == "option":
                self.skip_statement()
            elif tok == "rpc":
                name = self.next()
                self.expect("(")
                client_stream = self.peek() == "stream"
                if client_stream:
                    self.next()
                request = self.next()
                self.expect(")")
                self.expect("returns")
                self.expect("(")
                server_stream = self.peek() == "stream"
                if server_stream:
                    self.next()
                response = self.next()
                self.expect(")")
                if self.peek() == "{":
                    self.next()
                    while self.peek() != "}":
                        self.skip_statement()
                    self.next()
                else:
                    self.expect(";")
                service.methods.append((name, request, response, client_stream, server_stream))
            elif tok != ";":
                raise ProtoError(f"{self.file.path}: unexpected {tok!r} in service {service.name}")
        return service


# --- name resolution -----------------------------------------------------------------------------------------


def module_name(package: str) -> str:
    return package.replace(".", "_") or "root"


class Schema:
    def __init__(self, files: list[ProtoFile]) -> None:
        self.files = files
        self.messages: dict[str, MessageDef] = {}
        self.enums: dict[str, EnumDef] = {}
        for f in files:
            for m in f.messages:
                self.add(m.full_name, self.messages, m)
            for e in f.enums:
                self.add(e.full_name, self.enums, e)

    def add(self, full_name: str, table: dict, item: object) -> None:
        if full_name in self.messages or full_name in self.enums:
            raise ProtoError(f"{full_name} is defined twice")
        table[full_name] = item

    def lookup(self, name: str, package: str) -> str:
        """Resolve a type reference the way protoc does: innermost package scope first."""
        if name.startswith("."):
            candidates = [name[1:]]
        else:
            scopes = package.split(".") if package else []
            candidates = [".".join(scopes[:i] + [name]) for i in range(len(scopes), -1, -1)]
        for candidate in candidates:
            if candidate in self.messages or candidate in self.enums:
                return candidate
        raise ProtoError(f"unknown type {name!r} referenced from package {package!r}")

    def resolve(self) -> None:
        for msg in self.messages.values():
            for field in msg.fields:
                if field.type_name in SCALARS:
                    field.kind = "scalar"
                    continue
                field.type_name = self.lookup(field.type_name, msg.package)
                field.kind = "message" if field.type_name in self.messages else "enum"
        for f in self.files:
            for service in f.services:
                service.methods = [
                    (name, self.lookup(req, f.package), self.lookup(resp, f.package), cs, ss)
                    for name, req, resp, cs, ss in service.methods
                ]


# --- code generation -----------------------------------------------------------------------------------------


def wire_type(type_name: str, kind: str) -> int:
    if kind == "message" or type_name in ("string", "bytes"):
        return 2
    if type_name in FIXED32_TYPES:
        return 5
    if type_name in FIXED64_TYPES:
        return 1
    return 0


def tag_bytes(number: int, wt: int, suffix: bytes = b"") -> str:
    """Python literal of a field's tag (plus ``suffix``), computed at generation time."""
    value = (number << 3) | wt
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return repr(bytes(out) + suffix)


def tag_int(number: int, wt: int) -> int:
    return (number << 3) | wt


STRUCT_CODES = {"fixed32": "I", "sfixed32": "i", "float": "f", "fixed64": "Q", "sfixed64": "q", "double": "d"}


class ModuleWriter:
    def __init__(self, schema: Schema, package: str, files: list[ProtoFile]) -> None:
        self.schema = schema
        self.package = package
        self.files = files
        self.imports: set[str] = set()
        self.lines: list[str] = []

    def ref(self, full_name: str) -> str:
        """Python expression naming a message or enum class."""
        item = self.schema.messages.get(full_name) or self.schema.enums[full_name]
        if item.package == self.package:
            return item.name
        mod = module_name(item.package)
        self.imports.add(mod)
        return f"_{mod}.{item.name}"

    def py_type(self, field: Field, type_name: str | None = None, kind: str | None = None) -> str:
        type_name = type_name or field.type_name
        kind = kind or field.kind
        if kind == "message":
            return self.ref(type_name)
        if kind == "enum":
            return "int"
        return PY_TYPES.get(type_name, "int")

    def default(self, type_name: str, kind: str) -> str:
        if kind == "message":
            return "None"
        return DEFAULTS.get(type_name, "0")

    def annotation(self, field: Field) -> str:
        if field.label == "repeated":
            return f"list[{self.py_type(field)}]"
        if field.label == "map":
            key = PY_TYPES.get(field.key_type, "int")
            return f"dict[{key}, {self.py_type(field)}]"
        if field.kind == "message":
            return f"{self.py_type(field)} | None"
        return self.py_type(field)

    # encoding ---------------------------------------------------------------------------------------------

    def encode_value(self, type_name: str, kind: str, var: str) -> str:
        """Expression giving the encoded bytes of one value (without its tag)."""
        if kind == "message":
            return f"_w.varint(len(_b := {var}.encode())) + _b"
        if type_name == "string":
            return f"_w.varint(len(_b := {var}.encode())) + _b"
        if type_name == "bytes":
            return f"_w.varint(len({var})) + {var}"
        if type_name == "bool":
            return f'(b"\\x01" if {var} else b"\\x00")'
        if type_name in ("sint32", "sint64"):
            return f"_w.varint(_w.zigzag({var}))"
        if type_name in STRUCT_CODES:
            return f"_w.pack_{type_name}({var})"
        return f"_w.varint({var})"

    def encode_field(self, field: Field) -> list[str]:
        var = f"self.{field.attr}"
        wt = wire_type(field.type_name, field.kind)
        if field.label == "map":
            key_expr = self.encode_value(field.key_type, "scalar", "_k")
            val_expr = self.encode_value(field.type_name, field.kind, "_v")
            key_tag = tag_bytes(1, wire_type(field.key_type, "scalar"))
            val_tag = tag_bytes(2, wt)
            if field.kind == "message":
                val_part = f"({val_tag} + {val_expr} if _v is not None else b\"\")"
            else:
                val_part = f"{val_tag} + {val_expr}"
            return [
                f"for _k, _v in {var}.items():",
                f"    _e = {key_tag} + {key_expr} + {val_part}",
                f"    _out.append({tag_bytes(field.number, 2)} + _w.varint(len(_e)) + _e)",
            ]
        if field.label == "repeated":
            if wt == 2:
                item = f"x_{field.name}"  # one name per field keeps each loop variable's type distinct
                encoded = self.encode_value(field.type_name, field.kind, item)
                return [f"for {item} in {var}:", f"    _out.append({tag_bytes(field.number, wt)} + {encoded})"]
            # proto3 packs repeated numeric fields
            if field.type_name in STRUCT_CODES:
                code = STRUCT_CODES[field.type_name]
                packed = f'_struct.pack(f"<{{len({var})}}{code}", *{var})'
                self.imports.add("struct")
            else:
                packed = f'b"".join([{self.encode_value(field.type_name, field.kind, "_x")} for _x in {var}])'
            return [
                f"if {var}:",
                f"    _p = {packed}",
                f"    _out.append({tag_bytes(field.number, 2)} + _w.varint(len(_p)) + _p)",
            ]
        tag = tag_bytes(field.number, wt)
        if field.kind == "message":
            encoded = self.encode_value(field.type_name, "message", var)
            return [f"if {var} is not None:", f"    _out.append({tag} + {encoded})"]
        if field.type_name == "bool":
            true_bytes = tag_bytes(field.number, wt, bytes([1]))
            return [f"if {var}:", f"    _out.append({true_bytes})"]
        return [f"if {var}:", f"    _out.append({tag} + {self.encode_value(field.type_name, field.kind, var)})"]

    # decoding ---------------------------------------------------------------------------------------------

    def decode_value(self, type_name: str, kind: str, target: str, pos: str = "_pos", end: str = "end") -> list[str]:
        """Statements reading one value at ``pos`` into ``target`` (and advancing ``pos``)."""
        if kind == "message":
            cls = self.ref(type_name)
            return [f"_s, {pos} = _w.read_length(buf, {pos}, {end})", f"{target} = {cls}._read(buf, _s, {pos})"]
        if type_name == "string":
            return [f"_s, {pos} = _w.read_length(buf, {pos}, {end})", f'{target} = str(buf[_s:{pos}], "utf-8")']
        if type_name == "bytes":
            return [f"_s, {pos} = _w.read_length(buf, {pos}, {end})", f"{target} = bytes(buf[_s:{pos}])"]
        if type_name in STRUCT_CODES:
            return [f"{target}, {pos} = _w.read_{type_name}(buf, {pos})"]
        post = VARINT_DECODE["enum" if kind == "enum" else type_name].format(v="_v")
        if post == "_v":
            return [f"{target}, {pos} = _w.read_varint(buf, {pos})"]
        return [f"_v, {pos} = _w.read_varint(buf, {pos})", f"{target} = {post}"]

    def decode_field(self, field: Field) -> list[tuple[int, list[str]]]:
        """(tag, statements) pairs: one per accepted wire encoding of the field."""
        local = f"f_{field.name}"
        wt = wire_type(field.type_name, field.kind)
        if field.label == "map":
            key_default = self.default(field.key_type, "scalar")
            val_default = self.default(field.type_name, field.kind)
            key_tag = tag_int(1, wire_type(field.key_type, "scalar"))
            val_tag = tag_int(2, wt)
            body = [
                "_s, _pos = _w.read_length(buf, _pos, end)",
                f"_mk, _mv, _q = {key_default}, {val_default}, _s",
                "while _q < _pos:",
                "    _t, _q = _w.read_varint(buf, _q)",
                f"    if _t == {key_tag}:",
                *["        " + s for s in self.decode_value(field.key_type, "scalar", "_mk", "_q", "_pos")],
                f"    elif _t == {val_tag}:",
                *["        " + s for s in self.decode_value(field.type_name, field.kind, "_mv", "_q", "_pos")],
                "    else:",
                "        _q = _w.skip_field(buf, _q, _pos, _t)",
                "if _q != _pos:",
                '    raise _w.DecodeError("map entry overruns its length")',
                # a map entry without its value holds the default: an empty message, not None
                f"{local}[_mk] = {self.ref(field.type_name)}() if _mv is None else _mv"
                if field.kind == "message" else f"{local}[_mk] = _mv",
            ]
            return [(tag_int(field.number, 2), body)]
        if field.label == "repeated":
            item = f"x_{field.name}"
            read = self.decode_value(field.type_name, field.kind, item)
            single = [*read, f"{local}.append({item})"]
            pairs = [(tag_int(field.number, wt), single)]
            if wt != 2:  # numeric: accept the packed form too
                if wt == 0:
                    reader = "_w.read_varint"
                    post = VARINT_DECODE["enum" if field.kind == "enum" else field.type_name].format(v="_y")
                else:
                    reader = f"_w.read_{field.type_name}"
                    post = "_y"
                extend = (
                    f"{local}.extend(_xs)" if post == "_y" else f"{local}.extend([{post} for _y in _xs])"
                )
                packed = [f"_xs, _pos = _w.read_packed(buf, _pos, end, {reader})", extend]
                pairs.append((tag_int(field.number, 2), packed))
            return pairs
        return [(tag_int(field.number, wt), self.decode_value(field.type_name, field.kind, local))]

    # classes ----------------------------------------------------------------------------------------------

    def write_enum(self, enum: EnumDef) -> None:
        self.lines += ["", "", f"class {enum.name}:", f'    """Enum {enum.full_name}."""', ""]
        for name, number in enum.values:
            self.lines.append(f"    {name} = {number}")
        names = ", ".join(f"{number}: {name!r}" for name, number in enum.values)
        self.lines.append(f"    NAMES: dict[int, str] = {{{names}}}")

    def write_message(self, msg: MessageDef) -> None:
        bases = "_Message"
        if msg.full_name in MIXINS:
            mod, cls = MIXINS[msg.full_name]
            bases = f"_{cls}, _Message"
            self.mixin_imports.append(f"from {mod} import {cls} as _{cls}")
        L = self.lines
        L += ["", "", f"class {msg.name}({bases}):", f'    """Message {msg.full_name}."""', ""]
        slots = ", ".join(repr(f.attr) for f in msg.fields)
        L.append(f"    __slots__ = ({slots}{',' if len(msg.fields) == 1 else ''})")
        L.append(f'    FULL_NAME = "{msg.full_name}"')
        if msg.fields:
            L.append("")
            for f in msg.fields:
                L.append(f"    {f.attr}: {self.annotation(f)}")
        # __init__
        L.append("")
        if msg.fields:
            params = []
            for f in msg.fields:
                if f.label:
                    params.append(f"{f.attr}: {self.annotation(f)} | None = None")
                else:
                    default = self.default(f.type_name, f.kind)
                    params.append(f"{f.attr}: {self.annotation(f)} = {default}")
            L.append(f"    def __init__(self, *, {', '.join(params)}) -> None:")
            for f in msg.fields:
                if f.label == "repeated":
                    L.append(f"        self.{f.attr} = [] if {f.attr} is None else {f.attr}")
                elif f.label == "map":
                    L.append(f"        self.{f.attr} = {{}} if {f.attr} is None else {f.attr}")
                else:
                    L.append(f"        self.{f.attr} = {f.attr}")
        else:
            L.append("    def __init__(self) -> None:")
            L.append("        pass")
        # encode
        L += ["", "    def encode(self) -> bytes:"]
        if msg.fields:
            L.append("        _out: list[bytes] = []")
            for f in sorted(msg.fields, key=lambda f: f.number):  # field order, as protoc's encoders emit
                L += ["        " + s for s in self.encode_field(f)]
            L.append('        return b"".join(_out)')
        else:
            L.append('        return b""')
        # decoder
        L += ["", "    @classmethod", "    def _read(cls, buf: bytes, _pos: int, end: int) -> Self:"]
        for f in msg.fields:
            if f.label == "repeated":
                init = "[]"
            elif f.label == "map":
                init = "{}"
            else:
                init = self.default(f.type_name, f.kind)
            L.append(f"        f_{f.name}: {self.annotation(f)} = {init}")
        L += [
            "        while _pos < end:",
            "            _t = buf[_pos]",
            "            if _t < 0x80:",
            "                _pos += 1",
            "            else:",
            "                _t, _pos = _w.read_varint(buf, _pos)",
        ]
        first = True
        for f in msg.fields:
            for tag, stmts in self.decode_field(f):
                L.append(f"            {'if' if first else 'elif'} _t == {tag}:")
                first = False
                L += ["                " + s for s in stmts]
        if first:
            L.append("            _pos = _w.skip_field(buf, _pos, end, _t)")
        else:
            L += ["            else:", "                _pos = _w.skip_field(buf, _pos, end, _t)"]
        L += [
            "        if _pos != end:",
            f'            raise _w.DecodeError("{msg.full_name}: field runs past the end of the message")',
            "        self = cls.__new__(cls)",
        ]
        for f in msg.fields:
            L.append(f"        self.{f.attr} = f_{f.name}")
        L.append("        return self")

    def write_service(self, service: ServiceDef) -> None:
        L = self.lines
        L += ["", "", f"class {service.name}Service:"]
        L += [f'    """Service {service.full_name}: method -> (request, response)."""', ""]
        L.append(f'    NAME = "{service.full_name}"')
        L.append("    METHODS: dict[str, tuple[type[_Message], type[_Message]]] = {")
        for name, req, resp, _cs, _ss in service.methods:
            L.append(f'        "{name}": ({self.ref(req)}, {self.ref(resp)}),')
        L.append("    }")
        streams = [(name, cs, ss) for name, _r, _p, cs, ss in service.methods if cs or ss]
        L.append("    # method -> (client streams, server streams), for the streaming methods only")
        entries = ", ".join(f"{n!r}: ({cs}, {ss})" for n, cs, ss in streams)
        L.append(f"    STREAMS: dict[str, tuple[bool, bool]] = {{{entries}}}")

    def render(self) -> str:
        self.mixin_imports: list[str] = []
        for f in self.files:
            for enum in f.enums:
                self.write_enum(enum)
        for f in self.files:
            for msg in f.messages:
                self.write_message(msg)
        for f in self.files:
            for service in f.services:
                self.write_service(service)
        sources = ", ".join(sorted(f.path for f in self.files))
        head = [
            f"# Generated by scripts/gen_proto.py version {GENERATOR_VERSION} from {sources}. Do not edit.",
            f'"""Protobuf package {self.package}."""',
            "",
            "# ruff: noqa: E501",
            "from __future__ import annotations",
            "",
        ]
        if "struct" in self.imports:
            head.append("import struct as _struct")
            head.append("")
        head.append("from clave.proto import _wire as _w")
        head.append("from clave.proto._message import Message as _Message")
        head += sorted(set(self.mixin_imports))
        for mod in sorted(self.imports - {"struct"}):
            head.append(f"from clave.proto.generated import {mod} as _{mod}")
        head += ["", "TYPE_CHECKING = False", "if TYPE_CHECKING:", "    from typing import Self"]
        return "\n".join(head + self.lines) + "\n"


def generate(proto_dir: Path = PROTO_DIR) -> dict[str, str]:
    """Map of output file name -> contents."""
    files = []
    for path in sorted(proto_dir.rglob("*.proto")):
        rel = path.relative_to(proto_dir.parent).as_posix()
        files.append(Parser(tokenize(path.read_text(), rel), rel).parse())
    schema = Schema(files)
    schema.resolve()
    by_package: dict[str, list[ProtoFile]] = {}
    for f in files:
        by_package.setdefault(f.package, []).append(f)
    out = {}
    registry = []
    for package, pfiles in sorted(by_package.items()):
        mod = module_name(package)
        out[f"{mod}.py"] = ModuleWriter(schema, package, pfiles).render()
        for f in pfiles:
            for m in f.messages:
                registry.append(f'    "{m.full_name}": ("clave.proto.generated.{mod}", "{m.name}"),')
    out["_registry.py"] = "\n".join(
        [
            f"# Generated by scripts/gen_proto.py version {GENERATOR_VERSION}. Do not edit.",
            "# ruff: noqa: E501",
            '"""Full protobuf message name -> (module, class), for Any.unpack (modules import lazily)."""',
            "",
            "MESSAGES: dict[str, tuple[str, str]] = {",
            *sorted(registry),
            "}",
        ]
    ) + "\n"
    out["__init__.py"] = (
        f"# Generated by scripts/gen_proto.py version {GENERATOR_VERSION}. Do not edit.\n"
        '"""Message classes generated from protos/ (one module per protobuf package)."""\n'
    )
    return out


def generate_text_module(text: str, name: str) -> str:
    """Module source for a single self-contained .proto text (used by tests to exercise every field type)."""
    proto = Parser(tokenize(text, name), name).parse()
    schema = Schema([proto])
    schema.resolve()
    return ModuleWriter(schema, proto.package, [proto]).render()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail if the generated modules are out of date")
    args = parser.parse_args(argv)
    try:
        outputs = generate()
    except ProtoError as e:
        print(f"gen_proto: {e}", file=sys.stderr)
        return 2
    existing = {p.name for p in OUT_DIR.glob("*.py")} if OUT_DIR.is_dir() else set()
    stale = sorted(
        name for name, text in outputs.items() if not (OUT_DIR / name).is_file() or (OUT_DIR / name).read_text() != text
    ) + sorted(existing - set(outputs))
    if args.check:
        if stale:
            print(f"gen_proto: out of date: {', '.join(stale)} (run scripts/gen_proto.py)", file=sys.stderr)
            return 1
        return 0
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for name, text in outputs.items():
        (OUT_DIR / name).write_text(text)
    for name in existing - set(outputs):
        (OUT_DIR / name).unlink()
    print(f"gen_proto: wrote {len(outputs)} modules to {OUT_DIR.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
