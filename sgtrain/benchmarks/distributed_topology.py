"""One distributed topology update of the ImageNet-128 BigGAN: sharded vs naive, 1 vs 2 ranks, time and bytes.

What is timed: one ``MaskManager.maybe_update(step)`` at an update step of ``imagenet128.yaml`` (STU, ERK, G density
0.2, D density 0.3; 70.4M + 88.0M parameters) with ``sparse.explore=GD`` and gradient growth for G *and* D, so that
both networks are updated and every grow score is a dense gradient that may have to travel. Before each timed update
every ``.grad`` is filled with fresh random numbers and ``before_step("D")``, ``before_step("G")`` capture them as
scores, exactly as at the last G step before an update (untimed). The ranks meet at a barrier before each update; an
update's time is the slowest rank's, and the table gives the median over ``--reps`` updates after one warm-up update.
Masks are drawn afresh and the weights restored before each case, so every case starts from the same state.

Cases (rows of the table):

- ``scores local`` (``local_scores=True``): each rank's gradients are its own (accumulation without sync,
  ZeRO-partitioned or hook-captured gradients), so they differ by rank (random numbers seeded by the rank) and must be
  summed. Sharded: one ``reduce`` per owner of the concatenated scores of its layers, the owner selects, one
  bit-packed ``broadcast`` per owner. Naive (``sharded=False``): one ``all_reduce`` of all dense scores, then every rank
  selects every layer itself.
- ``scores DDP`` (``local_scores=False``): the gradients were already averaged by DDP (identical on every rank here).
  Sharded: only the bit-packed broadcasts. Naive: no communication at all, every rank computes every layer.
- One rank: every scheme and situation takes the same path (no communication, every layer selected locally), so it is
  measured once per thread count: 1 thread and torch's default.

Bytes: a counting wrapper around the ``Comm`` handed to the manager adds up ``tensor.nbytes`` of every collective
call, by kind. These are PAYLOAD bytes, what the rank hands to the collective, not what crosses the wire. The "sent"
and "recv" columns turn them into wire bytes per rank with the textbook algorithms: a ring all-reduce sends and
receives ``2 (n-1)/n`` times its payload per rank (about 2x for many ranks, exactly 1x each way at 2 ranks); a reduce
sends the payload once from each non-root rank (the root receives ``n-1`` payloads); a broadcast sends it once to each
other rank (exact at 2 ranks; gloo's and NCCL's own algorithms may differ for more). The mask checksum comparison after
each update (an all-reduce min and max of one int64 per layer, entering and after the update: 2 x 2 x 8 bytes x
layers) is counted and timed separately ("cksum"); it is included in the update's wall time.

The time breakdown ("scores", "select", "cksum") comes from timing the methods of the manager's ``Sharding``
(``reduce_scores``, ``select`` and the checksums), wrapped on the instance only (the code that runs is unchanged);
"wait" is the time spent inside collectives, which includes waiting for the other rank (for a mask broadcast: until
its owner has selected its layers); "cpu" is the busiest rank's CPU time (user + system) during the update, a figure
that other load on the machine disturbs less than wall time.

Two ranks are two processes started here with ``torch.multiprocessing`` ("spawn") and the environment
``accelerate launch`` sets (RANK, WORLD_SIZE, MASTER_ADDR/PORT, ACCELERATE_USE_CPU=1), so that ``sgtrain.dist.Dist``
joins a real gloo process group. Each of the 2 ranks runs ``torch.set_num_threads(1)``: the benchmark machine has 2
cores. Models use ``model.init=N02`` (building ortho init costs a QR per layer; the update's cost does not depend on
the weights' values). Memory: about 5 GB per process.

Usage (from the repository root)::

    python benchmarks/distributed_topology.py                       # 1 rank and 2 ranks, 5-9 minutes on 2 cores
    python benchmarks/distributed_topology.py --reps 5              # more timed updates per case
    python benchmarks/distributed_topology.py --ranks 2             # only the 2-rank part
    python benchmarks/distributed_topology.py --config cifar10.yaml # any config with sparse.method=stu
    python benchmarks/distributed_topology.py --json results.json   # also write every figure as JSON

This is a benchmark: it prints figures and never asserts timings. It does check that every timed call really was an
update (both networks' masks changed) and that the sharded and naive schemes end with bit-identical masks.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import resource
import socket
import sys
import tempfile
import time
import traceback
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from sgtrain.benchmarks.harness import load_avg, machine, median_iqr, progress, write_json
from sgtrain.comm import Comm, LocalComm
from sgtrain.config import Config, load_config
from sgtrain.models.build import build_models
from sgtrain.sparse import MaskManager, masked_parameters
from sgtrain.sparse.topology import mask_checksum

NETWORKS = ("G", "D")
MB = 1e6
# Both networks explore and both grow by gradient, so that all scores are dense gradients that may have to travel.
OVERRIDES = {"model.init": "N02", "sparse.explore": "GD", "sparse.grow_g": "gradient", "sparse.grow_d": "gradient"}
KINDS = ("reduce", "broadcast", "all_reduce")


@dataclass(kw_only=True)
class Settings:
    """Which parts to run, on which config, how many times."""

    config: str = "imagenet128.yaml"  # a config with sparse.method=stu
    reps: int = 3  # timed updates per case after 1 warm-up
    ranks: str = "both"  # which part to run: "1", "2" or "both"
    timeout: float = 1200.0  # seconds before a part's processes are killed
    json: Path | None = None  # run() also writes every figure here

    def __post_init__(self) -> None:
        if self.reps < 1:
            raise ValueError("--reps must be >= 1")
        if self.ranks not in ("1", "2", "both"):
            raise ValueError(f"--ranks must be 1, 2 or both, got {self.ranks!r}")
        method = load_config(self.config, OVERRIDES).sparse.method
        if method != "stu":
            raise ValueError(f"--config must use sparse.method=stu, {self.config} has {method}")


# --------------------------------------------------------------------------------------------------------------------
# Counting what the manager communicates, and where its time goes.


def wire_bytes(kind: str, nbytes: int, root: int | None, rank: int, world: int) -> tuple[float, float]:
    """(sent, received) bytes of one rank for one collective of ``nbytes`` payload (textbook algorithms, see top)."""
    if world == 1:
        return 0.0, 0.0
    if kind == "all_reduce":  # ring: reduce-scatter then all-gather, (n-1)/n of the payload each way in each phase
        each_way = 2 * (world - 1) / world * nbytes
        return each_way, each_way
    if kind == "reduce":
        return (0.0, (world - 1) * nbytes) if rank == root else (nbytes, 0.0)
    # broadcast
    return ((world - 1) * nbytes, 0.0) if rank == root else (0.0, nbytes)


@dataclass
class Call:
    phase: str  # the manager's section that made the call: scores, select, cksum
    kind: str  # reduce, broadcast, all_reduce
    nbytes: int
    root: int | None
    seconds: float


class CountingComm:
    """The ``Comm`` handed to the manager: forwards every collective and records its kind, payload and duration."""

    def __init__(self, inner: Comm) -> None:
        self.inner = inner
        self.rank = inner.rank
        self.world_size = inner.world_size
        self.phase = "other"
        self.calls: list[Call] = []

    def _call(self, kind: str, tensor: torch.Tensor, root: int | None, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        start = time.perf_counter()
        out = fn()
        self.calls.append(Call(self.phase, kind, tensor.nbytes, root, time.perf_counter() - start))
        return out

    def all_reduce(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        return self._call("all_reduce", tensor, None, lambda: self.inner.all_reduce(tensor, op))

    def reduce(self, tensor: torch.Tensor, dst: int) -> torch.Tensor:
        return self._call("reduce", tensor, dst, lambda: self.inner.reduce(tensor, dst))

    def broadcast(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        return self._call("broadcast", tensor, src, lambda: self.inner.broadcast(tensor, src))

    def tally(self) -> dict[str, Any]:
        """Bytes and collective time of the calls since the last tally (then forgets them)."""
        update = [c for c in self.calls if c.phase != "cksum"]
        check = [c for c in self.calls if c.phase == "cksum"]
        wire = {kind: [0.0, 0.0] for kind in KINDS}  # [sent, received]
        for c in update:
            s, r = wire_bytes(c.kind, c.nbytes, c.root, self.rank, self.world_size)
            wire[c.kind][0] += s
            wire[c.kind][1] += r
        out = {
            "payload_bytes": {kind: sum(c.nbytes for c in update if c.kind == kind) for kind in KINDS},
            "calls": {kind: sum(1 for c in update if c.kind == kind) for kind in KINDS},
            "wire_bytes_by_kind": wire,
            "sent_bytes": sum(sent for sent, _ in wire.values()),
            "recv_bytes": sum(recv for _, recv in wire.values()),
            "checksum_payload_bytes": sum(c.nbytes for c in check),
            "checksum_calls": len(check),
            "collective_s": sum(c.seconds for c in update),
            "checksum_collective_s": sum(c.seconds for c in check),
        }
        self.calls = []
        return out


class Sections:
    """Wall time inside some of the manager's sharding methods, by section; also tells the comm which section calls.

    The methods are wrapped on the one instance (the code that runs is the manager's own). A section entered again
    from inside itself (``check_consistent`` calls ``checksums``) is counted once, by the outer call.
    """

    def __init__(self, comm: CountingComm) -> None:
        self.comm = comm
        self.seconds: dict[str, float] = defaultdict(float)
        self._open: set[str] = set()

    def wrap(self, obj: Any, method: str, section: str) -> None:
        inner = getattr(obj, method)

        def timed(*args: Any, **kwargs: Any) -> Any:
            if section in self._open:
                return inner(*args, **kwargs)
            self._open.add(section)
            previous, self.comm.phase = self.comm.phase, section
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds[section] += time.perf_counter() - start
                self.comm.phase = previous
                self._open.discard(section)

        setattr(obj, method, timed)

    def take(self) -> dict[str, float]:
        out = {key: self.seconds.get(key, 0.0) for key in ("scores", "select", "cksum")}
        self.seconds.clear()
        return out


# --------------------------------------------------------------------------------------------------------------------
# One process's share: every case this rank takes part in.


def update_steps(masks: MaskManager, count: int) -> list[int]:
    """The first ``count`` update steps of the schedule."""
    every = masks.schedule.update_every
    steps = [k * every for k in range(1, count + 1)]
    if not all(masks.schedule.is_update_step(s) for s in steps):
        raise RuntimeError(f"the schedule has fewer than {count} update steps; lower --reps")
    return steps


def fill_grads(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Dense random gradients in every parameter's ``.grad``, as a backward pass leaves them (values do not matter)."""
    for p in module.parameters():
        p.grad = torch.randn(p.shape, generator=generator, dtype=p.dtype)


def masks_digest(masks: MaskManager) -> str:
    """One hash of every mask of G and D: equal digests mean bit-identical topologies."""
    sums = [str(mask_checksum(layer.mask)) for net in NETWORKS for layer in masks.layers[net]]
    return hashlib.sha256(",".join(sums).encode()).hexdigest()[:16]


class Barrier:
    """Synchronisation outside the counted comm: a barrier, and the maximum of a float over ranks."""

    def __init__(self, dist: Any | None) -> None:
        self.dist = dist

    def wait(self) -> None:
        if self.dist is not None:
            self.dist.barrier()

    def max(self, value: float) -> float:
        if self.dist is None:
            return value
        return float(self.dist.all_reduce(torch.tensor([value], dtype=torch.float64), "max"))


def run_case(
    cfg: Config,
    models: dict[str, torch.nn.Module],
    snapshot: list[torch.Tensor],
    comm: Comm,
    sync: Barrier,
    *,
    sharded: bool,
    local_scores: bool,
    reps: int,
) -> dict[str, Any]:
    """Warm-up + ``reps`` timed updates of a fresh manager; per-update figures of this rank."""
    params = [p for net in NETWORKS for p in models[net].parameters()]
    with torch.no_grad():
        for p, saved in zip(params, snapshot, strict=True):
            p.copy_(saved)
            p.grad = None
    counting = CountingComm(comm)
    optimizers = {net: torch.optim.Adam(models[net].parameters()) for net in NETWORKS}  # state stays empty
    masks = MaskManager(
        cfg.sparse,
        generator=models["G"],
        discriminator=models["D"],
        optimizers=optimizers,
        total_steps=cfg.train.steps,
        seed=cfg.seed,
        comm=counting,
        local_scores=local_scores,
        sharded=sharded,
    )
    masks.initialize()
    sections = Sections(counting)
    sections.wrap(masks.sharding, "reduce_scores", "scores")
    sections.wrap(masks.sharding, "select", "select")
    sections.wrap(masks.sharding, "checksums", "cksum")
    sections.wrap(masks.sharding, "check_consistent", "cksum")

    rank = counting.rank
    updates = []
    for i, step in enumerate(update_steps(masks, reps + 1)):
        # Local scores differ by rank; DDP-averaged ones are the same on every rank.
        generator = torch.Generator().manual_seed(1000 * i + (rank if local_scores else 0))
        masks.step = step - 1  # as after G step ``step - 1``: the coming G step's before_step reads the scores
        for net in ("D", "G"):
            fill_grads(models[net], generator)
            masks.before_step(net)
        counting.calls = []
        sections.take()
        gc.collect()
        sync.wait()
        start, cpu = time.perf_counter(), time.process_time()
        metrics = masks.maybe_update(step)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        slowest = sync.max(seconds)
        for net in NETWORKS:
            if not metrics.get(f"sparse/{net}_mask_change", 0.0) > 0.0:
                raise RuntimeError(f"the update at step {step} left {net}'s masks unchanged: {metrics}")
        updates.append(
            {"step": step, "warmup": i == 0, "seconds": seconds, "cpu_s": cpu, "slowest_rank_s": slowest}
            | sections.take()
            | counting.tally()
        )
    digest = masks_digest(masks)
    owned = [
        sum(layer.numel for net in NETWORKS for layer in masks.layers[net] if layer.owner == r and layer.density < 1)
        for r in range(counting.world_size)
    ]
    del masks, optimizers
    for p in params:
        p.grad = None
    gc.collect()
    return {"updates": updates, "masks_digest": digest, "owned_weights_by_rank": owned}


def worker(rank: int, world: int, port: int, threads: list[int], config: str, reps: int, out_dir: str) -> None:
    """One process: ``world`` 1 runs the single-process case once per thread count; ``world`` 2 joins the process
    group and runs the four cases. Writes its figures to ``out_dir/rank{rank}.json``."""
    try:
        dist = None
        if world > 1:
            os.environ.update(
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                WORLD_SIZE=str(world),
                LOCAL_WORLD_SIZE=str(world),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
                ACCELERATE_USE_CPU="1",
                OMP_NUM_THREADS="1",  # what Accelerate would set (with a warning); the ranks use 1 thread anyway
            )
            from sgtrain.dist import Dist

            dist = Dist()
            if dist.world_size != world:
                raise RuntimeError(f"joined a process group of {dist.world_size}, expected {world}")
        comm: Comm = dist if dist is not None else LocalComm()
        sync = Barrier(dist)
        cfg = load_config(config, OVERRIDES)
        torch.set_num_threads(threads[0])
        G, D = build_models(cfg.model, cfg.seed)
        models = {"G": G, "D": D}
        snapshot = [p.detach().clone() for net in NETWORKS for p in models[net].parameters()]
        if world == 1:
            plan = [(t, True, True) for t in threads]
        else:
            plan = [(threads[0], sharded, local) for local in (True, False) for sharded in (True, False)]
        cases = []
        for n_threads, sharded, local in plan:
            torch.set_num_threads(n_threads)
            if rank == 0:
                label = f"{'sharded' if sharded else 'naive'}, scores {'local' if local else 'DDP'}"
                progress(f"{world} rank(s), {n_threads} thread(s)/rank: {label if world > 1 else 'local'}")
            case = run_case(cfg, models, snapshot, comm, sync, sharded=sharded, local_scores=local, reps=reps)
            cases.append({"threads": n_threads, "sharded": sharded, "local_scores": local} | case)
        masked = {
            net: sum(m.numel() for _, m in masked_parameters(models[net], cfg.sparse.targets)) for net in NETWORKS
        }
        parameters = {net: sum(p.numel() for p in models[net].parameters()) for net in NETWORKS}
        result = {
            "rank": rank,
            "world": world,
            "cases": cases,
            "masked_weights": masked,
            "parameters": parameters,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # Linux: KiB
        }
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
        if dist is not None:
            dist.shutdown()
    except BaseException:
        Path(out_dir, f"rank{rank}.err").write_text(traceback.format_exc())
        sys.exit(1)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(world: int, threads: list[int], settings: Settings) -> list[dict[str, Any]]:
    """Run :func:`worker` on ``world`` spawned processes and return every rank's figures (stops on any failure)."""
    context = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="sgtrain-bench-") as out_dir:
        processes = [
            context.Process(target=worker, args=(rank, world, port, threads, settings.config, settings.reps, out_dir))
            for rank in range(world)
        ]
        for process in processes:
            process.start()
        deadline = time.monotonic() + settings.timeout
        for process in processes:
            process.join(max(deadline - time.monotonic(), 0.0))
        hung = [p for p in processes if p.is_alive()]
        for process in hung:
            process.kill()
            process.join()
        errors = []
        for rank, process in enumerate(processes):
            err = Path(out_dir, f"rank{rank}.err")
            if process in hung:
                errors.append(f"rank {rank}: killed after --timeout {settings.timeout} s")
            elif process.exitcode != 0:
                text = err.read_text() if err.exists() else ""
                errors.append(f"rank {rank}: exit code {process.exitcode}\n{text[-3000:]}")
        if errors:
            raise RuntimeError(f"the {world}-rank part failed:\n" + "\n".join(errors))
        return [json.loads(Path(out_dir, f"rank{rank}.json").read_text()) for rank in range(world)]


# --------------------------------------------------------------------------------------------------------------------
# Merging the ranks' figures into rows, and the report.


def merge(ranks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per case: times of the slowest rank, bytes of every rank (and their maximum)."""
    world = len(ranks)
    rows = []
    for index, case in enumerate(ranks[0]["cases"]):
        per_rank = [r["cases"][index] for r in ranks]
        timed = [[u for u in c["updates"] if not u["warmup"]] for c in per_rank]
        n = len(timed[0])

        def slowest(key: str, timed: list[list[dict[str, Any]]] = timed, n: int = n) -> dict[str, Any]:
            return median_iqr([max(t[i][key] for t in timed) for i in range(n)])

        last = [t[-1] for t in timed]  # bytes are the same for every update of a case
        rows.append(
            {
                "ranks": world,
                "threads_per_rank": case["threads"],
                "scheme": ("sharded" if case["sharded"] else "naive") if world > 1 else "any",
                "scores": ("local" if case["local_scores"] else "DDP") if world > 1 else "any",
                "update": median_iqr([u["slowest_rank_s"] for u in timed[0]]),
                "sections_slowest_rank": {key: slowest(key) for key in ("scores", "select", "cksum")},
                "collective_s_slowest_rank": slowest("collective_s"),
                "cpu_s_busiest_rank": slowest("cpu_s"),
                "per_rank": [
                    {
                        key: u[key]
                        for key in (
                            "payload_bytes",
                            "calls",
                            "wire_bytes_by_kind",
                            "sent_bytes",
                            "recv_bytes",
                            "checksum_payload_bytes",
                            "checksum_calls",
                        )
                    }
                    for u in last
                ],
                "payload_bytes_max": {kind: max(u["payload_bytes"][kind] for u in last) for kind in KINDS},
                "sent_bytes_max": max(u["sent_bytes"] for u in last),
                "recv_bytes_max": max(u["recv_bytes"] for u in last),
                "checksum_bytes": max(u["checksum_payload_bytes"] for u in last),
                "masks_digest": [c["masks_digest"] for c in per_rank],
                "owned_weights_by_rank": case["owned_weights_by_rank"],
                "peak_rss_gb_by_rank": [r["peak_rss_gb"] for r in ranks],
                "raw": per_rank,
            }
        )
    return rows


def print_report(result: dict[str, Any]) -> None:
    """The table of a :func:`run` result, on stdout."""
    meta, rows = result["meta"], result["rows"]
    print(f"sgtrain distributed topology update   {meta['date']}")
    print(
        f"torch {meta['torch']}, CPU {meta['cpu_model']} ({meta['cpus']} logical), default threads "
        f"{meta['default_threads']}; 2-rank processes use 1 thread each"
    )
    mw = result["masked_weights"]
    print(
        f"{meta['config']}: masked weights G {mw['G'] / 1e6:.1f}M, D {mw['D'] / 1e6:.1f}M; one maybe_update at an "
        f"update step, median of {meta['reps']} after 1 warm-up"
    )
    print()
    print(
        "time: seconds of the slowest rank (median); scores/select/cksum: sections of it; wait: inside collectives;"
        " cpu: CPU seconds of the busiest rank"
    )
    print("MB per rank (max over ranks): payload handed to reduce / broadcast / all_reduce; sent/recv: wire model")
    header = (
        f"{'ranks':>5} {'thr':>3} {'scheme':<8}{'scores':<7}{'update s':>9}{'IQR':>7}{'scores':>8}{'select':>8}"
        f"{'cksum':>7}{'wait':>7}{'cpu':>7} |{'reduce':>8}{'bcast':>7}{'allred':>8}{'sent':>8}{'recv':>8}{'total':>8}"
        f"{'cksum B':>8}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        sec = row["sections_slowest_rank"]
        pay = row["payload_bytes_max"]
        total = row["sent_bytes_max"] + row["recv_bytes_max"]
        print(
            f"{row['ranks']:>5} {row['threads_per_rank']:>3} {row['scheme']:<8}{row['scores']:<7}"
            f"{row['update']['median_s']:>9.2f}{row['update']['iqr_s']:>7.2f}{sec['scores']['median_s']:>8.2f}"
            f"{sec['select']['median_s']:>8.2f}{sec['cksum']['median_s']:>7.2f}"
            f"{row['collective_s_slowest_rank']['median_s']:>7.2f}{row['cpu_s_busiest_rank']['median_s']:>7.2f}"
            f" |{pay['reduce'] / MB:>8.1f}"
            f"{pay['broadcast'] / MB:>7.1f}{pay['all_reduce'] / MB:>8.1f}{row['sent_bytes_max'] / MB:>8.1f}"
            f"{row['recv_bytes_max'] / MB:>8.1f}{total / MB:>8.1f}{row['checksum_bytes']:>8}"
        )
    two = [row for row in rows if row["ranks"] == 2]
    if two:
        owned = two[0]["owned_weights_by_rank"]
        print()
        print(
            "owners: updatable weights per rank " + " / ".join(f"{w / 1e6:.1f}M" for w in owned) + " (sharded scheme)"
        )
        for row in two:
            per = row["per_rank"]
            print(
                f"  {row['scheme']:<8}scores {row['scores']:<6}sent/recv MB by rank: "
                + ", ".join(f"r{i} {p['sent_bytes'] / MB:.1f}/{p['recv_bytes'] / MB:.1f}" for i, p in enumerate(per))
                + "; collectives per update: "
                + (", ".join(f"{kind} {per[0]['calls'][kind]}" for kind in KINDS if per[0]["calls"][kind]) or "none")
            )
    peak = {row["ranks"]: max(row["peak_rss_gb_by_rank"]) for row in rows}
    print("peak resident memory per process: " + ", ".join(f"{n} rank(s) {gb:.1f} GB" for n, gb in peak.items()))
    for check in result["checks"]:
        print(check)
    print(f"\n(total wall time {meta['wall_s']:.0f} s)")


def check_agreement(rows: list[dict[str, Any]]) -> list[str]:
    """Sharded and naive must end with the same masks (same inputs, same owners' choices); all ranks too."""
    lines = []
    for row in rows:
        if len(set(row["masks_digest"])) != 1:
            raise RuntimeError(f"ranks ended with different masks in {row['scheme']} / {row['scores']}")
    for scores in ("local", "DDP"):
        pair = {row["scheme"]: row["masks_digest"][0] for row in rows if row["ranks"] == 2 and row["scores"] == scores}
        if len(pair) == 2:
            if pair["sharded"] != pair["naive"]:
                raise RuntimeError(f"sharded and naive ended with different masks (scores {scores}): {pair}")
            lines.append(
                f"check: 2 ranks, scores {scores}: sharded and naive end with identical masks ({pair['naive']})"
            )
    return lines


def run(settings: Settings) -> dict[str, Any]:
    """The table's rows of the module docstring, ``{"meta", "masked_weights", "parameters", "rows", "checks"}``; also
    written to ``settings.json`` when set."""
    start = time.perf_counter()
    default_threads = torch.get_num_threads()
    meta = machine("date", "torch", "python", "cpu_model", "cpus", "default_threads") | {
        "config": f"{settings.config} with " + ", ".join(f"{k}={v}" for k, v in OVERRIDES.items()),
        "reps": settings.reps,
        "load_avg_start": load_avg(),
    }
    result: dict[str, Any] = {"meta": meta}
    ranks: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    if settings.ranks in ("1", "both"):
        threads = sorted({1, default_threads})
        ranks = launch(1, threads, settings)
        rows += merge(ranks)
    if settings.ranks in ("2", "both"):
        ranks = launch(2, [1], settings)
        rows += merge(ranks)
    result["masked_weights"] = ranks[0]["masked_weights"]
    result["parameters"] = ranks[0]["parameters"]
    result["rows"] = rows
    result["checks"] = check_agreement(rows)
    result["meta"]["load_avg_end"] = load_avg()
    result["meta"]["wall_s"] = time.perf_counter() - start
    if settings.json is not None:
        write_json(settings.json, result)
    return result
