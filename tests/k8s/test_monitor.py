"""Metrics end to end: the real clave shim under a private containerd 1.6 with CRI serves its pod's metrics on a
socket in its state directory, `clave-monitor` gathers every shim, and Debian's Prometheus scrapes the monitor;
its HTTP API then has the containers' series, labelled with the pod's name, namespace and uid as containerd's CRI
annotations give them.

The node: a CRI pod (handler `clave`, host network) with two busybox containers, and beside it, through `ctr` in a
namespace of the test's own, a "pod" of enclave containers sharing one shim (the sandbox-id annotation): a signed
WebAssembly module that sleeps, and a tampered one the runtime refuses. `clave attest ID` asks the sleeping
enclave for evidence. Every daemon is stopped by its pid.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "interop"))
sys.path.insert(0, str(REPO / "tests" / "interop" / "cri"))

from clave.engine import counters  # noqa: E402
from clave.monitor import gather  # noqa: E402
from clave.shim import prometheus  # noqa: E402

BIN = Path(sys.executable).parent
CLAVE = BIN / "clave"
MONITOR = BIN / "clave-monitor"
RUNTIME = "io.containerd.clave.v2"
REQUIRED = [
    "clave_container_cpu_usage_seconds_total", "clave_container_memory_usage_bytes",
    "clave_container_memory_working_set_bytes", "clave_container_pids",
    "clave_container_network_receive_bytes_total", "clave_container_network_transmit_bytes_total",
    "clave_container_blkio_read_bytes_total", "clave_container_blkio_write_bytes_total",
    "clave_container_oom_events_total",
]
# A WASI module that sleeps an hour at a time (poll_oneoff on the monotonic clock): an enclave that uses no CPU.
SLEEPER = """(module
 (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
 (memory (export "memory") 1)
 (func (export "_start")
  (i32.store8 (i32.const 8) (i32.const 0))
  (i32.store (i32.const 16) (i32.const 1))
  (i64.store (i32.const 24) (i64.const 3600000000000))
  (loop $again
   (drop (call $poll (i32.const 0) (i32.const 64) (i32.const 1) (i32.const 128)))
   (br $again))))"""


# --- the pieces alone ----------------------------------------------------------------------------------------


def test_families_merge_into_one_block_each() -> None:
    """Two shims' expositions become one, each family once with its header, samples of both."""
    one = prometheus.Exposition()
    one.add("clave_container_pids", 'container_id="a"', 1)
    one.add("clave_container_cpu_usage_seconds_total", 'container_id="a"', 0.5)
    two = prometheus.Exposition()
    two.add("clave_container_pids", 'container_id="b",pod="p\\"q"', 2)
    families = gather.merge([one.text(), two.text()])
    text = "".join("".join(entry) for entry in families.values())
    assert text.count("# TYPE clave_container_pids gauge") == 1
    assert 'clave_container_pids{container_id="a"} 1\n' in text
    assert 'clave_container_pids{container_id="b",pod="p\\"q"} 2\n' in text
    assert prometheus.escape('a"b\\c\nd') == 'a\\"b\\\\c\\nd'


def test_kbs_refusals_are_told_from_failures() -> None:
    """The KBS's own refusal (a verdict) is counted apart from a broker that never answered."""
    from clave.errors import ClaveError
    from clave.kbs.client import _problem_error

    refusal = _problem_error("POST", "/kbs/v0/attest", 401, {"title": "AttestationError", "detail": "no"})
    assert counters.outcome("kbs", ClaveError(f"kbs: kbs: default/key/a: {refusal}")) == "kbs.refused"
    assert counters.outcome("kbs", ClaveError("kbs: connection refused")) == "kbs.failed"
    assert counters.outcome("kbs", None) == "kbs.released"
    assert counters.outcome("attest", None) == "attest.ok"


def test_stats_become_the_required_families() -> None:
    stats = {"cpu": {"usage": {"total": 2_500_000_000}},
             "memory": {"usage": {"usage": 1000}, "raw": {"total_inactive_file": 300}},
             "pids": {"current": 3},
             "network_interfaces": [{"name": "lo", "rx_bytes": 9, "tx_bytes": 9},
                                    {"name": "eth0", "rx_bytes": 10, "tx_bytes": 20}],
             "blkio": {"ioServiceBytesRecursive": [{"op": "Read", "value": 5}, {"op": "Write", "value": 6},
                                                   {"op": "Total", "value": 11}, {"op": "Read", "value": 1}]}}
    out = prometheus.Exposition()
    prometheus.add_stats(out, 'container_id="x"', stats)
    text = out.text().decode()
    assert 'clave_container_cpu_usage_seconds_total{container_id="x"} 2.5\n' in text
    assert 'clave_container_memory_working_set_bytes{container_id="x"} 700\n' in text
    assert 'clave_container_network_receive_bytes_total{container_id="x",interface="eth0"} 10\n' in text
    assert 'interface="lo"' not in text
    assert 'clave_container_blkio_read_bytes_total{container_id="x"} 6\n' in text
    assert 'clave_container_blkio_write_bytes_total{container_id="x"} 6\n' in text


def test_the_deploy_files_speak_these_metrics(tmp_path: Path) -> None:
    """The dashboard queries only families Clave serves; deploy/clave-monitor.yaml's scrape job is a valid
    Prometheus configuration (promtool) and keeps the containers' own pod labels."""
    yaml = pytest.importorskip("yaml", reason="PyYAML comes with kubernetes-validate (test extra)")
    dashboard = json.loads((REPO / "deploy" / "grafana-dashboard.json").read_text())
    exprs = " ".join(target["expr"] for panel in dashboard["panels"] for target in panel["targets"])
    served = set(prometheus.FAMILIES) | {"clave_monitor_scrape_duration_seconds", "clave_monitor_shims",
                                         "clave_monitor_shims_failed"}
    used = set(re.findall(r"\bclave_[a-z_]+", exprs))
    assert used <= served, used - served
    assert {f for f in served if f.startswith(("clave_enclave_", "clave_vm_"))} <= used
    docs = {d["kind"]: d for d in yaml.safe_load_all((REPO / "deploy" / "clave-monitor.yaml").read_text())}
    config = docs["ConfigMap"]["data"]["prometheus.yml"]
    assert yaml.safe_load(config)["scrape_configs"][0]["honor_labels"] is True
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed (Debian package prometheus)")
    (tmp_path / "prometheus.yml").write_text(config)
    check = subprocess.run(["promtool", "check", "config", str(tmp_path / "prometheus.yml")], capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    daemonset = docs["DaemonSet"]["spec"]["template"]["spec"]
    assert daemonset["volumes"][0]["hostPath"]["path"] == prometheus.SHIMS_DIR
    assert "--listen" in daemonset["containers"][0]["command"]


def test_vm_figures_from_the_handlers_describe() -> None:
    """What the vm handler's describe gives `clave state` (boot or restore time, the VMM's RSS) becomes the VM
    families, labelled like every other container's."""
    state = {"status": "running", "annotations": {"io.kubernetes.cri.sandbox-name": "vmpod"},
             "vm": {"boot_seconds": 2.5, "vmm_rss_bytes": 150 << 20, "restored": True, "accel": "tcg"}}
    out = prometheus.Exposition()
    labels = prometheus.add_container(out, "v1", "vm", state, {}, 0)
    text = out.text().decode()
    assert labels == 'container_id="v1",container="",pod="vmpod",namespace="",uid="",handler="vm"'
    assert f'clave_vm_boot_seconds{{{labels},restored="true"}} 2.5\n' in text
    assert f"clave_vm_vmm_memory_bytes{{{labels}}} {150 << 20}\n" in text
    assert "clave_enclave_info" not in text


# --- the node -----------------------------------------------------------------------------------------------


@dataclass
class Node:
    cri: object  # cri_harness.Cri
    pod: str  # CRI pod sandbox id
    pod_uid: str
    natives: list[str]
    namespace: str  # ctr's namespace for the enclave "pod"
    enclave: str  # the sleeping wasm enclave's id
    refused: str  # the tampered one's
    monitor_url: str


def _cri_section() -> str:
    """The CRI plugin's settings as docs/containerd.md documents them (runtime `clave` included)."""
    match = re.search(r"```toml\n(.*?)```", (REPO / "docs" / "containerd.md").read_text(), re.S)
    assert match
    return match.group(1)


def _ctr(address: str, namespace: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ctr", "--address", address, "-n", namespace, *args], capture_output=True, text=True,
                          timeout=timeout)


def _wasm_rootfs(base: Path) -> Path:
    """A rootfs with the sleeper signed and a tampered copy (one byte changed after signing)."""
    wasmtime = pytest.importorskip("wasmtime")
    from clave.enclave.wasm import signing

    rootfs = base / "wasm-rootfs"
    (rootfs / "app").mkdir(parents=True)
    key = base / "signer.pem"
    signing.generate_key(str(key))
    for name in ("sleep.wasm", "tampered.wasm"):
        path = rootfs / "app" / name
        path.write_bytes(wasmtime.wat2wasm(SLEEPER))
        signing.sign_module(str(path), str(key))
    tampered = rootfs / "app" / "tampered.wasm"
    data = bytearray(tampered.read_bytes())
    data[-1] ^= 1
    tampered.write_bytes(bytes(data))
    return rootfs


def _start_monitor(base: Path, *namespaces: str) -> tuple[subprocess.Popen[str], str]:
    args = [str(MONITOR), "--listen", "127.0.0.1:0"] + [a for ns in namespaces for a in ("--namespace", ns)]
    monitor = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=open(base / "monitor.log", "w"), text=True)
    assert monitor.stdout is not None
    line = monitor.stdout.readline()
    match = re.search(r"http://(127\.0\.0\.1:\d+)/metrics", line)
    assert match, f"clave-monitor said {line!r}; log: {(base / 'monitor.log').read_text()}"
    return monitor, f"http://{match.group(1)}/metrics"


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    if os.geteuid() != 0:
        pytest.skip("containerd needs root")
    for tool in ("containerd", "ctr", "gcc"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    pytest.importorskip("grpc_tools", reason="grpcio-tools is a test dependency")
    from cri_harness import SERVE, cni_config, create_and_start, daemon_config, running_cri, running_pod, wait_cri
    from procs import stop_pid

    base = Path(tmp_path_factory.mktemp("mon"))  # short: unix socket paths are limited to 108 bytes
    rootfs = _wasm_rootfs(base)
    config = base / "config.toml"
    config.write_text(daemon_config(base) + _cri_section() + cni_config(base))
    namespace = f"clave-mon-{uuid.uuid4().hex[:6]}"
    enclave_pod = f"encl-{uuid.uuid4().hex[:6]}"
    enclave, refused = f"{enclave_pod}-sleep", f"{enclave_pod}-tampered"
    with running_cri(base, config) as cri:
        address = cri.address
        monitor = None
        try:
            with running_pod(cri, "web") as (pod, sandbox):
                natives = [create_and_start(cri, pod, sandbox, name, SERVE) for name in ("app", "side")]
                group = ["--annotation", f"io.kubernetes.cri.sandbox-id={enclave_pod}", "--annotation",
                         "enclave.type=wasm", "--runtime", RUNTIME, "--rootfs"]
                run = _ctr(address, namespace, "run", "-d", *group, str(rootfs), enclave, "/app/sleep.wasm")
                assert run.returncode == 0, run.stderr
                bad = _ctr(address, namespace, "run", "--rm", *group, str(rootfs), refused, "/app/tampered.wasm")
                assert bad.returncode != 0 and "signature" in bad.stderr, bad.stderr
                attest = subprocess.run([str(CLAVE), "--root", f"/run/containerd/clave/{namespace}", "attest",
                                         enclave, "--nonce", "c0ffee"], capture_output=True, text=True, timeout=60)
                assert attest.returncode == 0, attest.stderr
                monitor, url = _start_monitor(base, "k8s.io", namespace)
                # a shim serves its metrics from half a second after it starts (clave.shim.main.METRICS_DELAY)
                wait_cri(lambda: all(f'container_id="{c}"' in _scrape(url) for c in [*natives, enclave]),
                         "every container in clave-monitor's answer")
                yield Node(cri, pod, sandbox.metadata.uid, natives, namespace, enclave, refused, url)
        finally:
            if monitor is not None:
                stop_pid(monitor.pid)
                monitor.wait(timeout=10)
            _ctr(address, namespace, "task", "kill", "-s", "SIGKILL", enclave)
            deadline = time.monotonic() + 20
            while _ctr(address, namespace, "task", "delete", enclave).returncode != 0 and \
                    _ctr(address, namespace, "task", "ls", "-q").stdout.strip() and time.monotonic() < deadline:
                time.sleep(0.2)
            _ctr(address, namespace, "container", "delete", enclave)
            from procs import cgroup_dirs

            # ctr puts a container's cgroup in /<namespace>/<id>: the namespace's directories stay behind
            leftovers = [f"/run/containerd/clave/{namespace}", f"{prometheus.SHIMS_DIR}/{namespace}",
                         *map(str, cgroup_dirs(namespace))]
            for leftover in leftovers:
                try:
                    os.rmdir(leftover)
                except OSError:
                    pass


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return str(response.read().decode())


def _samples(text: str, family: str) -> dict[str, float]:
    """``labels -> value`` of one family's samples."""
    out = {}
    for line in text.splitlines():
        if line.startswith(family + "{"):
            labels, _, value = line[len(family) + 1:].rpartition("} ")
            out[labels] = float(value)
    return out


def test_each_shim_serves_its_pod_on_a_socket_in_its_state_directory(node: Node) -> None:
    """The CRI pod's shim (its 64-digit id makes the path longer than sockaddr_un takes) and the enclave group's."""
    for group in ((f"k8s.io/{node.pod}"), f"{node.namespace}/{node.enclave.rsplit('-', 1)[0]}"):
        path = f"{prometheus.SHIMS_DIR}/{group}/{prometheus.SOCKET_NAME}"
        assert os.path.exists(path), path
        shim = gather.Shim(*group.split("/"), path)
        result = gather.scrape([shim])
        assert not result.failed, result.failed
        assert "clave_container_info" in result.families
    assert len(f"{prometheus.SHIMS_DIR}/k8s.io/{node.pod}/{prometheus.SOCKET_NAME}") > prometheus.SUN_PATH_MAX


def test_monitor_labels_every_container_with_its_pod(node: Node) -> None:
    text = _scrape(node.monitor_url)
    lint = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    for family in REQUIRED:
        assert family in text, family
    for cid, name in zip(node.natives, ("app", "side"), strict=True):
        labels = (f'container_id="{cid}",container="{name}",pod="web",namespace="clave-test",'
                  f'uid="{node.pod_uid}",handler="native"')
        for family in REQUIRED:
            if "network" not in family:
                assert labels in _samples(text, family), (family, labels)
        assert _samples(text, "clave_container_pids")[labels] >= 1
        assert _samples(text, "clave_container_cpu_usage_seconds_total")[labels] > 0
        assert _samples(text, "clave_container_oom_events_total")[labels] == 0
        network = [k for k in _samples(text, "clave_container_network_receive_bytes_total") if k.startswith(labels)]
        assert network, "a host-network pod sees the node's interfaces"
    # the pause container is the pod's too
    assert any(f'container_id="{node.pod}"' in k and 'pod="web"' in k
               for k in _samples(text, "clave_container_info"))
    assert _samples(text, "clave_monitor_shims_failed") == {} and "clave_monitor_shims_failed 0\n" in text
    assert _samples(text, "clave_monitor_shim_up")[f'containerd_namespace="k8s.io",shim="{node.pod}"'] == 1


def test_enclave_metrics(node: Node) -> None:
    text = _scrape(node.monitor_url)
    labels = f'container_id="{node.enclave}",container="",pod="",namespace="",uid="",handler="enclave"'
    assert _samples(text, "clave_enclave_info") == {f'{labels},type="wasm",insecure="true"': 1}
    requests = _samples(text, "clave_enclave_attestation_requests_total")
    assert requests[f'{labels},result="ok"'] == 1 and requests[f'{labels},result="failed"'] == 0
    fetches = _samples(text, "clave_enclave_kbs_fetches_total")
    assert fetches[f'{labels},phase="start",result="released"'] == 0  # it names no KBS
    pod = 'pod="",namespace="",uid="",handler="enclave",type="wasm"'
    assert _samples(text, "clave_enclave_starts_total") == {pod: 1}
    refusals = _samples(text, "clave_enclave_refusals_total")
    assert refusals == {f'{pod},phase="create",reason="error"': 1}, refusals
    assert _samples(text, "clave_container_pids")[labels] >= 1


def test_prometheus_scrapes_the_monitor(node: Node, tmp_path: Path) -> None:
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus is not installed (Debian package prometheus)")
    from procs import stop_pid

    target = urllib.parse.urlsplit(node.monitor_url).netloc
    config = tmp_path / "prometheus.yml"
    config.write_text(json.dumps({  # YAML is a superset of JSON
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "clave", "static_configs": [{"targets": [target]}]}],
    }))
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api/v1"
    with open(tmp_path / "prometheus.log", "w") as log:
        daemon = subprocess.Popen(["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                   f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                                  stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        query = f'clave_container_cpu_usage_seconds_total{{container_id="{node.natives[0]}"}}'
        series = []
        deadline = time.monotonic() + 60
        while not series:
            assert daemon.poll() is None, (tmp_path / "prometheus.log").read_text()[-2000:]
            assert time.monotonic() < deadline, f"no series in Prometheus: {(tmp_path / 'prometheus.log').read_text()}"
            time.sleep(0.5)
            try:
                series = _query(api, query)
            except OSError:
                continue  # not listening yet
        metric = series[0]["metric"]
        assert (metric["pod"], metric["namespace"], metric["uid"], metric["container"], metric["handler"]) == \
            ("web", "clave-test", node.pod_uid, "app", "native")
        assert metric["job"] == "clave" and float(series[0]["value"][1]) > 0
        up = _query(api, 'up{job="clave"}')
        assert up and up[0]["value"][1] == "1"
        assert _query(api, f'clave_enclave_info{{container_id="{node.enclave}",type="wasm"}}')
    finally:
        stop_pid(daemon.pid)
        daemon.wait(timeout=15)


def _query(api: str, promql: str) -> list[dict[str, object]]:
    url = f"{api}/query?{urllib.parse.urlencode({'query': promql})}"
    with urllib.request.urlopen(url, timeout=10) as response:
        doc = json.loads(response.read())
    assert doc["status"] == "success", doc
    result: list[dict[str, object]] = doc["data"]["result"]
    return result


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def test_a_shims_directory_goes_with_it(node: Node) -> None:
    """A removed pod's shim takes its metrics directory with it; the monitor then no longer finds it."""
    from cri_harness import SERVE, create_and_start, running_pod, wait_cri

    cri = node.cri
    with running_pod(cri, "brief") as (pod, sandbox):  # type: ignore[arg-type]
        create_and_start(cri, pod, sandbox, "app", SERVE)  # type: ignore[arg-type]
        directory = Path(prometheus.shim_directory("k8s.io", pod))
        wait_cri(lambda: (directory / prometheus.SOCKET_NAME).exists(), "the pod's metrics socket")
        assert f'shim="{pod}"' in _scrape(node.monitor_url)
    wait_cri(lambda: not directory.exists(), "the pod's shim directory to go")
    assert f'shim="{pod}"' not in _scrape(node.monitor_url)
