"""What every benchmark suite shares: the machine probe, timing, progress lines, the JSON file, command lines."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

SettingsT = TypeVar("SettingsT")

# --------------------------------------------------------------------------------------------------------------------
# The machine the figures were measured on.


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what ``platform`` knows, else ``"unknown"``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_avg() -> list[float]:
    """The 1, 5 and 15 minute load averages: taken at a suite's start and end, they show what else ran meanwhile."""
    return list(os.getloadavg())


FACTS: dict[str, Callable[[], Any]] = {
    "date": lambda: datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    "cpu_model": cpu_model,
    "cpus": os.cpu_count,  # logical CPUs of the machine
    # torch's intra-op threads now, under each of the keys the suites' JSON files have always used for it
    "threads": torch.get_num_threads,
    "torch_threads": torch.get_num_threads,
    "default_threads": torch.get_num_threads,
    "gpu": lambda: torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    "torch": lambda: torch.__version__,
    "python": platform.python_version,
    "load_avg_start": load_avg,
}


def machine(*facts: str) -> dict[str, Any]:
    """The named :data:`FACTS` of this machine and process, read now, in the order named."""
    unknown = [name for name in facts if name not in FACTS]
    if unknown:
        raise ValueError(f"unknown machine facts {unknown}; known: {', '.join(FACTS)}")
    return {name: FACTS[name]() for name in facts}


# --------------------------------------------------------------------------------------------------------------------
# Timing.


def timed(fn: Callable[[], Any]) -> float:
    """Wall-clock seconds of one call; on a GPU, after its queued kernels have finished (CPU kernels have by then)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def median_seconds(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    """Median wall-clock seconds of ``repeats`` calls after ``warmup`` untimed ones (CPU: no sync needed)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def median_iqr(seconds: list[float]) -> dict[str, Any]:
    """Median and interquartile range of a list of timings (seconds), plus the raw values for the JSON."""
    if len(seconds) >= 2:
        q1, _, q3 = statistics.quantiles(seconds, n=4, method="inclusive")
    else:
        q1 = q3 = seconds[0]
    return {"median_s": statistics.median(seconds), "iqr_s": q3 - q1, "n": len(seconds), "all_s": seconds}


# --------------------------------------------------------------------------------------------------------------------
# Output.


def progress(message: str, *, stamp: bool = True) -> None:
    """One progress line on stderr (so that stdout holds only the tables), with the time of day unless ``stamp``
    is False."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}" if stamp else message, file=sys.stderr, flush=True)


def write_json(path: Path | str, result: dict[str, Any], *, indent: int = 2) -> None:
    """Every figure of ``result`` to ``path``, one JSON document; values JSON does not know are written as text."""
    Path(path).write_text(json.dumps(result, indent=indent, default=str) + "\n")


# --------------------------------------------------------------------------------------------------------------------
# Command lines.


def command_line(
    description: str, *, formatter_class: type[argparse.HelpFormatter] = argparse.RawTextHelpFormatter
) -> argparse.ArgumentParser:
    """A suite's option parser, described by the first paragraph of ``description`` (its module docstring). An
    option not given is left out of the parsed options, so that its default is the settings dataclass's own."""
    return argparse.ArgumentParser(
        description=description.split("\n\n")[0],
        formatter_class=formatter_class,
        argument_default=argparse.SUPPRESS,
    )


def parse_settings(
    parser: argparse.ArgumentParser, settings: Callable[..., SettingsT], argv: list[str] | None
) -> SettingsT:
    """``settings(**options)`` of the parsed command line; a value the settings refuse is a usage error (exit 2)."""
    try:
        return settings(**vars(parser.parse_args(argv)))
    except ValueError as error:
        parser.error(str(error))


def run_command_line(parser: argparse.ArgumentParser, suite: Any, argv: list[str] | None) -> dict[str, Any]:
    """A suite's script: parse its settings, ``suite.run`` them, print the report and where the JSON went."""
    settings = parse_settings(parser, suite.Settings, argv)
    result = suite.run(settings)
    suite.print_report(result)
    if settings.json is not None:
        print(f"wrote {settings.json}")
    return result
