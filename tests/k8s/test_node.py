"""`clave node install` / `uninstall`: the config edit on its own (every kind of file a node may have), then the
whole thing against a real containerd 1.6 with CRI (private root, state and socket): install, `containerd config
dump`, a pod per RuntimeClass handler (clave, clave-enclave) through CRI, uninstall, the file byte for byte."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "interop"))
sys.path.insert(0, str(REPO / "tests" / "interop" / "cri"))

from clave.k8s import node, runtimeconfig  # noqa: E402

CLAVE = Path(sys.executable).parent / "clave"
NAMES = ["clave", "clave-enclave", "clave-vm"]

# A node's config as people write them: comments, odd spacing, tables in any order, a trailing comment.
USER_CONFIG = """\
version = 2   # containerd 1.6
# The operator's own comment, kept as it is.
oom_score = -999

[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image   =   "registry.k8s.io/pause:3.6"
    [plugins."io.containerd.grpc.v1.cri".containerd]
      default_runtime_name = "runc"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"   # trailing comment
# last line, no newline at the end"""


def lines() -> tuple[list[str], Callable[[str], None]]:
    said: list[str] = []
    return said, said.append


def runtimes(text: str, *path: str) -> dict[str, object]:
    table: object = tomllib.loads(text)
    for key in path:
        assert isinstance(table, dict)
        table = table[key]
    assert isinstance(table, dict)
    return table


def test_install_keeps_the_file_and_uninstall_restores_it(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(USER_CONFIG)
    config.chmod(0o640)
    prefix = tmp_path / "opt"
    said, say = lines()
    assert node.install(str(prefix), str(config), say=say, bin_dir=str(tmp_path / "bin")) is True
    text = config.read_text()
    assert text.startswith(USER_CONFIG + "\n"), "the user's bytes must stay in front, untouched"
    table = runtimes(text, "plugins", "io.containerd.grpc.v1.cri", "containerd", "runtimes")
    assert set(table) == {"runc", *NAMES}
    for name, handler in node.RUNTIMES.items():
        runtime = table[name]
        assert isinstance(runtime, dict)
        assert runtime["runtime_type"] == "io.containerd.clave.v2"
        assert runtime["runtime_path"] == str(prefix / "bin" / "containerd-shim-clave-v2")
        assert runtime["options"] == {"ConfigPath": str(prefix / "etc" / f"runtime-{name}.toml")}
        assert runtimeconfig.load(runtime["options"]["ConfigPath"]) == runtimeconfig.RuntimeConfig(name, handler)
    assert table["clave-enclave"]["container_annotations"] == ["enclave.*"]  # type: ignore[index]
    assert (config.stat().st_mode & 0o777) == 0o640
    assert any("added runtimes clave, clave-enclave, clave-vm" in line for line in said), said

    said.clear()
    assert node.install(str(prefix), str(config), say=say, bin_dir=str(tmp_path / "bin")) is False  # idempotent
    assert config.read_text() == text
    assert all(line.startswith("unchanged") for line in said), said

    said.clear()
    assert node.uninstall(str(config), say=say) is True
    assert config.read_bytes() == USER_CONFIG.encode() and (config.stat().st_mode & 0o777) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.toml"], "backup, record and prefix removed"
    said.clear()
    assert node.uninstall(str(config), say=say) is False
    assert said == [f"not installed in {config}: nothing to do"]


def test_uninstall_refuses_a_file_changed_since_install(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(USER_CONFIG)
    node.install(str(tmp_path / "opt"), str(config), say=lambda line: None, bin_dir=str(tmp_path / "bin"))
    with config.open("a") as f:
        f.write("# edited by hand after install\n")
    edited = config.read_bytes()
    with pytest.raises(node.NodeError) as err:
        node.uninstall(str(config), say=lambda line: None)
    assert "changed since `clave node install`" in str(err.value) and "\n" not in str(err.value)
    assert config.read_bytes() == edited and (tmp_path / "config.toml.clave-orig").read_bytes() == USER_CONFIG.encode()
    with pytest.raises(node.NodeError):
        node.install(str(tmp_path / "opt"), str(config), say=lambda line: None, bin_dir=str(tmp_path / "bin"))


def test_uninstall_refuses_a_backup_that_does_not_match(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(USER_CONFIG)
    node.install(str(tmp_path / "opt"), str(config), say=lambda line: None, bin_dir=str(tmp_path / "bin"))
    installed = config.read_bytes()
    (tmp_path / "config.toml.clave-orig").write_text("version = 2\n")
    with pytest.raises(node.NodeError, match="does not match its checksum"):
        node.uninstall(str(config), say=lambda line: None)
    assert config.read_bytes() == installed


def test_no_config_file_yet(tmp_path: Path) -> None:
    """containerd without a config file runs on defaults: install writes one, uninstall removes it again."""
    config = tmp_path / "etc" / "containerd" / "config.toml"
    node.install(str(tmp_path / "opt"), str(config), say=lambda line: None, bin_dir=str(tmp_path / "bin"))
    text = config.read_text()
    assert text.startswith("version = 2\n")
    assert set(runtimes(text, "plugins", "io.containerd.grpc.v1.cri", "containerd", "runtimes")) == set(NAMES)
    node.uninstall(str(config), say=lambda line: None)
    assert list(tmp_path.iterdir()) == [], "the directories install created are gone too"


@pytest.mark.parametrize("version, path", [
    (None, ["plugins", "cri", "containerd", "runtimes"]),
    (1, ["plugins", "cri", "containerd", "runtimes"]),
    (3, ["plugins", "io.containerd.cri.v1.runtime", "containerd", "runtimes"]),
])
def test_other_config_versions(tmp_path: Path, version: int | None, path: list[str]) -> None:
    config = tmp_path / "config.toml"
    original = (f"version = {version}\n" if version else "") + "root = \"/var/lib/containerd\"\n"
    config.write_text(original)
    node.install(str(tmp_path / "opt"), str(config), say=lambda line: None, bin_dir=str(tmp_path / "bin"))
    assert set(runtimes(config.read_text(), *path)) == set(NAMES)
    node.uninstall(str(config), say=lambda line: None)
    assert config.read_text() == original


@pytest.mark.parametrize("text, message", [
    ('version = 2\n[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.clave]\n  runtime_type = "x"\n',
     "already defines runtime 'clave'"),
    ("version = 2\n[plugins\n", "is not valid TOML"),
    ("version = 7\n", "version 7 is not one Clave knows"),
    # an inline table cannot be extended by a [header] later: appending would break the file
    ('version = 2\n[plugins."io.containerd.grpc.v1.cri".containerd]\n'
     '  runtimes = { runc = { runtime_type = "io.containerd.runc.v2" } }\n', "would make"),
])
def test_refused_files_are_left_alone(tmp_path: Path, text: str, message: str) -> None:
    config = tmp_path / "config.toml"
    config.write_text(text)
    with pytest.raises(node.NodeError) as err:
        node.install(str(tmp_path / "opt"), str(config), say=lambda line: None, bin_dir=str(tmp_path / "bin"))
    assert message in str(err.value) and "\n" not in str(err.value)
    assert config.read_text() == text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.toml"], "nothing left behind"


def test_cli_one_line_errors(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("version = 2\n[plugins\n")
    for argv, message in [
        (["node", "install", "--containerd-config", str(config), "--prefix", str(tmp_path / "opt"),
          "--bin-dir", str(tmp_path / "bin")], "not valid TOML"),
        (["node", "uninstall", "--prefix", "/opt/x"], "takes no --prefix"),
        (["node", "frobnicate"], "usage: clave node {install|uninstall}"),
        (["node", "install", "extra"], "takes no arguments"),
    ]:
        result = subprocess.run([str(CLAVE), *argv], capture_output=True, text=True, timeout=60)
        assert result.returncode == 1, (argv, result.stdout, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, (argv, result.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.toml"]


# --- against a real containerd -------------------------------------------------------------------------------


def cri_section(base: Path) -> str:
    """What a node's config holds before Clave: the CRI settings these machines need (see DESIGN.md), runc."""
    from cri_harness import cni_config

    return (
        "# The node's CRI settings, before Clave is installed.\n"
        '[plugins."io.containerd.grpc.v1.cri"]\n'
        '  sandbox_image = "localhost/clave/pause:1"\n'
        "  restrict_oom_score_adj = true  # root here lacks CAP_SYS_RESOURCE\n"
        '  stream_server_address = "127.0.0.1"\n'
        '  stream_server_port = "0"\n'
        '  [plugins."io.containerd.grpc.v1.cri".containerd]\n'
        '    snapshotter = "overlayfs"\n'
        '    default_runtime_name = "runc"\n'
        '    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]\n'
        '      runtime_type = "io.containerd.runc.v2"\n'
        + cni_config(base)
    )


@pytest.fixture(scope="module")
def installed_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path, bytes]]:
    if os.geteuid() != 0:
        pytest.skip("containerd needs root")
    for tool in ("containerd", "ctr", "gcc"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    pytest.importorskip("grpc_tools", reason="grpcio-tools is a test dependency")
    from cri_harness import daemon_config

    base = Path(tmp_path_factory.mktemp("node"))  # short: unix socket paths are limited to 108 bytes
    config = base / "config.toml"
    config.write_text(daemon_config(base) + cri_section(base))
    original = config.read_bytes()
    prefix = base / "opt"
    result = subprocess.run([str(CLAVE), "node", "install", "--prefix", str(prefix), "--containerd-config",
                             str(config), "--bin-dir", str(base / "bin")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "added runtimes clave, clave-enclave, clave-vm" in result.stdout, result.stdout
    yield base, prefix, original
    # uninstall whatever the tests did (idempotent), so no test leaves the config edited
    subprocess.run([str(CLAVE), "node", "uninstall", "--containerd-config", str(config)], capture_output=True,
                   timeout=120)


def test_containerd_config_dump_has_the_runtimes(installed_node: tuple[Path, Path, bytes]) -> None:
    base, prefix, _ = installed_node
    dump = subprocess.run(["containerd", "--config", str(base / "config.toml"), "config", "dump"],
                          capture_output=True, text=True, timeout=60)
    assert dump.returncode == 0, dump.stderr
    table = runtimes(dump.stdout, "plugins", "io.containerd.grpc.v1.cri", "containerd", "runtimes")
    for name in NAMES:
        runtime = table[name]
        assert isinstance(runtime, dict)
        assert runtime["runtime_type"] == "io.containerd.clave.v2"
        assert runtime["runtime_path"] == str(prefix / "bin" / "containerd-shim-clave-v2")
        assert runtime["options"]["ConfigPath"] == str(prefix / "etc" / f"runtime-{name}.toml")
    assert table["clave-enclave"]["container_annotations"] == ["enclave.*"]  # type: ignore[index]
    assert table["clave"]["container_annotations"] == []  # type: ignore[index]
    assert table["runc"]["runtime_type"] == "io.containerd.runc.v2"  # type: ignore[index]


def _skeleton_pal(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pal_dir = tmp_path_factory.mktemp("pal")
    pal_dir.chmod(0o755)
    pal = pal_dir / "liberpal-skeleton.so"
    source = REPO / "tests" / "enclave" / "skeleton_pal.c"
    subprocess.run(["gcc", "-shared", "-fPIC", "-DPAL_API_VERSION=2", "-o", str(pal), str(source)], check=True)
    return pal


def test_pods_through_cri_then_uninstall(installed_node: tuple[Path, Path, bytes],
                                         tmp_path_factory: pytest.TempPathFactory) -> None:
    """A pod per installed handler through CRI, served by the installed shim; then uninstall: the config as it was."""
    from cri_harness import (
        SERVE,
        assert_nothing_left,
        clave_shims,
        container_status,
        create_and_start,
        running_cri,
        running_pod,
        wait_cri,
    )
    from procs import process_argvs

    base, prefix, original = installed_node
    config = base / "config.toml"
    shim = str(base / "bin" / "containerd-shim-clave-v2").encode()  # the link install made, first on PATH
    pal = _skeleton_pal(tmp_path_factory)
    enclave = {"enclave.type": "software", "enclave.runtime.path": str(pal),
               "enclave.runtime.args": "log=/proc/self/fd/1"}  # the PAL's call log goes to the CRI log
    with running_cri(base, config, path=(base / "bin",)) as cri:
        pb = cri.pb
        for handler in ("clave", "clave-enclave"):
            with running_pod(cri, handler, handler=handler) as (pod, sandbox):
                native = create_and_start(cri, pod, sandbox, "app", SERVE)
                status, info = container_status(cri, native)
                assert status.state == pb.CONTAINER_RUNNING
                assert info["runtimeType"] == "io.containerd.clave.v2"
                assert info["runtimeOptions"]["config_path"] == str(prefix / "etc" / f"runtime-{handler}.toml")
                shims = clave_shims(cri.address)
                assert len(shims) == 1
                assert shim in dict(process_argvs())[shims[0]][:3], "the pod runs on the installed shim"
                assert os.readlink(shim.decode()) == str(prefix / "bin" / "containerd-shim-clave-v2")
                result = cri.runtime.ExecSync(pb.ExecSyncRequest(container_id=native, cmd=["echo", handler],
                                                                 timeout=20), timeout=30)
                assert (result.stdout, result.exit_code) == (f"{handler}\n".encode(), 0)

                # enclave.* annotations reach the OCI spec only through clave-enclave's container_annotations
                cid = create_and_start(cri, pod, sandbox, "enclaved", "echo hello from the app", enclave)
                wait_cri(lambda cid=cid: container_status(cri, cid)[0].state == pb.CONTAINER_EXITED, "the app")
                log = (Path(sandbox.log_directory) / "enclaved.log").read_text()
                assert container_status(cri, cid)[0].exit_code == 0, log
                assert "hello from the app" in log, log
                assert ("pal_init version=2" in log) == (handler == "clave-enclave"), (handler, log)
            assert_nothing_left(cri, [pod, native, cid])
    result = subprocess.run([str(CLAVE), "node", "uninstall", "--containerd-config", str(config)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert config.read_bytes() == original, "uninstall must restore the config byte for byte"
    assert not prefix.exists() and not Path(f"{config}.clave-orig").exists()
    assert not (base / "bin").exists(), "the shim's link and the directory install made are gone"
    again = subprocess.run([str(CLAVE), "node", "uninstall", "--containerd-config", str(config)],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "nothing to do" in again.stdout
    assert sorted(p.name for p in base.iterdir() if p.name.startswith("config")) == ["config.toml"]
