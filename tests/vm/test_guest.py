"""The guest builder: idempotent, reproducible, and its parts (cpio writer, module order, kernel extraction)."""

from __future__ import annotations

import io
import json
import os
import shutil

import pytest

from clave.vm.cpio import CpioWriter
from clave.vm.guest import Guest, build_guest


def test_second_build_does_nothing_and_gives_the_same_digests(guest: Guest) -> None:
    messages: list[str] = []
    again = build_guest(progress=messages.append)
    assert again.digests() == guest.digests()
    assert not any(m.startswith(("downloading", "packing")) for m in messages), messages
    assert any(m.startswith("up to date") for m in messages)


def test_manifest_records_every_digest(guest: Guest) -> None:
    with open(os.path.join(guest.directory, "manifest.json")) as f:
        manifest = json.load(f)
    assert set(manifest["outputs"]) == {"kernel", "initramfs", "image", "bzimage"}
    assert manifest["agent"]["sha256"] == guest.digests()["agent"]
    assert manifest["kernel_release"].endswith("-cloud-amd64")
    assert {"virtio_mmio", "virtio_blk", "virtio_console", "virtio_net", "virtiofs"} <= set(manifest["modules"])
    assert all(len(p["sha256"]) == 64 for p in manifest["packages"].values())


def test_same_inputs_give_the_same_outputs(guest: Guest, tmp_path: object) -> None:
    dirs = [os.path.join(str(tmp_path), name) for name in ("one", "two")]
    try:
        builds = [build_guest(d, force=True) for d in dirs]
        assert builds[0].digests() == builds[1].digests()
        assert builds[0].digests() == guest.digests()
    finally:
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)


def test_kernel_is_an_elf_with_the_pvh_note(guest: Guest) -> None:
    with open(guest.kernel, "rb") as f:
        head = f.read(4)
    assert head == b"\x7fELF"


def test_cpio_is_deterministic_and_newc() -> None:
    def pack() -> bytes:
        out = io.BytesIO()
        w = CpioWriter(out, mtime=7)
        w.directory("a")
        w.file("a/f", b"data", 0o640)
        w.symlink("a/l", "f")
        w.char_device("console", 5, 1)
        w.close()
        return out.getvalue()

    data = pack()
    assert data == pack()
    assert data.startswith(b"070701")
    assert len(data) % 512 == 0
    assert b"TRAILER!!!" in data


def test_build_fails_with_one_line_without_tools(monkeypatch: pytest.MonkeyPatch) -> None:
    from clave.vm.errors import BuildError

    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(BuildError, match="not found: install Debian's"):
        build_guest()


def test_out_that_is_not_a_guest_build_is_refused_untouched(guest: Guest, tmp_path: object) -> None:
    from clave.vm.errors import BuildError

    out = os.path.join(str(tmp_path), "precious")
    os.makedirs(out)
    with open(os.path.join(out, "notes.txt"), "w") as f:
        f.write("mine")
    with pytest.raises(BuildError, match="not a guest build"):
        build_guest(out)
    assert os.listdir(out) == ["notes.txt"]
    assert sorted(os.listdir(str(tmp_path))) == ["precious"]  # no build directory left beside it
