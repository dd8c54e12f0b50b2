"""Running a study's cells: each trained and evaluated in a worker process, its ``result.json`` written last.

A cell is complete when its ``result.json`` exists; a rerun skips complete cells and resumes the others from their
checkpoints, so the grid survives a kill. Cells run in parallel worker processes (``--workers``) and can be split
over machines or Slurm array tasks (``--shard K/N``). Every invocation is appended to ``out/study.json`` under a
lock; when every cell has a result, the study writes its report.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import multiprocessing
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from sgtrain.config import ConfigError
from sgtrain.study.grid import Cell, Grid, cell_fingerprint
from sgtrain.study.report import write_study_report


class StudyFailed(RuntimeError):
    """Some cells raised; the others finished and the report covers those."""


def stored_result(grid: Grid, cell: Cell) -> dict[str, Any] | None:
    """The cell's result.json if it has one; :class:`ConfigError` if the grid has changed the cell's settings since
    (results from before fingerprints were recorded carry none and are taken as they are)."""
    path = grid.out / cell.name / "result.json"
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    if "fingerprint" in result and result["fingerprint"] != cell_fingerprint(grid, cell):
        raise ConfigError(
            f"{path.parent}: its result was made with other settings than the grid's now; remove that directory to "
            "rerun the cell, or give the study another --out"
        )
    return result


@contextlib.contextmanager
def _output_to(path: Path) -> Iterator[None]:
    """Send this process's stdout and stderr (file descriptors, so tqdm and C code too) to ``path`` for a while:
    parallel cells would otherwise interleave their progress bars on one terminal."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    try:
        with open(path, "a") as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


def _train_records(run_dir: Path) -> list[dict[str, Any]]:
    from sgtrain.report import load_records

    return load_records(run_dir)["train"]


def _last_train_record(run_dir: Path) -> dict[str, Any]:
    return _train_records(run_dir)[-1]


def run_cell(grid: Grid, cell: Cell, threads: int = 1, quiet: bool = True) -> dict[str, Any]:
    """Train and evaluate one cell (resuming it if it was interrupted) and write its ``result.json``; a complete
    cell's stored result is returned as it is."""
    import torch

    from sgtrain.checkpoint import write_atomic

    run_dir = grid.out / cell.name
    stored = stored_result(grid, cell)
    if stored is not None:
        return stored
    torch.set_num_threads(threads)
    start = time.perf_counter()
    output = _output_to(run_dir / "study.log") if quiet else contextlib.nullcontext()
    with output:
        metrics = _digits_metrics(grid, cell) if cell.kind == "digits" else _gaussians_metrics(grid, cell)
    result = {**metrics, **dataclasses.asdict(cell), "name": cell.name, "cell_wall_s": time.perf_counter() - start}
    result["fingerprint"] = cell_fingerprint(grid, cell)
    write_atomic(run_dir / "result.json", (json.dumps(result, indent=1) + "\n").encode())
    return result


def _digits_metrics(grid: Grid, cell: Cell) -> dict[str, Any]:
    """Train a digits cell with the ordinary training loop, then evaluate its run directory."""
    from sgtrain.metrics.evaluate import RESULTS, evaluate_run
    from sgtrain.train import train

    assert grid.digits is not None
    run_dir = grid.out / cell.name
    dense = grid.depends_on(cell)
    if dense is not None and not (grid.out / dense.name / "result.json").is_file():
        # Pruning an unfinished dense run would prune whichever checkpoint it reached: refuse before training.
        raise ConfigError(f"{cell.name} prunes {dense.name}, which has not finished: run that cell first")
    train(grid.digits_config(cell))
    evaluation = dict(grid.digits.get("evaluate") or {})
    scores = evaluate_run(
        run_dir,
        metrics=evaluation.get("metrics", ["fid", "is", "classes"]),
        num_samples=int(evaluation.get("num_samples", 1000)),
        extractor_kind=evaluation.get("extractor", "auto"),
    )
    last = _last_train_record(run_dir)
    metrics = {k: scores[k] for k in RESULTS if k in scores}
    metrics.update(
        extractor=scores["extractor"],
        num_samples=scores["num_samples"],
        step=scores["step"],
        train_flops_vs_dense=last.get("train_flops_vs_dense", 1.0),
    )
    for net in ("G", "D"):  # where the masks ended (ADAPT moves D's density; the row keeps the nominal one)
        logged = [r[f"sparse/{net}_density"] for r in _train_records(run_dir) if f"sparse/{net}_density" in r]
        if logged:
            metrics[f"reached_density_{net.lower()}"] = logged[-1]
    if dense is not None:
        # Pruning a trained network pays for that training too: the dense run's FLOPs join the fine-tuning's.
        pretrained = json.loads((grid.out / dense.name / "result.json").read_text())
        metrics["pretrain_flops_vs_dense"] = pretrained["train_flops_vs_dense"]
        metrics["train_flops_vs_dense"] += pretrained["train_flops_vs_dense"]
    return metrics


def _gaussians_metrics(grid: Grid, cell: Cell) -> dict[str, Any]:
    """Train and score a Gaussians cell."""
    from sgtrain.study.gaussians import train_gaussians

    trained = train_gaussians(grid.gaussians_config(cell), grid.out / cell.name)
    # The cell's own fields name the row; the densities the masks reached are kept beside the nominal ones.
    metrics = {k: v for k, v in trained.items() if k not in ("dataset", "method", "seed")}
    metrics["reached_density_g"] = metrics.pop("density_g")
    metrics["reached_density_d"] = metrics.pop("density_d")
    return metrics


def _worker_cell(grid: Grid, cell: Cell, threads: int) -> dict[str, Any]:
    """A pool task: the result, or the error as data (one failing cell must not stop the grid)."""
    try:
        return run_cell(grid, cell, threads)
    except Exception as error:  # reported per cell; the study exits non-zero
        log = grid.out / cell.name / "study.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as file:  # after _output_to has restored the terminal: the traceback is the log's
            file.write(traceback.format_exc())
        return {"name": cell.name, "error": f"{type(error).__name__}: {error}"}


def _usable_cpus() -> int:
    """CPUs this process may run on (a Slurm or container allocation), not the whole machine's count."""
    with contextlib.suppress(AttributeError):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def parse_shard(shard: str | None) -> tuple[int, int]:
    """``"K/N"`` (1-based) as (K-1, N); None is the whole grid."""
    if shard is None:
        return 0, 1
    try:
        k, n = (int(part) for part in str(shard).split("/"))
    except ValueError:
        raise ConfigError(f"--shard must be K/N, e.g. 1/4, got {shard!r}") from None
    if not 1 <= k <= n:
        raise ConfigError(f"--shard K/N needs 1 <= K <= N, got {shard!r}")
    return k - 1, n


def shard_cells(grid: Grid, index: int, count: int) -> list[Cell]:
    """The cells of shard ``index`` of ``count``: every ``count``-th cell of the grid, a cell that depends on another
    (prune-and-finetune on its dense cell) placed in that cell's shard so that one invocation runs both."""
    cells = grid.cells()
    position = {cell: i for i, cell in enumerate(cells)}

    def anchor(cell: Cell) -> int:
        dense = grid.depends_on(cell)
        return position[dense] if dense is not None else position[cell]

    return [cell for cell in cells if anchor(cell) % count == index]


def _commit() -> str:
    """The code's git commit (+dirty when the package has changes, untracked modules included), or 'unknown'."""
    root = Path(__file__).resolve().parents[2]  # sgtrain/study/runner.py -> the checkout
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        status = subprocess.run(
            ["git", "status", "--porcelain", "--", "sgtrain", "pyproject.toml"],
            cwd=root,
            capture_output=True,
            text=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("+dirty" if status.stdout.strip() else "")


def run_study(
    grid: Grid,
    *,
    workers: int = 1,
    shard: str | None = None,
    benches: list[str] | None = None,
    command: str = "",
    report: bool = True,
) -> dict[str, Any]:
    """Run the grid's missing cells (of this shard, of these benchmarks) over ``workers`` processes, then write
    the report if every cell has a result. Returns ``{"ran", "skipped", "failed", "report"}``; raises
    :class:`StudyFailed` after writing what it can when a cell raised."""
    index, count = parse_shard(shard)
    known = {c.bench for c in grid.cells()}
    unknown = sorted(set(benches or []) - known)
    if unknown:
        raise ConfigError(f"--bench {unknown[0]!r}: this grid has {', '.join(sorted(known))}")
    cells = [c for c in shard_cells(grid, index, count) if not benches or c.bench in benches]
    todo = [c for c in cells if stored_result(grid, c) is None]  # (a stale result fails here, before any work)
    grid.out.mkdir(parents=True, exist_ok=True)
    started, clock = datetime.datetime.now(datetime.timezone.utc), time.perf_counter()
    commit = _commit()  # the code that runs
    threads = max(1, _usable_cpus() // max(1, workers))
    print(
        f"sgtrain study: {len(cells)} cells, {len(cells) - len(todo)} complete, {len(todo)} to run on {workers} "
        f"process(es) x {threads} thread(s); results in {grid.out}",
        flush=True,
    )
    failed = _run_cells(grid, todo, workers, threads) if todo else []
    wall = time.perf_counter() - clock
    ran = sorted({c.name for c in todo} - {f["name"] for f in failed})
    _record_invocation(grid, started, wall, ran, workers, shard, command, commit)
    outcome: dict[str, Any] = {"ran": len(todo) - len(failed), "skipped": len(cells) - len(todo), "failed": failed}
    missing = [c.name for c in grid.cells() if not (grid.out / c.name / "result.json").is_file()]
    if report and not missing:
        outcome["report"] = write_study_report(grid)
    elif report:
        print(f"sgtrain study: {len(missing)} cells have no result yet (other shards?); no report written", flush=True)
    if failed:
        names = ", ".join(f["name"] for f in failed)
        raise StudyFailed(f"{len(failed)} cell(s) failed: {names} (see each cell's study.log; rerun to retry them)")
    return outcome


def _run_cells(grid: Grid, cells: list[Cell], workers: int, threads: int) -> list[dict[str, Any]]:
    """Run ``cells`` over a pool of ``workers`` processes, printing each as it finishes; returns the failed ones.
    A cell whose dependency is among ``cells`` waits for it, and fails without running if that one failed."""
    failed: list[dict[str, Any]] = []
    done = 0
    todo = set(cells)
    waiting = {cell: dep for cell in cells if (dep := grid.depends_on(cell)) is not None and dep in todo}
    context = multiprocessing.get_context("spawn")  # a clean interpreter per worker: no forked torch threads

    def report(result: dict[str, Any]) -> None:
        nonlocal done
        done += 1
        if "error" in result:
            failed.append(result)
            print(f"  [{done}/{len(cells)}] {result['name']}: FAILED: {result['error']}", flush=True)
        else:
            print(f"  [{done}/{len(cells)}] {result['name']}: {_headline(result)}", flush=True)

    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        submitted = {pool.submit(_worker_cell, grid, cell, threads): cell for cell in cells if cell not in waiting}
        pending = set(submitted)
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                try:
                    result = future.result()
                except BrokenProcessPool as error:  # a worker died (killed, out of memory): its cells fail
                    result = {"name": submitted[future].name, "error": f"worker process died: {error}"}
                report(result)
                for cell in [c for c, dep in waiting.items() if dep == submitted[future]]:
                    del waiting[cell]
                    if "error" in result:
                        report({"name": cell.name, "error": f"not run: the cell it needs, {result['name']}, failed"})
                        continue
                    try:
                        future_of_cell = pool.submit(_worker_cell, grid, cell, threads)
                    except BrokenProcessPool as error:  # a worker died meanwhile: the pool takes no more work
                        report({"name": cell.name, "error": f"worker process died: {error}"})
                        continue
                    submitted[future_of_cell] = cell
                    pending.add(future_of_cell)
    return failed


def _headline(result: dict[str, Any]) -> str:
    shown = {k: result[k] for k in ("fid", "is", "classes_covered", "modes_covered", "hq_rate") if k in result}
    text = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items())
    return f"{text}; {result['cell_wall_s']:.0f} s"


def _record_invocation(
    grid: Grid,
    started: datetime.datetime,
    wall: float,
    cells: list[str],
    workers: int,
    shard: str | None,
    command: str,
    commit: str,
) -> None:
    """Append this invocation to ``out/study.json``: the report's wall time is the sum over invocations."""
    import fcntl

    import torch

    from sgtrain.checkpoint import write_atomic

    path = grid.out / "study.json"
    record = {
        "grid": grid.path.name,  # grids may share an `out` (study_headline.yaml reuses study.yaml's cells)
        "cells": cells,
        "started": started.isoformat(timespec="seconds"),
        "wall_s": wall,
        "cells_run": len(cells),
        "workers": workers,
        "shard": shard,
        "command": command,
        "commit": commit,
        "host": platform.node(),
        "cpus": _usable_cpus(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    with open(grid.out / "study.json.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # shards on one file system may finish at the same moment
        log = json.loads(path.read_text()) if path.is_file() else {"invocations": []}
        log["invocations"].append(record)
        write_atomic(path, (json.dumps(log, indent=1) + "\n").encode())
