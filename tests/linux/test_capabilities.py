"""Capabilities applied in forked children, checked against /proc/self/status and privileged operations."""

from __future__ import annotations

import ctypes
import errno
import os
import socket
from pathlib import Path
from typing import Any

import pytest
from forkchild import run_in_child

from clave.linux import capabilities as caps

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

RUNC_DEFAULT = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]
CLONE_NEWUTS = 0x04000000


def mask(*names: str) -> int:
    return sum(1 << caps.CAPABILITIES[name] for name in names)


def require(*names: str) -> None:
    have = caps.current()["CapEff"]
    missing = [name for name in names if not have & mask(name)]
    if missing:
        pytest.skip(f"the test process lacks {', '.join(missing)}")


def _chown_errno(path: Path) -> int:
    try:
        os.chown(path, 4321, 4321)
    except OSError as exc:
        return exc.errno or 0
    return 0


def test_table_matches_the_kernel() -> None:
    assert caps.CAPABILITIES["CAP_CHOWN"] == 0
    assert caps.CAPABILITIES["CAP_SYS_ADMIN"] == 21
    assert caps.CAPABILITIES["CAP_CHECKPOINT_RESTORE"] == 40
    assert sorted(caps.CAPABILITIES.values()) == list(range(41))
    assert 36 <= caps.last_cap() <= 63


def test_unknown_name_is_an_error_naming_it() -> None:
    with pytest.raises(caps.CapabilityError, match="CAP_MAKE_COFFEE.*effective"):
        caps.parse({"bounding": ["CAP_KILL"], "effective": ["CAP_MAKE_COFFEE"]})


def test_capabilities_newer_than_the_kernel_are_skipped() -> None:
    def child() -> Any:
        caps._last_cap = 39  # as on a kernel before 5.9, which lacks CAP_CHECKPOINT_RESTORE
        sets = caps.parse({"bounding": ["CAP_KILL", "CAP_CHECKPOINT_RESTORE"]})
        return [sets["bounding"], sets.skipped]

    assert run_in_child(child).ok() == [mask("CAP_KILL"), ["CAP_CHECKPOINT_RESTORE"]]


def test_runc_default_set_is_applied_and_chown_is_refused(tmp_path: Path) -> None:
    require("CAP_SETPCAP", "CAP_CHOWN")
    target = tmp_path / "file"
    target.write_text("x")

    def child() -> Any:
        warnings = caps.apply(
            {name: RUNC_DEFAULT for name in ("bounding", "effective", "permitted", "ambient")}
        )
        return [caps.current(), warnings, _chown_errno(target)]

    status, warnings, chown = run_in_child(child).ok()
    expected = mask(*RUNC_DEFAULT)
    assert status["CapBnd"] == expected
    assert status["CapEff"] == expected
    assert status["CapPrm"] == expected
    assert status["CapInh"] == 0
    # Not inheritable, so the kernel refuses them in the ambient set: runc warns and goes on.
    assert status["CapAmb"] == 0 and len(warnings) == 3 and "CAP_KILL" in " ".join(warnings)
    assert chown == errno.EPERM
    assert target.stat().st_uid == 0


def test_ambient_set_when_inheritable(tmp_path: Path) -> None:
    require("CAP_SETPCAP")
    wanted = ["CAP_KILL", "CAP_NET_BIND_SERVICE"]

    def child() -> Any:
        warnings = caps.apply({name: wanted for name in caps.SETS})
        return [caps.current(), warnings]

    status, warnings = run_in_child(child).ok()
    assert status["CapAmb"] == status["CapInh"] == status["CapBnd"] == mask(*wanted)
    assert warnings == []


def test_dropped_capabilities_cannot_be_regained() -> None:
    require("CAP_SETPCAP", "CAP_SYS_ADMIN")

    def child() -> Any:
        kept = ["CAP_KILL", "CAP_SETPCAP"]
        caps.apply({"bounding": kept, "effective": kept, "permitted": kept})
        outcomes: list[Any] = []
        for attempt in (
            lambda: caps.capset(mask("CAP_SYS_ADMIN"), mask("CAP_SYS_ADMIN"), 0),
            lambda: caps.capset(0, 0, mask("CAP_SYS_ADMIN")),
            lambda: caps.apply_sets({"ambient": ["CAP_SYS_ADMIN"], "effective": kept, "permitted": kept}),
        ):
            try:
                result = attempt()
                outcomes.append(result or "allowed")
            except caps.CapabilityError as exc:
                outcomes.append(str(exc))
        outcomes.append(caps.current())
        return outcomes

    to_effective, to_inheritable, ambient, status = run_in_child(child).ok()
    assert "capset" in to_effective and "Operation not permitted" in to_effective
    assert "capset" in to_inheritable
    assert "CAP_SYS_ADMIN" in ambient[0]  # a warning: the kernel refused to raise it
    assert status["CapEff"] == status["CapBnd"] == mask("CAP_KILL", "CAP_SETPCAP")


def test_sethostname_needs_cap_sys_admin_in_a_new_uts_namespace() -> None:
    require("CAP_SETPCAP", "CAP_SYS_ADMIN")
    libc = ctypes.CDLL(None, use_errno=True)

    def child(keep_admin: bool) -> Any:
        if libc.unshare(CLONE_NEWUTS) != 0:
            raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWUTS)")
        kept = ["CAP_KILL"] + (["CAP_SYS_ADMIN"] if keep_admin else [])
        caps.apply({"bounding": kept, "effective": kept, "permitted": kept})
        try:
            socket.sethostname("clave-test")
        except OSError as exc:
            return exc.errno
        return socket.gethostname()

    host = socket.gethostname()
    assert run_in_child(child, False).ok() == errno.EPERM
    assert run_in_child(child, True).ok() == "clave-test"
    assert socket.gethostname() == host


def test_user_change_with_keepcaps_in_runc_order(tmp_path: Path) -> None:
    require("CAP_SETPCAP", "CAP_SETUID", "CAP_SETGID", "CAP_CHOWN", "CAP_DAC_OVERRIDE")
    target = tmp_path / "file"
    target.write_text("x")
    # CAP_DAC_OVERRIDE lets uid 1000 reach pytest's root-only temporary directory.
    kept = ["CAP_CHOWN", "CAP_DAC_OVERRIDE"]
    wanted = {"bounding": kept + ["CAP_KILL"], "effective": kept, "permitted": kept}

    def child(keep: bool) -> Any:
        sets = caps.parse(wanted)
        caps.drop_bounding(sets)
        caps.set_keepcaps(keep)
        os.setgroups([])
        os.setresgid(1000, 1000, 1000)
        os.setresuid(1000, 1000, 1000)
        caps.set_keepcaps(False)
        try:
            caps.apply_sets(sets)
        except caps.CapabilityError as exc:
            return str(exc)
        return [os.getuid(), caps.current(), _chown_errno(target)]

    uid, status, chown = run_in_child(child, True).ok()
    assert uid == 1000
    assert status["CapEff"] == status["CapPrm"] == mask(*kept)
    assert status["CapBnd"] == mask(*kept, "CAP_KILL")
    assert chown == 0 and target.stat().st_uid == 4321
    # Without PR_SET_KEEPCAPS the setuid empties the permitted set and capset cannot restore it.
    assert "capset" in run_in_child(child, False).ok()


def test_no_new_privs() -> None:
    def child() -> str:
        caps.set_no_new_privs()
        with open("/proc/self/status") as f:
            return next(line for line in f if line.startswith("NoNewPrivs:")).split()[1]

    assert run_in_child(child).ok() == "1"
