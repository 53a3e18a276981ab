"""Bad input to create: one error line, a non-zero exit, a JSON error line in --log, nothing left behind."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from .conftest import Bundle, Clave


def _drop(*path: str) -> Callable[[dict[str, Any]], None]:
    def edit(config: dict[str, Any]) -> None:
        for key in path[:-1]:
            config = config[key]
        del config[path[-1]]

    return edit


def _set(value: Any, *path: str) -> Callable[[dict[str, Any]], None]:
    def edit(config: dict[str, Any]) -> None:
        for key in path[:-1]:
            config = config[key]
        config[path[-1]] = value

    return edit


def _add_namespace(ns: dict[str, str]) -> Callable[[dict[str, Any]], None]:
    return lambda config: config["linux"]["namespaces"].append(ns)


BROKEN: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "no ociVersion": (_drop("ociVersion"), "ociVersion"),
    "ociVersion 2": (_set("2.0.0", "ociVersion"), "ociVersion"),
    "no root": (_drop("root"), "root"),
    "no root.path": (_drop("root", "path"), "root.path"),
    "no process.args": (_drop("process", "args"), "process.args"),
    "empty process.args": (_set([], "process", "args"), "process.args"),
    "relative cwd": (_set("tmp", "process", "cwd"), "cwd"),
    "unknown namespace": (_add_namespace({"type": "bogus"}), "namespace"),
    "duplicate namespace": (_add_namespace({"type": "pid"}), "namespace"),
    "relative namespace path": (_set([{"type": "mount"}, {"type": "network", "path": "proc/1/ns/net"}],
                                     "linux", "namespaces"), "path"),
    "uid as string": (_set("0", "process", "user", "uid"), "uid"),
    "mount without destination": (lambda c: c["mounts"].append({"type": "tmpfs"}), "destination"),
    "bad device type": (_set([{"path": "/dev/x", "type": "z"}], "linux", "devices"), "devices"),
    "relative hook path": (_set({"prestart": [{"path": "true"}]}, "hooks"), "hooks"),
    "zero hook timeout": (_set({"poststop": [{"path": "/bin/true", "timeout": 0}]}, "hooks"), "timeout"),
    "mappings without userns": (_set([{"containerID": 0, "hostID": 0, "size": 1}], "linux", "uidMappings"),
                                "user namespace"),
    "bad rootfsPropagation": (_set("sideways", "linux", "rootfsPropagation"), "rootfsPropagation"),
    "hostname without uts": (_set([{"type": "mount"}], "linux", "namespaces"), "hostname"),
    "missing rootfs": (_set("/nonexistent/rootfs", "root", "path"), "rootfs"),
    "missing executable": (_set(["/bin/nonexistent"], "process", "args"), "nonexistent"),
    "missing cwd parent is a file": (_set("/bin/busybox/sub", "process", "cwd"), "cwd"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_config(clave: Clave, bundle: Bundle, assert_clean: Callable[[], None], case: str) -> None:
    edit, expected = BROKEN[case]
    config = bundle.clone_config()
    edit(config)
    bundle.write(config)
    message = clave.fail("create", "--bundle", str(bundle.path), clave.id())
    assert expected in message, message
    assert_clean()


@pytest.mark.parametrize("content", [b"", b"{", b"[]", b"not json", b'{"ociVersion": "1.0.0"'])
def test_unparsable_config(clave: Clave, bundle: Bundle, assert_clean: Callable[[], None], content: bytes) -> None:
    (bundle.path / "config.json").write_bytes(content)
    message = clave.fail("create", "--bundle", str(bundle.path), clave.id())
    assert "config.json" in message
    assert_clean()


def test_missing_config(clave: Clave, bundle: Bundle, assert_clean: Callable[[], None]) -> None:
    assert "config.json" in clave.fail("create", "--bundle", str(bundle.path), clave.id())
    assert_clean()


def test_run_reports_config_errors_too(clave: Clave, bundle: Bundle, assert_clean: Callable[[], None]) -> None:
    config = bundle.clone_config()
    config["process"]["cwd"] = "relative"
    bundle.write(config)
    assert "cwd" in clave.fail("run", "--bundle", str(bundle.path), clave.id())
    assert_clean()


def test_terminal_without_console_socket(clave: Clave, bundle: Bundle, assert_clean: Callable[[], None]) -> None:
    bundle.process["terminal"] = True
    bundle.write()
    assert "console socket" in clave.fail("create", "--bundle", str(bundle.path), clave.id())
    assert_clean()


def test_console_socket_without_terminal(clave: Clave, bundle: Bundle, assert_clean: Callable[[], None]) -> None:
    bundle.write()
    message = clave.fail("create", "--bundle", str(bundle.path), "--console-socket", "/tmp/nope.sock", clave.id())
    assert "console socket" in message
    assert_clean()


def test_error_is_last_json_line(clave: Clave, bundle: Bundle) -> None:
    """containerd reports the last "level":"error" line of the log: it must name the problem."""
    config = bundle.clone_config()
    del config["ociVersion"]
    bundle.write(config)
    clave.fail("create", "--bundle", str(bundle.path), clave.id())
    entries = [json.loads(line) for line in clave.log.read_text().splitlines()]
    assert entries[-1]["level"] == "error" and "ociVersion" in entries[-1]["msg"]


def test_unwritable_pid_file(clave: Clave, bundle: Bundle, assert_clean: Callable[[], None]) -> None:
    """The last step of create fails: everything before it is undone."""
    bundle.args("sleep", "60")
    bundle.write()
    message = clave.fail("create", "--bundle", str(bundle.path), "--pid-file", "/nonexistent/dir/pid", clave.id())
    assert message == "write pid file /nonexistent/dir/pid: No such file or directory"
    assert_clean()
