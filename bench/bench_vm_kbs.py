"""A key broker round trip from a vm pod (issue 14): `clave --handler vm run` of a container with a vTPM whose
guest fetches a secret from clave-kbs (enclave.kbs.* annotations: the guest's TPM quote, TLS end to end through
the host's tunnel) against the same container without the fetch, interleaved; the difference is the round trip
as the pod pays it (auth, the quote in the guest, attest, resource, JWE, the write into the container).

    .venv/bin/python bench/bench_vm_kbs.py [--runs N] [--warmup N]

Needs root, QEMU, OVMF, swtpm and a built guest (`clave vm build-guest`); both variants are template clones.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "kbs"))  # broker set-up shared with tests

from common import interleave, machine_description, print_ratio_table  # noqa: E402
from kbs_env import make_material, start_kbs, stop_kbs  # noqa: E402

from clave.tools.bundles import make_bundle  # noqa: E402
from clave.vm.guest import current_guest  # noqa: E402
from clave.vm.measure import reference_pcrs  # noqa: E402

BIN = Path(sys.executable).parent
RESOURCE = "default/key/bench-vm"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bvk-", dir="/tmp") as tmp:
        base = Path(tmp)
        (base / "material").mkdir()
        kbs = start_kbs(make_material(base / "material"), base / "state", "--allow-insecure")
        try:
            admin = [sys.executable, "-m", "clave.kbs.cli"]
            common = ["--url", kbs.url, "--ca-file", kbs.ca_file, "--admin-key", str(kbs.material.admin_private)]
            (base / "secret").write_text("bench")
            subprocess.run([*admin, "put-resource", *common, RESOURCE, str(base / "secret")], check=True,
                           capture_output=True)
            policy = {RESOURCE: [{"tee": ["tpm"], "reference_values": {
                "pcrs.8": [reference_pcrs(current_guest().digests())[8]]}}]}
            (base / "policy.json").write_text(json.dumps(policy))
            subprocess.run([*admin, "set-policy", *common, str(base / "policy.json")], check=True, capture_output=True)
            bundles = {}
            for name, kbs_annotations in (("tpm", {}), ("tpm + kbs", {
                    "enclave.kbs.url": kbs.url, "enclave.kbs.ca": kbs.ca_file,
                    "enclave.kbs.resources": f"{RESOURCE}=/run/secrets/token"})):
                bundle = base / name.replace(" + ", "-")
                config = make_bundle(str(bundle), ["/bin/true"])
                config["mounts"].append({"destination": "/run/secrets", "type": "tmpfs", "source": "tmpfs",
                                         "options": ["nosuid", "nodev"]})
                config["annotations"] = {"io.clave.handler": "vm", "io.clave.vm.tpm": "true", **kbs_annotations}
                (bundle / "config.json").write_text(json.dumps(config))
                bundles[name] = bundle

            def run(bundle: Path) -> float:
                t0 = time.perf_counter()
                subprocess.run([str(BIN / "clave"), "--root", str(base / "root"), "run", "--bundle", str(bundle),
                                f"b{uuid.uuid4().hex[:8]}"], check=True, stdin=subprocess.DEVNULL,
                               capture_output=True, timeout=300)
                return (time.perf_counter() - t0) * 1000

            run(bundles["tpm"])  # the vTPM template exists before the clock starts
            samples = interleave({name: (lambda b=bundle: run(b)) for name, bundle in bundles.items()},
                                 runs=args.runs, warmup=args.warmup)
        finally:
            stop_kbs(kbs)
    print(f"# bench_vm_kbs: {machine_description()}")
    print_ratio_table("`clave --handler vm run /bin/true` with a vTPM, without and with a KBS fetch in the guest",
                      samples, baseline="tpm")
    extra = statistics.median(samples["tpm + kbs"]) - statistics.median(samples["tpm"])
    print(f"\nKBS round trip as the pod pays it: {extra:.0f} ms")


if __name__ == "__main__":
    main()
