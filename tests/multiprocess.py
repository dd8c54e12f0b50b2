"""Run a function on N real processes joined in one gloo process group, as `accelerate launch` would start them.

Each process gets the environment a launcher sets (RANK, WORLD_SIZE, MASTER_ADDR/PORT, ACCELERATE_USE_CPU), so
``sgtrain.dist.Dist()`` inside it builds the real process group. The caller gets every rank's exit code and error
text, and a process group that hangs is killed at a deadline instead of hanging the test suite.
"""

from __future__ import annotations

import os
import socket
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp


@dataclass
class RankResult:
    rank: int
    exitcode: int | None  # None: killed at the deadline
    error: str  # the traceback of an exception raised on this rank, "" if none


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(fn: Callable[..., Any], rank: int, world_size: int, port: int, error_dir: str, args: tuple) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        ACCELERATE_USE_CPU="1",
        OMP_NUM_THREADS="1",
    )
    import torch

    torch.set_num_threads(1)  # two processes on two cores: intra-op threads would only fight each other
    try:
        fn(rank, *args)
    except SystemExit:
        raise  # the worker chose its exit code
    except BaseException:
        Path(error_dir, f"rank{rank}.err").write_text(traceback.format_exc())
        sys.exit(1)


def run_ranks(fn: Callable[..., Any], *args: Any, world_size: int = 2, timeout: float = 180.0) -> list[RankResult]:
    """Run ``fn(rank, *args)`` on ``world_size`` spawned processes; ``fn`` and ``args`` must be picklable."""
    import tempfile

    context = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory() as error_dir:
        processes = [
            context.Process(target=_entry, args=(fn, rank, world_size, port, error_dir, args))
            for rank in range(world_size)
        ]
        for process in processes:
            process.start()
        deadline = time.monotonic() + timeout
        for process in processes:
            process.join(max(deadline - time.monotonic(), 0.0))
        hung = [p for p in processes if p.is_alive()]
        for process in hung:
            process.kill()
            process.join()
        results = []
        for rank, process in enumerate(processes):
            error_file = Path(error_dir, f"rank{rank}.err")
            error = error_file.read_text() if error_file.exists() else ""
            results.append(RankResult(rank, None if process in hung else process.exitcode, error))
    return results


def assert_all_succeeded(results: list[RankResult]) -> None:
    failed = [r for r in results if r.exitcode != 0]
    assert not failed, "\n".join(f"rank {r.rank}: exit {r.exitcode}\n{r.error[-3000:]}" for r in failed)
