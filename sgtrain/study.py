"""The study: a grid of ordinary training runs that tests the paper's claims at a scale one CPU can run.

``python -m sgtrain study --grid study.yaml`` expands a grid file (``configs/study/``) into cells, one per (benchmark,
method, G density, D density, seed), and runs each as an ordinary run directory under the grid's ``out``:

- ``digits/<method>-g0.1-d0.3-s0``: a small BigGAN on the bundled digits, trained by :func:`sgtrain.train.train` and
  then evaluated by :func:`sgtrain.metrics.evaluate.evaluate_run` (classifier Fréchet distance, IS analogue, classes
  covered). ``sgtrain inspect``, ``report``, ``sample`` and ``evaluate`` all work on it.
- ``ring8/...`` and ``grid25/...``: the 2-D mixture-of-Gaussians benchmark (:mod:`sgtrain.gaussians`).

A cell is complete when its ``result.json`` exists; a rerun skips complete cells and resumes the others from their
checkpoints, so the grid survives a kill. Cells run in parallel worker processes (``--workers``) and can be split
over machines or Slurm array tasks (``--shard K/N``). When every cell has a result, the study writes its report
(``docs/study.md`` by default): tables of mean and spread over seeds, plots, and a verdict on each of the paper's
claims computed from the numbers, with the command, commit and wall time that produced them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import math
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from sgtrain.config import CONFIG_DIR, Config, ConfigError, load_config, resolve_config_path

STUDY_DIR = CONFIG_DIR / "study"
GRID_KEYS = {"out", "report", "seeds", "methods", "digits", "gaussians"}
DIGITS_KEYS = {"config", "overrides", "density_g", "density_d", "evaluate"}
GAUSSIANS_KEYS = {"datasets", "density_g", "density_d", "settings"}
EVALUATE_KEYS = {"metrics", "num_samples", "extractor"}
# The paper's names for the methods, in the order tables list them.
LABELS = {"dense": "dense", "static": "static", "snip": "SNIP", "gmp": "GMP", "stu": "STU-GAN"}
NOTES_MARKER = "<!-- notes: everything below this line is kept when the study rewrites this file -->"


class StudyFailed(RuntimeError):
    """Some cells raised; the others finished and the report covers those."""


# --------------------------------------------------------------------------------------------------------------------
# The grid.


@dataclass(frozen=True)
class Cell:
    """One run of the grid."""

    bench: str  # digits | ring8 | grid25
    method: str  # a key of the grid's methods
    density_g: float
    density_d: float
    seed: int

    @property
    def kind(self) -> str:
        return "digits" if self.bench == "digits" else "gaussians"

    @property
    def name(self) -> str:
        """The run directory under the grid's ``out``."""
        if self.density_g == 1 and self.density_d == 1:
            return f"{self.bench}/{self.method}-s{self.seed}"
        return f"{self.bench}/{self.method}-g{self.density_g:g}-d{self.density_d:g}-s{self.seed}"

    def key(self) -> tuple[str, str, float, float]:
        """The cell without its seed: the rows of the tables."""
        return (self.bench, self.method, self.density_g, self.density_d)


@dataclass
class Grid:
    """A parsed grid file."""

    path: Path
    out: Path
    report: Path
    seeds: list[int]
    methods: dict[str, dict[str, Any]]  # name -> sparse settings (sparse.method and its options)
    digits: dict[str, Any] | None
    gaussians: dict[str, Any] | None

    def cells(self) -> list[Cell]:
        """Every cell, dense once per seed (its densities are 1), the costliest first so the slowest finish early."""
        cells: list[Cell] = []
        for section, benches in (
            (self.digits, ["digits"]),
            (self.gaussians, (self.gaussians or {}).get("datasets", [])),
        ):
            if section is None:
                continue
            for name in benches:
                for method, settings in self.methods.items():
                    pairs = (
                        [(1.0, 1.0)]
                        if settings["method"] == "dense"
                        else [(float(g), float(d)) for g in section["density_g"] for d in section["density_d"]]
                    )
                    cells += [Cell(name, method, g, d, seed) for g, d in pairs for seed in self.seeds]
        return sorted(cells, key=lambda c: (c.kind != "digits", -c.density_g, c.method, c.seed))

    def digits_config(self, cell: Cell) -> Config:
        """The full training config of a digits cell."""
        assert self.digits is not None
        overrides = dict(self.digits.get("overrides") or {})
        overrides.update({f"sparse.{key}": value for key, value in self.methods[cell.method].items()})
        overrides.update(
            {
                "sparse.density_g": cell.density_g,
                "sparse.density_d": cell.density_d,
                "seed": cell.seed,
                "run_dir": str(self.out / cell.name),
            }
        )
        return load_config(self.digits.get("config") or "digits.yaml", overrides)

    def gaussians_settings(self, cell: Cell) -> dict[str, Any]:
        """The settings of a Gaussians cell, for :func:`sgtrain.gaussians.gaussians_config`."""
        assert self.gaussians is not None
        settings = dict(self.gaussians.get("settings") or {})
        sparse = {**settings.pop("sparse", {}), **self.methods[cell.method]}
        sparse.update(density_g=cell.density_g, density_d=cell.density_d)
        return {**settings, "dataset": cell.bench, "seed": cell.seed, "sparse": sparse}


def cell_fingerprint(grid: Grid, cell: Cell) -> str:
    """A hash of everything that makes a cell's result: its full training config (less run_dir, which --out moves)
    and evaluation settings, or its Gaussians settings. A stored result of other settings is stale."""
    import hashlib

    if cell.kind == "digits":
        from sgtrain.config import config_to_yaml

        cfg = dataclasses.replace(grid.digits_config(cell), run_dir="cell")  # the same for every --out
        text = config_to_yaml(cfg) + json.dumps((grid.digits or {}).get("evaluate") or {}, sort_keys=True)
    else:
        from sgtrain.gaussians import gaussians_config

        # The resolved config, defaults included: a change of sgtrain's defaults changes the cell too.
        text = json.dumps(dataclasses.asdict(gaussians_config(grid.gaussians_settings(cell))), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


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


def resolve_grid_path(name: str | Path) -> Path:
    """A path as given if it exists, else a bare name looked up in the shipped ``configs/study/``."""
    return resolve_config_path(name, STUDY_DIR, "grid")


def _unknown(keys: Any, valid: set[str], where: str) -> None:
    bad = sorted(set(keys) - valid)
    if bad:
        raise ConfigError(f"{where}: unknown key {bad[0]!r}; valid keys: {', '.join(sorted(valid))}")


def _densities(section: dict[str, Any], key: str, where: str) -> list[float]:
    values = section.get(key)
    values = [values] if isinstance(values, (int, float)) else values
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}.{key}: give one density or a list of them")
    if not all(isinstance(v, (int, float)) and 0 < v <= 1 for v in values):
        raise ConfigError(f"{where}.{key}: densities must lie in (0, 1], got {values}")
    return [float(v) for v in values]


def load_grid(name: str | Path, out: str | Path | None = None, report: str | Path | None = None) -> Grid:
    """Parse and check a grid file, and build every cell's config, so a bad grid fails before any cell runs."""
    path = resolve_grid_path(name)
    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    _unknown(tree, GRID_KEYS, str(path))
    seeds = tree.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise ConfigError(f"{path}: seeds must be a list of integers")
    methods = tree.get("methods")
    if not isinstance(methods, dict) or not methods:
        raise ConfigError(f"{path}: methods must map names to sparse settings, e.g. stu: {{method: stu}}")
    for method, settings in methods.items():
        if not isinstance(settings, dict) or "method" not in settings:
            raise ConfigError(f"{path}: methods.{method} must give sparse settings with a 'method' key")
    digits, gaussians = tree.get("digits"), tree.get("gaussians")
    if digits is None and gaussians is None:
        raise ConfigError(f"{path}: nothing to run: give a digits or a gaussians section")
    if digits is not None:
        _unknown(digits, DIGITS_KEYS, f"{path}: digits")
        digits["density_g"] = _densities(digits, "density_g", "digits")
        digits["density_d"] = _densities(digits, "density_d", "digits")
        _unknown(digits.get("evaluate") or {}, EVALUATE_KEYS, f"{path}: digits.evaluate")
    if gaussians is not None:
        _unknown(gaussians, GAUSSIANS_KEYS, f"{path}: gaussians")
        gaussians["density_g"] = _densities(gaussians, "density_g", "gaussians")
        gaussians["density_d"] = _densities(gaussians, "density_d", "gaussians")
        if not gaussians.get("datasets"):
            raise ConfigError(f"{path}: gaussians.datasets must list ring8 and/or grid25")
    grid = Grid(
        path=path,
        out=Path(out if out is not None else tree.get("out", "runs/study")),
        report=Path(report if report is not None else tree.get("report", "docs/study.md")),
        seeds=seeds,
        methods=methods,
        digits=digits,
        gaussians=gaussians,
    )
    names = [cell.name for cell in grid.cells()]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:  # two workers would train the same run directory at once
        raise ConfigError(f"{path}: cell {repeated[0]} comes twice (a repeated seed or density)")
    for cell in grid.cells():  # every config is built now: one clear error before hours of work, not during them
        try:
            if cell.kind == "digits":
                grid.digits_config(cell)
            else:
                from sgtrain.gaussians import gaussians_config

                gaussians_config(grid.gaussians_settings(cell))
        except ConfigError as error:
            raise ConfigError(f"{path}: cell {cell.name}: {error}") from None
    return grid


# --------------------------------------------------------------------------------------------------------------------
# Running cells.


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


def _last_train_record(run_dir: Path) -> dict[str, Any]:
    from sgtrain.report import load_records

    return load_records(run_dir)["train"][-1]


def run_cell(grid: Grid, cell: Cell, threads: int = 1, quiet: bool = True) -> dict[str, Any]:
    """Train and evaluate one cell (resuming it if it was interrupted) and write its ``result.json``; a complete
    cell's stored result is returned as it is."""
    import torch

    from sgtrain.checkpoint import write_atomic

    run_dir = grid.out / cell.name
    result_path = run_dir / "result.json"
    stored = stored_result(grid, cell)
    if stored is not None:
        return stored
    torch.set_num_threads(threads)
    start = time.perf_counter()
    output = _output_to(run_dir / "study.log") if quiet else contextlib.nullcontext()
    with output:
        if cell.kind == "digits":
            from sgtrain.metrics.evaluate import evaluate_run
            from sgtrain.train import train

            assert grid.digits is not None
            train(grid.digits_config(cell))
            evaluation = dict(grid.digits.get("evaluate") or {})
            scores = evaluate_run(
                run_dir,
                metrics=evaluation.get("metrics", ["fid", "is", "classes"]),
                num_samples=int(evaluation.get("num_samples", 1000)),
                extractor_kind=evaluation.get("extractor", "auto"),
            )
            last = _last_train_record(run_dir)
            metrics = {
                k: scores[k] for k in ("fid", "kid", "is", "precision", "recall", "classes_covered") if k in scores
            }
            metrics.update(
                extractor=scores["extractor"],
                num_samples=scores["num_samples"],
                step=scores["step"],
                train_flops_vs_dense=last.get("train_flops_vs_dense", 1.0),
            )
        else:
            from sgtrain.gaussians import gaussians_config, train_gaussians

            trained = train_gaussians(gaussians_config(grid.gaussians_settings(cell)), run_dir)
            # The cell's own fields name the row; the densities the masks reached are kept beside the nominal ones.
            metrics = {k: v for k, v in trained.items() if k not in ("dataset", "method", "seed")}
            metrics["reached_density_g"] = metrics.pop("density_g")
            metrics["reached_density_d"] = metrics.pop("density_d")
    result = {**metrics, **dataclasses.asdict(cell), "name": cell.name, "cell_wall_s": time.perf_counter() - start}
    result["fingerprint"] = cell_fingerprint(grid, cell)
    write_atomic(result_path, (json.dumps(result, indent=1) + "\n").encode())
    return result


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


def _commit() -> str:
    """The code's git commit (+dirty when the package has changes, untracked modules included), or 'unknown'."""
    root = Path(__file__).resolve().parent.parent
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
    cells = [c for i, c in enumerate(grid.cells()) if i % count == index and (not benches or c.bench in benches)]
    todo = [c for c in cells if stored_result(grid, c) is None]  # (a stale result fails here, before any work)
    grid.out.mkdir(parents=True, exist_ok=True)
    started, clock, commit = (
        datetime.datetime.now(datetime.timezone.utc),
        time.perf_counter(),
        _commit(),
    )  # the code that runs
    threads = max(1, _usable_cpus() // max(1, workers))
    print(
        f"sgtrain study: {len(cells)} cells, {len(cells) - len(todo)} complete, {len(todo)} to run on {workers} "
        f"process(es) x {threads} thread(s); results in {grid.out}",
        flush=True,
    )
    failed: list[dict[str, Any]] = []
    done = 0
    if todo:
        context = multiprocessing.get_context("spawn")  # a clean interpreter per worker: no forked torch threads
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            submitted = {pool.submit(_worker_cell, grid, cell, threads): cell for cell in todo}
            pending = set(submitted)
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    try:
                        result = future.result()
                    except BrokenProcessPool as error:  # a worker died (killed, out of memory): its cells fail
                        result = {"name": submitted[future].name, "error": f"worker process died: {error}"}
                    done += 1
                    if "error" in result:
                        failed.append(result)
                        print(f"  [{done}/{len(todo)}] {result['name']}: FAILED: {result['error']}", flush=True)
                    else:
                        print(f"  [{done}/{len(todo)}] {result['name']}: {_headline(result)}", flush=True)
    wall = time.perf_counter() - clock
    _record_invocation(grid, started, wall, len(todo) - len(failed), workers, shard, command, commit)
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


def _headline(result: dict[str, Any]) -> str:
    shown = {k: result[k] for k in ("fid", "is", "classes_covered", "modes_covered", "hq_rate") if k in result}
    text = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items())
    return f"{text}; {result['cell_wall_s']:.0f} s"


def _record_invocation(
    grid: Grid,
    started: datetime.datetime,
    wall: float,
    ran: int,
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
        "started": started.isoformat(timespec="seconds"),
        "wall_s": wall,
        "cells_run": ran,
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


# --------------------------------------------------------------------------------------------------------------------
# Aggregating.


@dataclass
class Stat:
    """Mean and sample standard deviation over seeds."""

    mean: float
    std: float
    n: int

    @classmethod
    def of(cls, values: list[float]) -> Stat:
        n = len(values)
        mean = sum(values) / n
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
        return cls(mean, std, n)

    def text(self, digits: int = 3) -> str:
        return f"{self.mean:.{digits}g} ± {self.std:.{digits - 1}g}" if self.n > 1 else f"{self.mean:.{digits}g}"


def load_results(grid: Grid) -> list[dict[str, Any]]:
    """Every cell's result.json that exists."""
    results = []
    for cell in grid.cells():
        path = grid.out / cell.name / "result.json"
        if path.is_file():
            results.append(json.loads(path.read_text()))
    return results


def aggregate(results: list[dict[str, Any]]) -> dict[tuple[str, str, float, float], dict[str, Any]]:
    """Rows (bench, method, density_g, density_d) -> each numeric metric's :class:`Stat` over seeds."""
    groups: dict[tuple[str, str, float, float], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["bench"], r["method"], r["density_g"], r["density_d"]), []).append(r)
    rows = {}
    for key, members in groups.items():
        numeric = [k for k, v in members[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        rows[key] = {k: Stat.of([float(m[k]) for m in members]) for k in numeric if k not in ("seed", "step")}
        rows[key]["seeds"] = sorted(m["seed"] for m in members)
    return rows


@dataclass
class Comparison:
    """How method A fares against B on one metric: the gain of A (positive: A better) and its standard error."""

    gain: float
    se: float
    seeds: int  # the fewer seeds of the two

    @property
    def verdict(self) -> str:
        if self.seeds < 2:
            return "no spread"  # one seed: no way to tell a difference from noise
        # Two standard errors of the difference of means: with 3 seeds, a rough but honest line between a
        # difference and noise.
        if self.gain > 2 * self.se:
            return "better"
        if self.gain < -2 * self.se:
            return "worse"
        return "within noise"


def compare(a: Stat, b: Stat, lower_is_better: bool) -> Comparison:
    """A against B: the gain of A's mean and the standard error of the difference of two independent means."""
    gain = (b.mean - a.mean) if lower_is_better else (a.mean - b.mean)
    return Comparison(gain, math.sqrt(a.std**2 / a.n + b.std**2 / b.n), min(a.n, b.n))


# --------------------------------------------------------------------------------------------------------------------
# The report.


def _fmt_density(value: float) -> str:
    return "1" if value == 1 else f"{value:g}"


def _sorted_rows(rows: dict, bench: str) -> list[tuple[tuple[str, str, float, float], dict[str, Any]]]:
    order = {m: i for i, m in enumerate(LABELS)}
    chosen = [(k, v) for k, v in rows.items() if k[0] == bench]
    return sorted(chosen, key=lambda kv: (kv[0][1] != "dense", kv[0][3], kv[0][2], order.get(kv[0][1], 99)))


def _label(grid: Grid, method: str) -> str:
    """The paper's name of the method, with the grid's own name where two grid methods share one kind."""
    if method not in grid.methods:
        return method
    kind = grid.methods[method]["method"]
    shared = sum(settings["method"] == kind for settings in grid.methods.values()) > 1
    return f"{LABELS.get(kind, kind)} ({method})" if shared else LABELS.get(kind, method)


def digits_table(grid: Grid, rows: dict) -> str:
    lines = [
        "| method | G density | D density | FD (classifier) ↓ | IS analogue ↑ | classes covered ↑ | "
        "train FLOPs vs dense | seeds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (_, method, g, d), stats in _sorted_rows(rows, "digits"):
        cells = [
            _label(grid, method),
            _fmt_density(g),
            _fmt_density(d),
            stats["fid"].text(3) if "fid" in stats else "–",
            stats["is"].text(3) if "is" in stats else "–",
            stats["classes_covered"].text(3) if "classes_covered" in stats else "–",
            f"{stats['train_flops_vs_dense'].mean:.3f}",
            str(len(stats["seeds"])),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def gaussians_table(grid: Grid, rows: dict, bench: str) -> str:
    lines = [
        "| method | G density | D density | modes covered ↑ | modes with ≥ 20 ↑ | high-quality samples ↑ | "
        "train FLOPs vs dense | seeds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (_, method, g, d), stats in _sorted_rows(rows, bench):
        total = int(stats["modes_total"].mean) if "modes_total" in stats else "?"
        cells = [
            _label(grid, method),
            _fmt_density(g),
            _fmt_density(d),
            f"{stats['modes_covered'].text(3)} / {total}",
            stats["modes_covered_20"].text(3) if "modes_covered_20" in stats else "–",
            f"{100 * stats['hq_rate'].mean:.1f}% ± {100 * stats['hq_rate'].std:.1f}",
            f"{stats['train_flops_vs_dense'].mean:.3f}",
            str(len(stats["seeds"])),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _by_method(grid: Grid, rows: dict, bench: str, kind: str) -> dict[tuple[float, float], tuple[str, dict]]:
    """(G density, D density) -> (method name, stats) of the grid's method of sparse.method ``kind``: the first one
    the grid lists, when it has variants (e.g. stu with explore G and with GD)."""
    names = [m for m, s in grid.methods.items() if s["method"] == kind][:1]
    return {(k[2], k[3]): (k[1], v) for k, v in rows.items() if k[0] == bench and k[1] in names}


def claims(grid: Grid, rows: dict) -> list[tuple[str, str, str]]:
    """(claim, verdict, evidence) for each of the paper's claims the grid can test, computed from the numbers."""
    verdicts: list[tuple[str, str, str]] = []
    if grid.digits is not None:
        stu = _by_method(grid, rows, "digits", "stu")
        static = _by_method(grid, rows, "digits", "static")
        dense = next(iter(_by_method(grid, rows, "digits", "dense").values()), None)

        def tally(other: dict, name: str) -> tuple[str, str]:
            shared = sorted(set(stu) & set(other))
            outcomes = [compare(stu[k][1]["fid"], other[k][1]["fid"], lower_is_better=True) for k in shared]
            better = sum(o.gain > 0 for o in outcomes)
            clear = sum(o.verdict == "better" for o in outcomes)
            worse = sum(o.verdict == "worse" for o in outcomes)
            detail = "; ".join(
                f"G {g:g}/D {d:g}: {stu[(g, d)][1]['fid'].mean:.0f} vs {other[(g, d)][1]['fid'].mean:.0f}"
                for g, d in shared
            )
            evidence = (
                f"STU-GAN's mean FD is lower than {name}'s in {better} of {len(shared)} settings ({clear} by more than "
                f"two standard errors; {worse} worse by more than two). FD, STU-GAN vs {name}: {detail}."
            )
            if not shared:
                return "not tested", f"the grid has no {name} cells at STU-GAN's densities"
            if better * 2 > len(shared) and worse == 0:
                # Better on average, but where no single setting clears the noise the evidence is weak: say so.
                return ("held" if clear else "held on average, within seed noise"), evidence
            if better * 2 > len(shared):
                return "partly held", evidence
            return "did not hold", evidence

        if dense is not None and stu:
            d_stats = dense[1]["fid"]
            target = (0.2, 0.3) if (0.2, 0.3) in stu else min(stu)
            outcome = compare(stu[target][1]["fid"], d_stats, lower_is_better=True)
            best = min(stu, key=lambda k: stu[k][1]["fid"].mean)
            verdict = {
                "better": "held (beat dense)",
                "within noise": (
                    "held (matched dense within seed noise)"
                    if outcome.gain >= 0
                    else "inconclusive (worse on average, within seed noise)"
                ),
                "no spread": "inconclusive (one seed)",
            }.get(outcome.verdict, "did not hold")
            verdicts.append(
                (
                    f"A sparse G (density {target[0]:g}) with a sparse D (density {target[1]:g}), trained sparse "
                    "from scratch, matches or beats dense BigGAN (the paper: 80%-sparse G, 70%-sparse D).",
                    verdict,
                    f"FD {stu[target][1]['fid'].text()} (STU-GAN, G {target[0]:g}/D {target[1]:g}) vs "
                    f"{d_stats.text()} (dense); STU-GAN's best setting, G {best[0]:g}/D {best[1]:g}, reaches "
                    f"{stu[best][1]['fid'].text()}. Sparse training costs "
                    f"{stu[target][1]['train_flops_vs_dense'].mean:.2f} of dense training's FLOPs there.",
                )
            )
        if static and stu:
            verdict, evidence = tally(static, "static sparse")
            verdicts.append(
                (
                    "Dynamic exploration of G (STU-GAN) beats static sparse training at the same budget.",
                    verdict,
                    evidence,
                )
            )
            gains, variances = {}, {}  # mean FD gain over the D densities at each G density, and its variance
            for g in sorted({k[0] for k in stu} & {k[0] for k in static}):
                pairs = [k for k in stu if k[0] == g and k in static]
                gains[g] = sum(static[k][1]["fid"].mean - stu[k][1]["fid"].mean for k in pairs) / len(pairs)
                variances[g] = (
                    sum(compare(stu[k][1]["fid"], static[k][1]["fid"], lower_is_better=True).se ** 2 for k in pairs)
                    / len(pairs) ** 2
                )
            if len(gains) >= 2:
                low, high = min(gains), max(gains)
                gap = Comparison(gains[low] - gains[high], math.sqrt(variances[low] + variances[high]), len(grid.seeds))
                if gains[low] <= 0 or gap.verdict == "worse":
                    verdict = "did not hold"
                elif gap.verdict == "better":
                    verdict = "held"
                else:
                    verdict = "held on average, within seed noise" if gap.gain > 0 else "did not hold on average"
                verdicts.append(
                    (
                        "Exploration matters most when the generator is very sparse.",
                        verdict,
                        "Mean FD gain of STU-GAN over static (averaged over D densities) by G density, ± two standard "
                        "errors: "
                        + ", ".join(
                            f"{g:g}: {v:+.0f} ± {2 * math.sqrt(variances[g]):.0f}" for g, v in sorted(gains.items())
                        )
                        + f". The gain at G {low:g} exceeds the gain at G {high:g} by {gap.gain:+.0f} "
                        f"± {2 * gap.se:.0f}.",
                    )
                )
        for kind, name in (("gmp", "GMP (gradual magnitude pruning from dense)"), ("snip", "SNIP")):
            other = _by_method(grid, rows, "digits", kind)
            if other and stu:
                verdict, evidence = tally(other, name.split(" (")[0])
                verdicts.append(
                    (
                        f"Sparse-to-sparse training in one run matches or beats {name} at the same final density.",
                        verdict,
                        evidence,
                    )
                )
        gmp = _by_method(grid, rows, "digits", "gmp")
        if gmp and stu:
            shared = sorted(set(stu) & set(gmp))
            ratios = [gmp[k][1]["train_flops_vs_dense"].mean / stu[k][1]["train_flops_vs_dense"].mean for k in shared]
            verdicts.append(
                (
                    "Training sparse from scratch is cheaper than starting from a dense network.",
                    "held" if all(r > 1 for r in ratios) else "did not hold",
                    f"GMP, which starts dense and prunes, spends {min(ratios):.1f}x to {max(ratios):.1f}x STU-GAN's "
                    "training FLOPs at the same final densities (STU-GAN: "
                    + ", ".join(f"{stu[k][1]['train_flops_vs_dense'].mean:.2f}" for k in shared)
                    + " of dense, for G/D "
                    + ", ".join(f"{g:g}/{d:g}" for g, d in shared)
                    + ").",
                )
            )
    if grid.gaussians is not None:
        for bench in grid.gaussians["datasets"]:
            stu = _by_method(grid, rows, bench, "stu")
            static = _by_method(grid, rows, bench, "static")
            dense = next(iter(_by_method(grid, rows, bench, "dense").values()), None)
            shared = sorted(set(stu) & set(static))
            if not shared:
                continue
            parts, better, clear, worse = [], 0, 0, 0
            for k in shared:
                outcome = compare(stu[k][1]["modes_covered"], static[k][1]["modes_covered"], lower_is_better=False)
                better += outcome.gain >= 0
                clear += outcome.verdict == "better"
                worse += outcome.verdict == "worse"
                parts.append(
                    f"G {k[0]:g}/D {k[1]:g}: {stu[k][1]['modes_covered'].text()} vs "
                    f"{static[k][1]['modes_covered'].text()}"
                )
            dense_text = f"; dense covers {dense[1]['modes_covered'].text()}" if dense else ""
            verdicts.append(
                (
                    f"{bench}: a sparse generator with exploration covers at least as many modes as a static one.",
                    (
                        "did not hold"
                        if worse
                        else ("held" if clear else "held on average, within seed noise")
                        if better == len(shared)
                        else "inconclusive (fewer modes on average, within seed noise)"
                    ),
                    "Modes covered, STU-GAN vs static: " + "; ".join(parts) + dense_text + ".",
                )
            )
    return verdicts


def _plots(grid: Grid, rows: dict, folder: Path) -> list[Path]:
    """PNGs of the digits grid (metrics against G density, FD against training FLOPs) and of the Gaussians."""
    from matplotlib.figure import Figure

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    methods = [m for m in grid.methods if grid.methods[m]["method"] != "dense"]
    dense = [m for m in grid.methods if grid.methods[m]["method"] == "dense"]
    if grid.digits is not None:
        d_values = grid.digits["density_d"]
        metrics = [("fid", "FD (classifier) ↓"), ("is", "IS analogue ↑"), ("classes_covered", "classes covered ↑")]
        figure = Figure(figsize=(5.5 * len(d_values), 3.8 * len(metrics)), dpi=110, layout="constrained")
        axes = figure.subplots(len(metrics), len(d_values), squeeze=False)
        for col, d in enumerate(d_values):
            for row, (metric, title) in enumerate(metrics):
                ax = axes[row][col]
                for method in methods:
                    points = sorted(
                        (k[2], v[metric])
                        for k, v in rows.items()
                        if k[0] == "digits" and k[1] == method and k[3] == d and metric in v
                    )
                    if points:
                        ax.errorbar(
                            [p[0] for p in points],
                            [p[1].mean for p in points],
                            yerr=[p[1].std for p in points],
                            marker="o",
                            capsize=3,
                            label=_label(grid, method),
                        )
                for method in dense:
                    stat = rows.get(("digits", method, 1.0, 1.0), {}).get(metric)
                    if stat is not None:
                        ax.axhline(stat.mean, color="black", linestyle="--", label="dense (± std)")
                        ax.axhspan(stat.mean - stat.std, stat.mean + stat.std, color="black", alpha=0.08)
                ax.set_xscale("log")
                ax.minorticks_off()  # (log-scale minor labels such as 0.056x10^-2 would crowd the densities' own)
                ax.set_xticks(grid.digits["density_g"], [f"{g:g}" for g in grid.digits["density_g"]])
                ax.set_xlabel("G density")
                ax.set_title(f"{title}, D density {d:g}")
                ax.grid(alpha=0.3)
                ax.legend(fontsize="small")
        written.append(folder / "digits_vs_density.png")
        figure.savefig(written[-1])

        figure = Figure(figsize=(7, 4.5), dpi=110, layout="constrained")
        ax = figure.subplots()
        for method in [*dense, *methods]:
            points = [v for k, v in rows.items() if k[0] == "digits" and k[1] == method]
            if points:
                ax.errorbar(
                    [p["train_flops_vs_dense"].mean for p in points],
                    [p["fid"].mean for p in points],
                    yerr=[p["fid"].std for p in points],
                    marker="o",
                    linestyle="none",
                    capsize=3,
                    label=_label(grid, method),
                )
        ax.set_xscale("log")
        ax.set_xlabel("training FLOPs relative to dense")
        ax.set_ylabel("FD (classifier) ↓")
        ax.set_title("Digits BigGAN: quality against training cost (every G/D density)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        written.append(folder / "digits_fd_vs_flops.png")
        figure.savefig(written[-1])
    written += _montages(grid, folder)
    if grid.gaussians is not None:
        benches = grid.gaussians["datasets"]
        figure = Figure(figsize=(12, 3.8 * len(benches)), dpi=110, layout="constrained")
        axes = figure.subplots(len(benches), 2, squeeze=False)
        for row, bench in enumerate(benches):
            chosen = _sorted_rows(rows, bench)
            labels = [f"{_label(grid, k[1])}\n{'' if k[1] in dense else f'G {k[2]:g}'}" for k, _ in chosen]
            for col, (metric, title, scale) in enumerate(
                [("modes_covered", "modes covered ↑", 1), ("hq_rate", "high-quality samples (%) ↑", 100)]
            ):
                ax = axes[row][col]
                ax.bar(
                    range(len(chosen)),
                    [v[metric].mean * scale for _, v in chosen],
                    yerr=[v[metric].std * scale for _, v in chosen],
                    capsize=3,
                )
                ax.set_xticks(range(len(chosen)), labels, fontsize="x-small")
                ax.set_title(f"{bench}: {title}")
                ax.grid(alpha=0.3, axis="y")
        written.append(folder / "gaussians.png")
        figure.savefig(written[-1])
    return written


def _montages(grid: Grid, folder: Path) -> list[Path]:
    """Side-by-side samples of the first seed: dense and every sparse method at the sparsest G (and the densest D),
    per benchmark: the digits' last sample grid, the Gaussians' scatter plots."""
    from matplotlib.figure import Figure
    from matplotlib.image import imread

    written = []
    seed = grid.seeds[0]
    for section, benches in ((grid.digits, ["digits"]), (grid.gaussians, (grid.gaussians or {}).get("datasets", []))):
        if section is None:
            continue
        g, d = min(section["density_g"]), max(section["density_d"])
        rows = []
        for bench in benches:
            entries = []
            for method, settings in grid.methods.items():
                dense = settings["method"] == "dense"
                cell = Cell(bench, method, 1.0 if dense else g, 1.0 if dense else d, seed)
                run = grid.out / cell.name
                images = sorted((run / "samples").glob("*.png")) if bench == "digits" else [run / "samples.png"]
                if images and images[-1].is_file():
                    title = _label(grid, method) + ("" if dense else f", G {g:g} / D {d:g}")
                    entries.append((title, images[-1]))
            if entries:
                rows.append(entries)
        if not rows:
            continue
        columns = max(len(r) for r in rows)
        figure = Figure(figsize=(3.2 * columns, 3.5 * len(rows)), dpi=110, layout="constrained")
        axes = figure.subplots(len(rows), columns, squeeze=False)
        for r, entries in enumerate(rows):
            for c in range(columns):
                ax = axes[r][c]
                ax.axis("off")
                if c < len(entries):
                    ax.imshow(imread(entries[c][1]))
                    ax.set_title(entries[c][0], fontsize="small")
        name = "digits_samples.png" if section is grid.digits else "gaussians_samples.png"
        written.append(folder / name)
        figure.savefig(written[-1])
    return written


def write_study_report(grid: Grid) -> Path:
    """Write the markdown report (and its plots beside it, in ``<report stem>/``) from the cells' results."""
    results = load_results(grid)
    rows = aggregate(results)
    report = grid.report
    figures = _plots(grid, rows, report.parent / report.stem)
    log_path = grid.out / "study.json"
    invocations = json.loads(log_path.read_text())["invocations"] if log_path.is_file() else []
    wall = sum(i["wall_s"] for i in invocations)
    compute = sum(r.get("cell_wall_s", 0.0) for r in results)
    commits = sorted({i["commit"] for i in invocations}) or ["unknown"]
    # Shards run side by side: the span from the first start to the last end is the time a reader waits.
    starts = [datetime.datetime.fromisoformat(i["started"]).timestamp() for i in invocations]
    span = max((t + i["wall_s"] for t, i in zip(starts, invocations, strict=True)), default=0.0) - min(
        starts, default=0
    )
    hosts = sorted(
        {
            f"{i['host']} ({i['cpus']} CPUs, {i['gpu'] or 'no GPU'})" if "cpus" in i else f"{i['host']}"
            for i in invocations
        }
    )
    commands = sorted({i["command"] for i in invocations if i.get("command")})
    lines = [
        "# Does sparse beat dense? sgtrain's small-scale study of the paper's claims",
        "",
        "*Written by `python -m sgtrain study`; the numbers, tables, plots and verdicts below come from the run "
        "recorded here. Rerunning the command reproduces them.*",
        "",
        "## How this was run",
        "",
        "```",
        *(commands or [f"python -m sgtrain study --grid {grid.path.name}"]),
        "```",
        "",
        f"- Grid: `{_display_path(grid.path)}`: {len(results)} cells "
        f"(seeds {', '.join(map(str, grid.seeds))}), each an ordinary run directory "
        f"under `{grid.out}`.",
        f"- Commit: {', '.join(f'`{c}`' for c in commits)}.",
        f"- Wall time: {wall / 60:.1f} min summed over {len(invocations)} invocation(s), {span / 60:.1f} min from the "
        f"first start to the last end ({compute / 60:.1f} min of cell time summed over worker processes).",
        f"- Machines: {'; '.join(hosts) or 'not recorded'}.",
        "",
    ]
    if grid.digits is not None:
        cfg = grid.digits_config(next(c for c in grid.cells() if c.kind == "digits"))
        evaluation = grid.digits.get("evaluate") or {}
        lines += [
            f"- Digits: bundled handwritten digits at {cfg.model.resolution}x{cfg.model.resolution}, class-conditional "
            f"BigGAN with g_ch {cfg.model.g_ch} / d_ch {cfg.model.d_ch}, {cfg.train.steps} G steps of batch "
            f"{cfg.train.batch_size}, Adam {cfg.train.g_lr:g}/{cfg.train.d_lr:g}, EMA from step "
            f"{cfg.train.ema_start}; layer densities {cfg.sparse.distribution}; STU-GAN updates G every "
            f"{cfg.sparse.update_every} G steps until {cfg.sparse.update_end:.0%} of the run (drop "
            f"{cfg.sparse.drop_fraction:g}, cosine-decayed to {cfg.sparse.drop_fraction_min:g}; optimizer state "
            f"{cfg.sparse.optimizer_state}).",
            f"- Evaluation: {evaluation.get('num_samples', 1000)} samples of the EMA generator against the first "
            f"{evaluation.get('num_samples', 1000)} real digits, in the features and logits of sgtrain's bundled digit "
            "classifier (`sgtrain evaluate --extractor classifier`): FD is the Fréchet distance of its features (the "
            "FID recipe in another feature space: not comparable to Inception FIDs), IS its Inception-Score analogue "
            "(at most 10), classes covered the classes that the classifier's predictions (argmax) give to at least "
            "20% of a uniform share of the samples (20 of 1,000).",
        ]
    if grid.gaussians is not None:
        lines.append(
            "- Gaussians: the VEEGAN / PacGAN 2-D benchmark (`sgtrain/gaussians.py`): unconditional MLP G and D, "
            "2,500 samples scored; a sample is high quality within 3 standard deviations of its nearest mode; a mode "
            "is covered with at least one high-quality sample (the rule of PacGAN's released code), and the stricter "
            "count of modes with at least 20 is given beside it."
        )
        from sgtrain.gaussians import gaussians_config

        for cell in grid.cells():
            if cell.kind == "gaussians" and grid.methods[cell.method]["method"] == "stu" and cell.seed == grid.seeds[0]:
                g = gaussians_config(grid.gaussians_settings(cell))
                if cell.bench == grid.gaussians["datasets"][0] and cell.density_g == grid.gaussians["density_g"][0]:
                    lines.append(
                        f"- Gaussians, {_label(grid, cell.method)}: G updated every {g.sparse.update_every} of "
                        f"{g.steps} steps until {g.sparse.update_end:.0%} of the run (drop {g.sparse.drop_fraction:g}, "
                        f"cosine-decayed to {g.sparse.drop_fraction_min:g}), optimizer state "
                        f"{g.sparse.optimizer_state}."
                    )
    lines += ["", "## The paper's claims at this scale", ""]
    lines += ["| claim | verdict | evidence |", "|---|---|---|"]
    lines += [f"| {c} | **{v}** | {e} |" for c, v, e in claims(grid, rows)]
    lines += [
        "",
        'Verdicts compare means over seeds; "by more than two standard errors" is the line drawn between a '
        "difference and seed noise (with 3 seeds a rough one).",
        "",
    ]
    if grid.digits is not None:
        lines += ["## Digits: BigGAN on real data", "", digits_table(grid, rows), ""]
    for figure in figures:
        if figure.name.startswith("digits"):
            if figure.name == "digits_samples.png":
                lines += [f"Samples of the EMA generator, seed {grid.seeds[0]}, one row per class:", ""]
            lines += [f"![{figure.stem}]({report.stem}/{figure.name})", ""]
    if grid.gaussians is not None:
        lines += ["## 2-D mixtures of Gaussians", ""]
        for bench in grid.gaussians["datasets"]:
            lines += [f"### {bench}", "", gaussians_table(grid, rows, bench), ""]
        lines += [f"![gaussians]({report.stem}/gaussians.png)", ""]
        if any(f.name == "gaussians_samples.png" for f in figures):
            lines += [f"Samples of seed {grid.seeds[0]}:", "", f"![samples]({report.stem}/gaussians_samples.png)", ""]
    old = report.read_text() if report.is_file() else ""
    notes = old.split(NOTES_MARKER, 1)[1] if NOTES_MARKER in old else "\n"
    text = "\n".join(lines) + "\n" + NOTES_MARKER + notes
    report.parent.mkdir(parents=True, exist_ok=True)
    from sgtrain.checkpoint import write_atomic

    write_atomic(report, text.encode())
    (grid.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    return report


def _display_path(path: Path) -> str:
    with contextlib.suppress(ValueError):
        return str(path.resolve().relative_to(CONFIG_DIR.parent.parent))
    return str(path)
