"""Generated protobuf messages: round trips, malformed input, well-known types, and byte-for-byte agreement with
Google's protobuf implementation (used here only as a reference, when it is installed)."""

from __future__ import annotations

import importlib
import importlib.util
import shutil
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from clave.proto import DecodeError, Message, message_class
from clave.proto._wire import read_varint, unzigzag, varint, zigzag
from clave.proto.generated import containerd_events as containerd_events
from clave.proto.generated import containerd_task_v2 as containerd_task_v2
from clave.proto.generated import google_protobuf as google_protobuf
from clave.proto.generated import io_containerd_cgroups_v1 as io_containerd_cgroups_v1
from clave.proto.generated._registry import MESSAGES

REPO = Path(__file__).resolve().parents[2]


def load_generator() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("gen_proto", REPO / "scripts" / "gen_proto.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_proto"] = module
    spec.loader.exec_module(module)
    return module


gen = load_generator()

SAMPLE = {
    "string": "v-é\u2603",
    "bytes": b"\x00\xff\x80data",
    "bool": True,
    "int32": -5,
    "int64": -(1 << 40),
    "uint32": 4_000_000_000,
    "uint64": (1 << 63) + 5,
    "sint32": -123,
    "sint64": -(1 << 50),
    "fixed32": 0xDEADBEEF,
    "fixed64": 1 << 60,
    "sfixed32": -7,
    "sfixed64": -(1 << 45),
    "float": 1.5,
    "double": -2.25,
}


def sample_value(schema: object, field: object, depth: int, builder: object) -> object:
    if field.kind == "message":  # type: ignore[attr-defined]
        return builder(field.type_name, depth + 1)  # type: ignore[attr-defined,operator]
    if field.kind == "enum":  # type: ignore[attr-defined]
        return 2
    return SAMPLE[field.type_name]  # type: ignore[attr-defined]


def build_ours(schema: object, full_name: str, depth: int = 0) -> Message:
    """A message of ``full_name`` with every field set to a non-default value (nested up to depth 3)."""
    cls = message_class(full_name)
    msg = cls()
    if depth > 3:
        return msg
    for field in schema.messages[full_name].fields:  # type: ignore[attr-defined]
        value = sample_value(schema, field, depth, lambda name, d: build_ours(schema, name, d))
        if field.label == "repeated":
            other = sample_value(schema, field, depth, lambda name, d: build_ours(schema, name, d + 1))
            value = [value, other]
        elif field.label == "map":
            value = {SAMPLE[field.key_type]: value}
        setattr(msg, field.attr, value)
    return msg


@pytest.fixture(scope="module")
def schema() -> object:
    paths = sorted((REPO / "protos").rglob("*.proto"))
    files = [gen.Parser(gen.tokenize(p.read_text(), p.name), p.name).parse() for p in paths]
    s = gen.Schema(files)
    s.resolve()
    return s


def test_generated_code_is_up_to_date() -> None:
    assert gen.main(["--check"]) == 0, "run scripts/gen_proto.py and commit src/clave/proto/generated"


def test_every_message_round_trips_with_non_default_values(schema: object) -> None:
    assert set(MESSAGES) == set(schema.messages)  # type: ignore[attr-defined]
    for full_name in MESSAGES:
        msg = build_ours(schema, full_name)
        data = msg.encode()
        if schema.messages[full_name].fields:  # type: ignore[attr-defined]
            assert data, full_name
        back = type(msg).decode(data)
        assert back == msg, full_name
        assert back.encode() == data, full_name
        assert type(msg).decode(b"") == type(msg)(), full_name


def test_known_encoding_and_defaults_are_omitted() -> None:
    req = containerd_task_v2.KillRequest(id="c1", signal=9, all=True)
    assert req.encode() == b"\n\x02c1\x18\x09\x20\x01"
    assert containerd_task_v2.KillRequest().encode() == b""
    assert repr(req) == "KillRequest(id='c1', signal=9, all=True)"
    assert containerd_task_v2.KillRequest.decode(b"\n\x02c1\x18\x09\x20\x01") == req
    assert req != containerd_task_v2.KillRequest(id="c1", signal=15, all=True)


def test_unknown_fields_are_skipped() -> None:
    # field 15 varint, field 16 length-delimited, field 17 fixed64, field 18 fixed32, group 19, then known id
    extra = b"\x78\x96\x01" + b"\x82\x01\x03abc" + b"\x89\x01" + bytes(8) + b"\x95\x01" + bytes(4)
    extra += b"\x9b\x01\x08\x01\x9c\x01"
    data = extra + b"\n\x02c1"
    assert containerd_task_v2.StateRequest.decode(data) == containerd_task_v2.StateRequest(id="c1")


def test_packed_and_unpacked_repeated_are_both_accepted() -> None:
    packed = io_containerd_cgroups_v1.CPUUsage(per_cpu=[1, 300, 1 << 40]).encode()
    assert packed == b"\x22\x09\x01\xac\x02\x80\x80\x80\x80\x80\x20"
    unpacked = b"\x20\x01\x20\xac\x02\x20\x80\x80\x80\x80\x80\x20"
    assert io_containerd_cgroups_v1.CPUUsage.decode(unpacked).per_cpu == [1, 300, 1 << 40]


@pytest.mark.parametrize(
    "data",
    [
        b"\n\x05ab",  # string runs past the end
        b"\x18",  # varint missing
        b"\x18\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",  # varint longer than 10 bytes
        b"\n\x02\xff\xfe",  # invalid UTF-8
        b"\x0f",  # wire type 7
        b"\x00\x01",  # field number 0
        b"\x79\x01\x02",  # fixed64 truncated
        b"\x1b\x08\x01",  # unterminated group
    ],
)
def test_malformed_input_raises_decode_error(data: bytes) -> None:
    with pytest.raises(DecodeError):
        containerd_task_v2.KillRequest.decode(data)


def test_nested_length_overrun_is_detected() -> None:
    # WaitResponse.exited_at (field 2) claims 2 bytes but its varint continues past them
    with pytest.raises(DecodeError):
        containerd_task_v2.WaitResponse.decode(b"\x12\x02\x08\x80\x08\x01")


def test_varint_and_zigzag() -> None:
    for value in (0, 1, 127, 128, 300, (1 << 64) - 1):
        assert read_varint(varint(value), 0) == (value, len(varint(value)))
    assert varint(-1) == b"\xff" * 9 + b"\x01"
    for value in (0, -1, 1, -(1 << 63), (1 << 63) - 1):
        assert unzigzag(zigzag(value)) == value
    assert zigzag(-1) == 1 and zigzag(1) == 2


def test_any_pack_unpack_and_timestamp() -> None:
    event = containerd_events.TaskExit(container_id="c", pid=42, exit_status=137, exited_at=None)
    packed = google_protobuf.Any.pack(event)
    assert packed.type_url == "containerd.events.TaskExit"
    assert packed.is_type(containerd_events.TaskExit)
    assert packed.unpack() == event
    google = google_protobuf.Any.pack(event, prefix="type.googleapis.com/")
    assert google.type_name == "containerd.events.TaskExit" and google.unpack() == event
    with pytest.raises(DecodeError, match="unknown message type"):
        google_protobuf.Any(type_url="types.containerd.io/opencontainers/runtime-spec/1/Spec", value=b"{}").unpack()
    ts = google_protobuf.Timestamp.from_ns(1_700_000_000_123_456_789)
    assert (ts.seconds, ts.nanos) == (1_700_000_000, 123_456_789)
    assert ts.to_ns() == 1_700_000_000_123_456_789
    assert google_protobuf.Timestamp.decode(ts.encode()) == ts


def test_generator_rejects_unsupported_constructs(tmp_path: Path) -> None:
    with pytest.raises(gen.ProtoError, match="oneof"):
        gen.Parser(gen.tokenize('syntax = "proto3"; message A { oneof x { string a = 1; } }', "t"), "t").parse()
    with pytest.raises(gen.ProtoError, match="unknown type"):
        files = [gen.Parser(gen.tokenize('syntax = "proto3"; message A { Missing m = 1; }', "t"), "t").parse()]
        gen.Schema(files).resolve()


# --- cross-check against Google's implementation ---------------------------------------------------------------

ALL_SCALARS_PROTO = """
syntax = "proto3";
package clavetest.scalars;

enum Color { RED = 0; GREEN = 1; BLUE = 2; }

message Inner { string name = 1; }

message AllTypes {
  int32 f_int32 = 1; int64 f_int64 = 2; uint32 f_uint32 = 3; uint64 f_uint64 = 4;
  sint32 f_sint32 = 5; sint64 f_sint64 = 6; fixed32 f_fixed32 = 7; fixed64 f_fixed64 = 8;
  sfixed32 f_sfixed32 = 9; sfixed64 f_sfixed64 = 10; float f_float = 11; double f_double = 12;
  bool f_bool = 13; string f_string = 14; bytes f_bytes = 15; Color f_enum = 16; Inner f_inner = 17;
  repeated int32 r_int32 = 21; repeated sint64 r_sint64 = 22; repeated fixed32 r_fixed32 = 23;
  repeated double r_double = 24; repeated bool r_bool = 25; repeated Color r_enum = 26;
  repeated string r_string = 27; repeated Inner r_inner = 28; repeated sfixed64 r_sfixed64 = 29;
  map<string, Inner> m_inner = 30; map<int32, string> m_int = 31; map<uint64, bytes> m_bytes = 32;
  uint32 f_big_number = 536870911;
}
"""


@pytest.fixture(scope="module")
def official(tmp_path_factory: pytest.TempPathFactory) -> Iterator[types.SimpleNamespace]:
    pytest.importorskip("google.protobuf", reason="Google's protobuf is not installed (reference only)")
    protoc = pytest.importorskip("grpc_tools.protoc", reason="grpcio-tools is not installed (reference only)")
    include = Path(protoc.__file__).parent / "_proto"
    out = tmp_path_factory.mktemp("pb")
    src = tmp_path_factory.mktemp("protos")
    # our copies of the google.* protos would shadow the installed ones: compile against protoc's instead
    for path in (REPO / "protos").rglob("*.proto"):
        rel = path.relative_to(REPO / "protos")
        if rel.parts[:2] != ("google", "protobuf"):
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, src / rel)
    (src / "clavetest").mkdir()
    (src / "clavetest" / "scalars.proto").write_text(ALL_SCALARS_PROTO)
    files = [p.relative_to(src).as_posix() for p in src.rglob("*.proto")]
    cmd = [sys.executable, "-m", "grpc_tools.protoc", f"-I{src}", f"-I{include}", f"--python_out={out}", *files]
    subprocess.run(cmd, check=True, capture_output=True)
    sys.path.insert(0, str(out))
    for py in sorted(out.rglob("*_pb2.py")):
        name = py.relative_to(out).with_suffix("").as_posix().replace("/", ".")
        if name.startswith("clave."):  # protos/clave/ would import as the clave package itself: load it aside
            spec = importlib.util.spec_from_file_location(f"_pb_{name.replace('.', '_')}", py)
            assert spec is not None and spec.loader is not None
            spec.loader.exec_module(importlib.util.module_from_spec(spec))
        else:
            importlib.import_module(name)
    from google.protobuf import symbol_database

    db = symbol_database.Default()
    ours = gen.generate_text_module(ALL_SCALARS_PROTO, "clavetest/scalars.proto")
    namespace: dict[str, object] = {}
    exec(compile(ours, "clavetest_scalars.py", "exec"), namespace)
    yield types.SimpleNamespace(db=db, scalars=namespace)
    sys.path.remove(str(out))


def fill_official(pb: object, schema: object, full_name: str, depth: int = 0) -> None:
    if depth > 3:
        return
    for field in schema.messages[full_name].fields:  # type: ignore[attr-defined]

        def value(d: int, field: object = field) -> object:
            if field.kind == "enum":  # type: ignore[attr-defined]
                return 2
            return SAMPLE[field.type_name]  # type: ignore[attr-defined]

        target = getattr(pb, field.name)
        if field.label == "map":
            key = SAMPLE[field.key_type]
            if field.kind == "message":
                fill_official(target[key], schema, field.type_name, depth + 1)
            else:
                target[key] = value(depth)
        elif field.label == "repeated":
            if field.kind == "message":
                fill_official(target.add(), schema, field.type_name, depth + 1)
                fill_official(target.add(), schema, field.type_name, depth + 2)
            else:
                target.extend([value(depth), value(depth)])
        elif field.kind == "message":
            target.SetInParent()
            fill_official(target, schema, field.type_name, depth + 1)
        else:
            setattr(pb, field.name, value(depth))


def test_every_message_matches_google_protobuf_byte_for_byte(schema: object, official: types.SimpleNamespace) -> None:
    checked = 0
    for full_name in MESSAGES:
        ours = build_ours(schema, full_name)
        theirs = official.db.GetSymbol(full_name)()
        fill_official(theirs, schema, full_name)
        reference = theirs.SerializeToString(deterministic=True)
        assert ours.encode() == reference, full_name
        assert type(ours).decode(reference) == ours, full_name
        checked += 1
    assert checked == len(MESSAGES)


def test_all_scalar_types_match_google_protobuf(official: types.SimpleNamespace) -> None:
    files = [gen.Parser(gen.tokenize(ALL_SCALARS_PROTO, "t"), "t").parse()]
    s = gen.Schema(files)
    s.resolve()
    AllTypes = official.scalars["AllTypes"]
    Inner = official.scalars["Inner"]
    ours = AllTypes()
    for field in s.messages["clavetest.scalars.AllTypes"].fields:
        if field.kind == "message":
            value: object = Inner(name=SAMPLE["string"])
        elif field.kind == "enum":
            value = 2
        else:
            value = SAMPLE[field.type_name]
        if field.label == "repeated":
            value = [value, value]
        elif field.label == "map":
            value = {SAMPLE[field.key_type]: value}
        setattr(ours, field.attr, value)
    theirs = official.db.GetSymbol("clavetest.scalars.AllTypes")()
    fill_official(theirs, s, "clavetest.scalars.AllTypes")
    reference = theirs.SerializeToString(deterministic=True)
    assert ours.encode() == reference
    assert AllTypes.decode(reference) == ours
    # and Google's parser reads ours back to the same message
    again = official.db.GetSymbol("clavetest.scalars.AllTypes")()
    again.ParseFromString(ours.encode())
    assert again == theirs
