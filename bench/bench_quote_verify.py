"""Per-quote verification time of the Intel DCAP verifiers, cold (empty caches) and with cached collateral.

Run: .venv/bin/python bench/bench_quote_verify.py [--rounds N]. Prints medians in milliseconds. The anchor
is about 0.5 ms per quote for native verifiers (Intel QVL, dcap-qvl) with collateral already verified.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from clave.attestation.base import Collateral, Verifier, VerifyContext
from clave.attestation.verifiers.intel_dcap import SgxEcdsaVerifier, TdxEcdsaVerifier, clear_caches

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "testdata" / "attestation"
ROLES = {
    "tcb_info": "tcb_info.json",
    "qe_identity": "qe_identity.json",
    "root_ca_crl": "root_ca_crl.der",
    "pck_crl": "pck_crl.der",
    "tcb_signing_chain": "tcb_info_issuer_chain.pem",
}
SAMPLES = [
    ("sgx", "dcapqvl_00a067110000", SgxEcdsaVerifier),
    ("tdx", "dcapqvl_v4_b0c06f000000", TdxEcdsaVerifier),
    ("tdx", "dcapqvl_v5_90c06f000000_outdated", TdxEcdsaVerifier),
]


def _load(tee: str, name: str) -> tuple[bytes, VerifyContext]:
    sample = next(s for s in json.loads((DATA / tee / "manifest.json").read_text()) if s["name"] == name)
    collateral = Collateral()
    for role, file in sample["files"].items():
        if role in ROLES:
            collateral.set(ROLES[role], (DATA / tee / file).read_bytes())
    now = dt.datetime.fromisoformat(sample["validity"]["suggested_now"].replace("Z", "+00:00"))
    return (DATA / tee / sample["files"]["quote"]).read_bytes(), VerifyContext(now=now, collateral=collateral)


def _median_ms(run: Callable[[], object], rounds: int, cold: bool) -> float:
    times = []
    for _ in range(rounds):
        if cold:
            clear_caches()
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=300)
    args = parser.parse_args()
    if not DATA.is_dir():
        print(f"test data not found at {DATA}", file=sys.stderr)
        return 1
    print(f"{'sample':36} {'cold ms':>8} {'cached ms':>10}  (medians; full collateral: TCB info, QE identity, CRLs)")
    for tee, name, verifier_class in SAMPLES:
        quote, ctx = _load(tee, name)
        verifier: Verifier = verifier_class()

        def run(quote: bytes = quote, ctx: VerifyContext = ctx, verifier: Verifier = verifier) -> object:
            return verifier.verify(quote, ctx)

        cold = _median_ms(run, max(10, args.rounds // 10), cold=True)
        run()
        warm = _median_ms(run, args.rounds, cold=False)
        print(f"{name:36} {cold:8.2f} {warm:10.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
