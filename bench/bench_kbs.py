"""clave-kbs: RCAR round-trip latency and throughput with concurrent clients, on loopback over HTTPS.

    python bench/bench_kbs.py [--runs N] [--clients C] [--flows F] [--seconds S]

One broker process (``python -m clave.kbs.cli serve --allow-insecure``, self-signed P-256 certificate, a secret
stored through the admin CLI) and clients here, using the real client (``clave.kbs.client.fetch_resource``):
a fresh TLS connection, auth → attest → resource, JWE decrypted, per flow.

- Round trip: N sequential flows per evidence kind, interleaved (sample, wasm, sample, ...) after one warm-up;
  median / p90 / min in ms.
- Throughput: C client threads run full flows until F flows are done or S seconds pass (whichever first);
  flows per second (= attestations per second: every flow attests once), latency under load, failures.

Evidence is what any machine can make: the ``sample`` attester and WASM enclave reports (Ed25519 platform key).
Both verify in microseconds, so the numbers show the broker's and the protocol's own cost; a hardware TEE adds
its quote generation (client side) and quote verification (broker side, see bench_quote_verify.py).
The clients share one Python process (GIL) and the machine's cores with the broker: the throughput is a floor.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "kbs"))  # broker set-up shared with tests

from common import interleave, machine_description, summarize  # noqa: E402
from kbs_env import MRENCLAVE, MRSIGNER, Kbs, make_material, start_kbs, stop_kbs  # noqa: E402

from clave.attestation.attesters.sample import SampleAttester  # noqa: E402
from clave.attestation.wasm_report import make_report  # noqa: E402
from clave.kbs.client import KbsError, fetch_resource  # noqa: E402

SECRET = b"bench secret " * 4
RESOURCE = "default/key/bench"
Attest = Callable[[bytes], tuple[str, bytes]]


def attesters(kbs: Kbs) -> dict[str, Attest]:
    sample = SampleAttester()
    key = kbs.material.wasm_key

    def sample_attest(report_data: bytes) -> tuple[str, bytes]:
        return "sample", sample.attest(report_data).data

    def wasm_attest(report_data: bytes) -> tuple[str, bytes]:
        return "wasm", make_report(key, MRENCLAVE, MRSIGNER, report_data)

    return {"sample": sample_attest, "wasm": wasm_attest}


def flow(kbs: Kbs, attest: Attest) -> float:
    start = time.perf_counter()
    secret = fetch_resource(kbs.url, RESOURCE, attest, ca_file=kbs.ca_file, timeout=30)
    elapsed = (time.perf_counter() - start) * 1000
    if secret != SECRET:
        raise SystemExit("bench: the broker released the wrong bytes")
    return elapsed


def round_trip(kbs: Kbs, runs: int) -> None:
    variants = {name: (lambda a=attest: flow(kbs, a)) for name, attest in attesters(kbs).items()}
    results = interleave(variants, runs, warmup=1)
    print(f"\nRCAR round trip (auth → attest → resource, new TLS connection each), {runs} runs per evidence kind")
    print("| evidence | median ms | p90 ms | min ms |")
    print("| --- | ---: | ---: | ---: |")
    for name, samples in results.items():
        stats = summarize(samples)
        print(f"| {name} | {stats.median:.1f} | {stats.p90:.1f} | {stats.minimum:.1f} |")


def throughput(kbs: Kbs, clients: int, flows: int, seconds: float) -> None:
    attest = attesters(kbs)["sample"]
    lock = threading.Lock()
    latencies: list[float] = []
    failures: list[str] = []
    started = [0]
    deadline = time.monotonic() + seconds
    barrier = threading.Barrier(clients + 1)

    def client() -> None:
        barrier.wait()
        while time.monotonic() < deadline:
            with lock:
                if started[0] >= flows:
                    return
                started[0] += 1
            try:
                elapsed = flow(kbs, attest)
            except KbsError as exc:
                with lock:
                    failures.append(str(exc))
                continue
            with lock:
                latencies.append(elapsed)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join(seconds + 60)
    wall = time.perf_counter() - start
    print(f"\nThroughput: {clients} concurrent clients (threads), at most {flows} flows or {seconds:g} s")
    print("| clients | flows ok | failed | wall s | attestations/s | median ms | p90 ms |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    stats = summarize(latencies) if latencies else None
    median = f"{stats.median:.0f}" if stats else "-"
    p90 = f"{stats.p90:.0f}" if stats else "-"
    print(f"| {clients} | {len(latencies)} | {len(failures)} | {wall:.1f} | {len(latencies) / wall:.1f} | "
          f"{median} | {p90} |")
    if failures:
        print(f"first failure: {failures[0]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50, help="sequential flows per evidence kind (default 50)")
    parser.add_argument("--clients", type=int, default=50, help="concurrent client threads (default 50)")
    parser.add_argument("--flows", type=int, default=500, help="flows in the throughput run at most (default 500)")
    parser.add_argument("--seconds", type=float, default=30.0, help="throughput run time limit (default 30)")
    args = parser.parse_args()
    print(f"clave-kbs bench on {machine_description()}")
    with tempfile.TemporaryDirectory(prefix="bench-kbs-") as tmp:
        material = make_material(Path(tmp))
        kbs = start_kbs(material, Path(tmp) / "state", "--allow-insecure", "--session-ttl", "120")
        try:
            import subprocess

            secret_file = Path(tmp) / "secret"
            secret_file.write_bytes(SECRET)
            subprocess.run([sys.executable, "-m", "clave.kbs.cli", "put-resource", "--url", kbs.url, "--ca-file",
                            kbs.ca_file, "--admin-key", str(material.admin_private), RESOURCE, str(secret_file)],
                           check=True, capture_output=True)
            round_trip(kbs, args.runs)
            throughput(kbs, args.clients, args.flows, args.seconds)
        finally:
            stop_kbs(kbs)


if __name__ == "__main__":
    main()
