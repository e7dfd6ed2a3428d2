"""What every benchmark shares: contenders interleaved over repeats, median with min and max, and
the environment a result was measured in.

Interleaving (A B C, B C A, C A B, ...) spreads slow phases of a shared machine (another process,
a clock change, thermal limits) over all contenders instead of charging them to whichever ran
then; ratios are taken repeat by repeat (A_r / B_r), so their spread is that of the comparison.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping

import torch


def small_mode() -> bool:
    """DIFFFIT_BENCH_SMALL=1: tiny sizes, so a whole GPU script can be smoke-run on a CPU first."""
    return os.environ.get("DIFFFIT_BENCH_SMALL", "") not in ("", "0")


def synchronizer(device: torch.device | str) -> Callable[[], None]:
    device = torch.device(device)
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def timer(fn: Callable[[], object], device: torch.device | str) -> Callable[[], float]:
    """fn -> a callable returning fn's wall seconds, the device synchronized before and after."""
    sync = synchronizer(device)

    def run() -> float:
        sync()
        start = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - start

    return run


def interleave(contenders: Mapping[str, Callable[[], float]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Run each contender (a callable returning seconds) `warmup` times, then `repeats` rounds in
    rotating order; returns the measured seconds per contender, in round order."""
    names = list(contenders)
    for _ in range(warmup):
        for name in names:
            contenders[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            times[name].append(contenders[name]())
    return times


def spread(values: list[float], digits: int = 5) -> dict:
    """{'median', 'min', 'max', 'n'} of a list of measurements."""
    return {
        "median": round(statistics.median(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
        "n": len(values),
    }


def paired_ratio(numerator: list[float], denominator: list[float], digits: int = 3) -> dict:
    """The spread of round-by-round ratios of two interleaved contenders."""
    return spread([a / b for a, b in zip(numerator, denominator, strict=True)], digits)


def reproduces(first: dict, second: dict) -> bool:
    """Whether the second run's median lies within the first run's printed [min, max] and vice versa:
    the rule for quoting a median in the README."""
    return (first["min"] <= second["median"] <= first["max"]) and (second["min"] <= first["median"] <= second["max"])


def environment(device: torch.device | str) -> dict:
    device = torch.device(device)
    env = {
        "device": device.type,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    else:
        env["cpu_threads"] = torch.get_num_threads()
        env["cpus"] = os.cpu_count()
    return env


def result_name(env: dict) -> str:
    """'NVIDIA-H200_torch-2.14.1_2026-11-29' style file stem for benchmarks/results/."""
    device = env.get("gpu") or f"cpu-x{env.get('cpu_threads', 1)}"
    raw = f"{device}_torch-{env['torch'].split('+')[0]}_{env['date'][:10]}"
    return re.sub(r"[^\w.-]+", "-", raw)


class Worker:
    """The parent's handle on one benchmark worker process: `script ARGV` answering one JSON line per request
    (its first line when it is ready), so each contender's peak memory is its own while the parent
    interleaves them."""

    def __init__(self, script: str, argv: list[str], env: dict):
        self.proc = subprocess.Popen(
            [sys.executable, script, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        self.ready = self.reply()

    def reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"a benchmark worker exited with {self.proc.wait()}")
        return json.loads(line)

    def ask(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.reply()


def without_values(argv: list[str], flags: tuple[str, ...]) -> list[str]:
    """argv without `flags` and their values (given as `--flag value` or `--flag=value`): what a parent
    passes on to its workers, which get their own values of those flags."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in flags:
            skip = True
        elif not arg.startswith(tuple(f"{f}=" for f in flags)):
            out.append(arg)
    return out


def emit(report: dict) -> None:
    """Print the one JSON object a benchmark reports."""
    print(json.dumps(report, indent=2), flush=True)
