"""Framework-neutral timing and memory helpers shared by the JAX side and the torch worker."""

from __future__ import annotations

import os
import resource
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# How many runs to time (after warm-up): at least ``min_repeats``, at most ``max_repeats``,
# and stop adding runs once ``budget_s`` seconds of timed runs have passed.
DEFAULT_POLICY = {"warmup": 1, "min_repeats": 3, "max_repeats": 10, "budget_s": 20.0}
QUICK_POLICY = {"warmup": 1, "min_repeats": 2, "max_repeats": 3, "budget_s": 2.0}


def measure(fn: Callable[[], Any], *, warmup: int = 1, min_repeats: int = 3, max_repeats: int = 10,
            budget_s: float = 20.0) -> dict[str, Any]:
    """Time ``fn`` (which must return only once its work is finished).

    The first call is timed on its own (``first_s``: it includes compilation for jitted code),
    then ``warmup - 1`` more untimed calls, then the timed runs. Returns the median, min, max
    and all wall-clock run times in seconds, and the median CPU time of the process per run
    (all threads; on a shared machine it shows how much of the wall time was spent waiting).
    """
    if min_repeats < 1 or max_repeats < min_repeats:
        raise ValueError("need 1 <= min_repeats <= max_repeats")
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    for _ in range(max(0, warmup - 1)):
        fn()
    times: list[float] = []
    cpu: list[float] = []
    spent = 0.0
    while len(times) < max_repeats and (len(times) < min_repeats or spent < budget_s):
        c0 = time.process_time()
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        cpu.append(time.process_time() - c0)
        times.append(dt)
        spent += dt
    return {
        "median_s": statistics.median(times),
        "cpu_median_s": statistics.median(cpu),
        "min_s": min(times),
        "max_s": max(times),
        "runs": len(times),
        "first_s": first,
        "times_s": times,
    }


def cpu_threads() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# The vector extensions that set how fast each framework's kernels can be (oneDNN's are strongest with
# AVX-512 and AMX; bfloat16 arithmetic in hardware needs AVX512-BF16 or AMX): printed with every figure.
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_info(cpuinfo: str = "/proc/cpuinfo") -> dict[str, Any]:
    """``{"cpu": model name, "isa": the ISA_FLAGS present, "cores": cpu_threads()}`` from ``cpuinfo``
    (Linux; "unknown CPU" and no flags elsewhere)."""
    model, flags = "unknown CPU", set()
    try:
        lines = Path(cpuinfo).read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model == "unknown CPU":
            model = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    return {"cpu": model, "isa": [f for f in ISA_FLAGS if f in flags], "cores": cpu_threads()}


def cpu_summary(info: dict[str, Any] | None = None) -> str:
    """One line for a report: ``AMD EPYC (avx2, avx512f), 2 cores``."""
    info = info or cpu_info()
    return f"{info['cpu']} ({', '.join(info['isa']) or 'none of ' + '/'.join(ISA_FLAGS)}), {info['cores']} cores"


def current_rss() -> int:
    """Resident set size of this process in bytes (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def max_rss() -> int:
    """Peak resident set size of this process so far, in bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class RssSampler:
    """Samples this process's resident set size in a thread; ``peak`` is the highest seen.

    Use as a context manager around the work to measure; ``base`` is the RSS at entry.
    """

    def __init__(self, interval_s: float = 0.002):
        self.interval_s = interval_s
        self.base = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, current_rss())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> RssSampler:
        self.base = current_rss()
        self.peak = self.base
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, current_rss())

    @property
    def growth(self) -> int:
        """Peak RSS minus the RSS at entry, in bytes."""
        return self.peak - self.base
