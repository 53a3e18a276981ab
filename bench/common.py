"""Shared helpers for Clave's benchmarks: interleaved runs, summary statistics, ratio tables and a one-line
description of the machine. Import as `from common import ...` (the bench scripts run from bench/).

Interleaving (A, B, C, A, B, C, ...) keeps slow drifts of a shared machine (other jobs, CPU frequency, page
cache) from favouring whichever variant happened to run first."""

from __future__ import annotations

import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Stats:
    """Summary of one variant's samples (same unit as the samples)."""

    n: int
    median: float
    p90: float
    minimum: float


def percentile(samples: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile: the smallest sample with at least ``fraction`` of the samples at or below it."""
    if not samples:
        raise ValueError("no samples")
    ordered = sorted(samples)
    rank = math.ceil(round(fraction * len(ordered), 9))  # round: 0.9 * 20 is 18.000000000000004 in floats
    return ordered[min(max(rank, 1), len(ordered)) - 1]


def summarize(samples: Sequence[float]) -> Stats:
    return Stats(len(samples), statistics.median(samples), percentile(samples, 0.9), min(samples))


def interleave(variants: Mapping[str, Callable[[], T]], runs: int, warmup: int = 1,
               gap: float = 0.0) -> dict[str, list[T]]:
    """Call every variant once per round, in the mapping's order, for ``warmup + runs`` rounds; returns the
    results of the last ``runs`` rounds per variant. ``gap``: seconds of idle before each call, so that kernel
    state one call leaves behind does not speed up the next variant's (after a cgroup.procs write the kernel
    keeps the threadgroup lock's slow path for a grace period or two, 10-30 ms here, and the next runtime's
    cgroup join skips its wait)."""
    results: dict[str, list[T]] = {name: [] for name in variants}
    for round_index in range(warmup + runs):
        for name, measure in variants.items():
            if gap:
                time.sleep(gap)
            value = measure()
            if round_index >= warmup:
                results[name].append(value)
    return results


def timed_ms(measure: Callable[[], object]) -> float:
    """Wall-clock milliseconds of one call."""
    start = time.perf_counter()
    measure()
    return (time.perf_counter() - start) * 1000


def run_command_ms(argv: Sequence[str], stderr: IO[str] | None = None, what: str | None = None) -> float:
    """Run a command with stdin/stdout on /dev/null and return its wall-clock milliseconds; a non-zero exit
    raises RuntimeError quoting the command and the tail of ``stderr`` (a file the caller owns, rewound here).
    A file rather than a pipe: a container's process inherits it and may outlive the command."""
    if stderr is not None:
        stderr.seek(0)
        stderr.truncate()
    start = time.perf_counter()
    returncode = subprocess.call(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=stderr if stderr is not None else subprocess.DEVNULL)
    elapsed = (time.perf_counter() - start) * 1000
    if returncode != 0:
        detail = ""
        if stderr is not None:
            stderr.seek(0)
            detail = ": " + stderr.read().strip()[-500:]
        raise RuntimeError(f"{what or ' '.join(argv)} exited with {returncode}{detail}")
    return elapsed


def ratio_table(samples: Mapping[str, Sequence[float]], baseline: str | None = None, unit: str = "ms",
                label: str = "variant") -> str:
    """A fixed-width table: one row per variant with median, p90, min, n and median/baseline-median."""
    width = max(len(label), *(len(name) for name in samples))
    header = f"{label:<{width}}  {'median':>9}  {'p90':>9}  {'min':>9}  {'n':>4}"
    base = summarize(samples[baseline]).median if baseline is not None and samples.get(baseline) else None
    if base is not None:
        header += f"  {'/' + str(baseline):>8}"
    lines = [header + f"   ({unit})", "-" * len(header)]
    for name, values in samples.items():
        stats = summarize(values)
        row = f"{name:<{width}}  {stats.median:9.2f}  {stats.p90:9.2f}  {stats.minimum:9.2f}  {stats.n:4d}"
        if base is not None:
            row += f"  {stats.median / base:8.2f}" if base > 0 else f"  {'-':>8}"
        lines.append(row)
    return "\n".join(lines)


def steps_table(steps: Mapping[str, Mapping[str, Sequence[float]]], baseline: str, unit: str = "ms") -> str:
    """One row per step of a sequence: each variant's median and p90, then each variant's median ratio to
    ``baseline``. ``steps`` maps step -> variant -> samples, every step having the same variants."""
    variants = list(next(iter(steps.values())))
    others = [name for name in variants if name != baseline]
    width = max(4, *(len(step) for step in steps))
    header = f"{'step':<{width}}" + "".join(f"  {name + ' median':>14}  {'p90':>8}" for name in variants)
    header += "".join(f"  {name + '/' + baseline:>11}" for name in others)
    lines = [header + f"   ({unit})", "-" * len(header)]
    for step, per_variant in steps.items():
        stats = {name: summarize(per_variant[name]) for name in variants}
        row = f"{step:<{width}}" + "".join(f"  {stats[n].median:14.2f}  {stats[n].p90:8.2f}" for n in variants)
        base = stats[baseline].median
        row += "".join(f"  {stats[n].median / base:11.2f}" if base > 0 else f"  {'-':>11}" for n in others)
        lines.append(row)
    return "\n".join(lines)


def print_ratio_table(title: str, samples: Mapping[str, Sequence[float]], baseline: str | None = None,
                      unit: str = "ms", label: str = "variant") -> None:
    print(f"\n{title}")
    print(ratio_table(samples, baseline, unit, label))


def machine_description() -> str:
    """CPU model and count, kernel and Python version, for the header of a benchmark's output."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (f"{os.cpu_count()} CPUs ({model}), Linux {platform.release()}, "
            f"Python {platform.python_version()}")
