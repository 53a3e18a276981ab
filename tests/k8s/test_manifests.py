"""Every YAML under deploy/ validates strictly against Kubernetes 1.32's published schemas (kubernetes-validate,
offline), and the manifests say what the rest of Clave does: the RuntimeClasses name the runtimes `clave node
install` writes, their overheads are the ones bench/bench_overhead.py printed (quoted beside them), the Grafana
dashboard queries the metric names clave-monitor is to serve."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML comes with kubernetes-validate (test extra)")
kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is a test dependency")

from clave.k8s import node  # noqa: E402

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
KUBERNETES = "1.32.0"
MANIFESTS = sorted(DEPLOY.rglob("*.yaml"))
METRICS = [
    "clave_container_cpu_usage_seconds_total", "clave_container_memory_usage_bytes",
    "clave_container_memory_working_set_bytes", "clave_container_pids",
    "clave_container_network_receive_bytes_total", "clave_container_network_transmit_bytes_total",
    "clave_container_blkio_read_bytes_total", "clave_container_blkio_write_bytes_total",
    "clave_container_oom_events_total",
]


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def test_there_are_manifests() -> None:
    assert {p.name for p in MANIFESTS} >= {"runtimeclasses.yaml", "clave-deploy.yaml", "clave-device-plugin.yaml"}


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_validates_strictly_against_kubernetes_1_32(path: Path) -> None:
    docs = documents(path)
    assert docs, f"{path} holds no document"
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, KUBERNETES, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{path.name}: {doc.get('kind')} {doc.get('metadata', {}).get('name')}: {exc.message} "
                        f"at {'/'.join(map(str, exc.path))}")


def test_a_bad_manifest_is_caught() -> None:
    """The validator really is strict: an unknown field in a RuntimeClass fails."""
    doc = {"apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass", "metadata": {"name": "x"}, "handler": "x",
           "overhead": {"podFixed": {"memory": "8Mi"}, "podfixed": {}}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def test_runtime_classes_match_the_installer_and_the_bench() -> None:
    path = DEPLOY / "runtimeclasses.yaml"
    classes = {doc["metadata"]["name"]: doc for doc in documents(path)}
    assert set(classes) == set(node.RUNTIMES), "one RuntimeClass per runtime `clave node install` adds"
    for name, doc in classes.items():
        assert doc["handler"] == name
        assert set(doc["overhead"]["podFixed"]) == {"memory", "cpu"}
    text = path.read_text()
    # the bench's table is quoted, and each measured class uses the overhead its row suggests
    for kind, name in (("native", "clave"), ("enclave", "clave-enclave"), ("vm", "clave-vm")):
        row = re.search(rf"^#\s+{kind}\s+.*memory (\d+Mi), cpu (\d+m)$", text, re.M)
        assert row, f"bench_overhead.py's {kind} row is not quoted in {path.name}"
        assert classes[name]["overhead"]["podFixed"] == {"memory": row.group(1), "cpu": row.group(2)}
    assert classes["clave-vm"]["scheduling"]["nodeSelector"] == {"clave.io/vm": "true"}
    assert classes["clave-enclave"]["scheduling"]["nodeSelector"] == {"clave.io/enclave": "true"}
    for name in ("clave-vm", "clave-enclave"):
        assert classes[name]["scheduling"]["tolerations"], name


def test_daemonset_installs_uninstalls_and_labels() -> None:
    docs = {doc["kind"]: doc for doc in documents(DEPLOY / "clave-deploy.yaml")}
    assert set(docs) == {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "DaemonSet"}
    pod = docs["DaemonSet"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == docs["ServiceAccount"]["metadata"]["name"]
    container = pod["containers"][0]
    assert container["securityContext"]["privileged"] is True
    script = " ".join(container["args"])
    assert "clave node install" in script and "kubectl label node" in script
    assert "clave node uninstall" in " ".join(container["lifecycle"]["preStop"]["exec"]["command"])
    paths = {volume["hostPath"]["path"] for volume in pod["volumes"]}
    assert {"/etc/containerd", "/opt/clave", "/run/containerd"} <= paths
    rules = docs["ClusterRole"]["rules"]
    assert rules == [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "patch"]}]


def test_grafana_dashboard_covers_the_metrics() -> None:
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    exprs = " ".join(target["expr"] for panel in dashboard["panels"] for target in panel["targets"])
    missing = [metric for metric in METRICS if metric not in exprs]
    assert not missing, f"the dashboard has no panel for {missing}"
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])
