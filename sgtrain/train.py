"""The training loop: one function, read top to bottom.

Launch (see README for all of them)::

    python -m sgtrain                                              # embedded default, one CPU
    python -m sgtrain --config cifar10.yaml --train.steps=200      # a shipped config plus overrides
    accelerate launch -m sgtrain --config imagenet128.yaml         # data-parallel GPUs

Only the command line and the study's runner import this module; everything the loop calls lives below it.
"""

from __future__ import annotations

import gc
import json
import math
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sgtrain import checkpoint
from sgtrain.augment import StepAugment
from sgtrain.config import Config, ConfigError, config_to_yaml
from sgtrain.data.source import BatchSource, check_data, open_batches
from sgtrain.dist import Dist, Network
from sgtrain.ema import EMA
from sgtrain.flops import balance_flops, dense_weight_gradients, flops_report, layers_iteration_flops
from sgtrain.images import save_grid
from sgtrain.losses import HINGE, GanLoss
from sgtrain.models.layers import CrossReplicaBatchNorm2d
from sgtrain.parts import SAMPLES_PER_CLASS, StepLatents, build_training, nonfinite_flag, sample_noise, step_generator
from sgtrain.run_state import CheckpointIO, ConfigGuard, OptimizerState, Progress, RngState
from sgtrain.sparse import MaskManager
from sgtrain.step import GanStep, StepResult
from sgtrain.stopping import EXIT_STOPPED, NonFiniteError, StoppedEarly, StopRequest
from sgtrain.tracking import METRICS_FILE, Tracker


@dataclass(kw_only=True)
class Hooks:
    """What a program (or a test) may hand the loop besides its config.

    ``losses``: the GAN objective (BigGAN's hinge by default). ``batches``: wraps the real-data source (to record or
    transform what it serves). ``after_iteration(step, gan_step, result)``: called after every iteration, with G's
    step count, the step's parts (networks, masks, EMA) and what the iteration produced."""

    losses: GanLoss = HINGE
    batches: Callable[[BatchSource], BatchSource] | None = None
    after_iteration: Callable[[int, GanStep, StepResult], None] | None = None


def train(cfg: Config, stop: StopRequest | None = None, *, hooks: Hooks | None = None) -> Path:
    """Train ``cfg`` to ``cfg.train.steps`` G steps, resuming from the run directory's latest checkpoint.

    Raises :class:`~sgtrain.stopping.StoppedEarly` after a checkpoint when SIGUSR1, SIGTERM or the stop file asked
    the run to stop (``python -m sgtrain`` exits 75 then). ``stop`` replaces the default request watcher. A NaN or
    Inf rolls the run back to its latest checkpoint under ``train.nonfinite: rollback`` (a :class:`NonFiniteError`
    when it comes back at the same step or past ``train.max_nonfinite``). ``hooks``: see :class:`Hooks`."""
    dist = Dist(timeout_s=cfg.train.collective_timeout_s)
    events, rolled_back_at = 0, None
    try:
        while True:
            try:
                with stop or StopRequest() as request, ExitStack() as resources:
                    stopped = training_loop(cfg, dist, request, resources, nonfinite_events=events, hooks=hooks)
                break
            except NonFiniteError as error:
                # Every rank raised it at the same point (the check is all-reduced): all restart, or all stop.
                if not error.rollback or error.step == rolled_back_at:
                    if error.step == rolled_back_at:
                        error.args = (f"{error}: it came back at the same step after a rollback (not transient)",)
                    raise
                events, rolled_back_at = error.events, error.step
                if dist.is_main:
                    print(f"sgtrain: warning: {error}: rolling back to the latest checkpoint", file=sys.stderr)
                gc.collect()
    except BaseException:
        # No barrier on the way out: if this rank failed alone, the others are not at one, and pairing with a later
        # barrier of theirs would let them train on against a peer that is gone.
        dist.shutdown(clean=False)
        raise
    # The loop's models and optimizers are freed by now, which a clean gloo shutdown needs.
    dist.shutdown()
    if stopped is not None:
        raise stopped
    return Path(cfg.run_dir)


def training_loop(
    cfg: Config,
    dist: Dist,
    stop: StopRequest | None = None,
    resources: ExitStack | None = None,
    *,
    nonfinite_events: int = 0,
    hooks: Hooks | None = None,
) -> StoppedEarly | None:
    """The whole run on this rank: set up or resume, then train GAN iterations until ``cfg.train.steps``.

    Returns a :class:`StoppedEarly` (not raised, so that the caller can leave the process group cleanly first) when
    ``stop`` asked every rank to stop early; the checkpoint of that step is written by then. ``resources`` (the
    caller's) closes what the run opened, such as the W&B run, when it fails. ``nonfinite_events``: NaN/Inf events
    of earlier attempts in this process (rollbacks), counted towards ``train.max_nonfinite``."""
    stop = stop or StopRequest()
    resources = resources if resources is not None else ExitStack()
    hooks = hooks or Hooks()
    t, run_dir = cfg.train, Path(cfg.run_dir)
    micro_global = t.batch_size // t.accumulation
    if micro_global % dist.world_size:
        raise ConfigError(
            f"train.batch_size / train.accumulation = {micro_global} images must split evenly over "
            f"{dist.world_size} processes"
        )
    micro = micro_global // dist.world_size  # images per rank per forward pass
    mine = slice(dist.rank * micro, (dist.rank + 1) * micro)  # this rank's share of a global micro-batch
    data = check_data(cfg, dist)

    # Build the networks, their optimizers, the mask manager and the EMA; wrap G and D for data-parallel training.
    G, D, opt_g, opt_d, masks = build_training(cfg, dist.device, comm=dist)
    latest = checkpoint.load_latest(run_dir)
    if latest is None:  # masks (and prune_finetune's pruned dense weights) before the EMA copies G, and before an
        # engine copies the weights into its masters
        pretrained = checkpoint.read_pretrained(cfg.sparse.prune_from) if masks.wants_dense_weights else None
        masks.initialize(pretrained)
    ema = EMA(G, decay=t.ema_decay, start=t.ema_start, buffers=t.ema_buffers)
    # FLOPs of every weight layer per image, measured once (before G's norms are wired to collectives); a step's
    # cost then follows the masks' densities.
    m = cfg.model
    layer_flops = flops_report(
        G, D, resolution=m.resolution, n_classes=m.n_classes, dim_z=m.dim_z, batch_size=1, d_steps=1
    )
    nets = _wrap(cfg, dist, masks, {"G": (G, opt_g), "D": (D, opt_d)}, micro)
    batches = open_batches(cfg, data, dist, global_batch=micro_global)
    if hooks.batches is not None:
        batches = hooks.batches(batches)

    # What a checkpoint holds, registered once: saving walks it, and so does resuming from the latest checkpoint.
    progress = Progress()
    state = CheckpointIO(
        progress,
        batches,
        config=ConfigGuard(cfg, latest[0] if latest is not None else None),
        G=G,
        D=D,
        ema=ema,
        masks=masks,
        opt_g=OptimizerState(nets["G"]),
        opt_d=OptimizerState(nets["D"]),
        rng=RngState(),
    )
    if latest is not None:
        state.load_state_dict(latest[1])
    # Every rank picked its checkpoint itself (shared storage can disagree, e.g. NFS caching or a damaged newest
    # file seen by one node only) and drew or loaded its masks: all must start from the same step and topology.
    steps = torch.tensor([progress.step], dtype=torch.int64)
    if int(dist.all_reduce(steps.clone(), "min")) != int(dist.all_reduce(steps.clone(), "max")):
        raise checkpoint.CheckpointError(f"the ranks found different latest checkpoints in {run_dir / 'checkpoints'}")
    masks.check_identical("at the start of the run")
    tracker = _start_tracking(cfg, dist, progress.step, micro, resources)
    guard = NonFiniteGuard(cfg, dist, progress, events=nonfinite_events)
    autocast = _autocast(cfg, dist)
    gan = GanStep(
        G=nets["G"],
        D=nets["D"],
        masks=masks,
        ema=ema,
        losses=hooks.losses,
        d_steps=t.d_steps,
        accumulation=t.accumulation,
        autocast=autocast,
        is_finite=guard,
    )
    evaluation = Evaluation(cfg, dist, ema, tracker) if t.eval_every else None  # a missing Inception file stops here
    # A run stopped (killed, or asked to stop) between writing an evaluation step's checkpoint and logging its
    # evaluation does that evaluation now, so that no evaluation step goes missing from the log or the best list.
    if evaluation is not None and latest is not None and progress.step > 0 and progress.step % t.eval_every == 0:
        evaluation.if_missing(progress.step)
    fixed_z, fixed_y = sample_noise(cfg)
    bar = None
    if dist.is_main:
        from tqdm import tqdm

        bar = tqdm(total=t.steps, initial=progress.step, unit="step", dynamic_ncols=True, desc=run_dir.name)
        resources.enter_context(bar)  # closed on a failure too, so an error message starts on its own line
    dense_iteration = _iteration_flops(cfg, layer_flops, {}, {})
    interval = Interval()
    saved_step = progress.step if latest is not None else -1

    while progress.step < t.steps:
        # The iteration's cost at the densities it trains with (ADAPT changes D's, GMP both, after a step).
        g_densities, d_densities = masks.layer_densities("G"), masks.layer_densities("D")
        progress.flops["dense"] += dense_iteration
        progress.flops["sparse"] += _iteration_flops(cfg, layer_flops, g_densities, d_densities)
        if masks.balance_every and (progress.step + 1) % masks.balance_every == 0:  # ADAPT's extra G and D pass,
            progress.flops["sparse"] += balance_flops(  # over the last micro-batch
                layer_flops["G"]["layers"], layer_flops["D"]["layers"], g_densities, d_densities, micro_global
            )
        latents = StepLatents(cfg, progress.step, global_batch=micro_global, mine=mine, device=dist.device)
        augment = None
        if t.augment:
            rng = step_generator(cfg.seed, progress.step, stream=1)
            augment = StepAugment(t.augment, rng, global_batch=micro_global, mine=mine)
        if t.g_lr_decay_from is not None:  # set from the step alone, so a resumed run continues the same schedule
            gan.G.set_lr(t.g_lr_at(progress.step))
        result = gan(progress.step, lambda: batches.next(dist.device), latents, augment)
        progress.step += 1
        step = progress.step
        interval.add(result, masks)
        if hooks.after_iteration is not None:
            hooks.after_iteration(step, gan, result)

        # Maintenance.
        if step % t.log_every == 0 or step == t.steps:
            record = interval.record(cfg, dist, progress, batches, guard.events, masks.status())
            if tracker is not None:
                tracker.log(record)
                # (NaN shown when every update of a network in the interval was skipped: it has no loss then)
                shown = {"d": record.get("d_loss_real", math.nan) + record.get("d_loss_fake", math.nan)}
                shown["g"] = record.get("g_loss", math.nan)
                bar.set_postfix(**{k: f"{v:.3f}" for k, v in shown.items()}, img_s=f"{record['images_per_s']:.0f}")
            interval = Interval()
        if bar is not None:
            bar.update(1)
        if (step % t.sample_every == 0 or step == t.steps) and tracker is not None:
            with torch.no_grad(), autocast():
                images = ema.module(fixed_z.to(dist.device), fixed_y.to(dist.device))
            path = run_dir / "samples" / f"step-{step:08d}.png"
            save_grid(images, path, nrow=SAMPLES_PER_CLASS)
            tracker.log_image(step, "samples", path)
        if step % t.checkpoint_every == 0 or step == t.steps:
            saved_step = _save(cfg, dist, state, step, guard)
        if evaluation is not None and step % t.eval_every == 0:
            evaluation(step)
        # A stop request (signal or stop file, on any rank) ends the run here on every rank, after one checkpoint.
        reason = stop.agreed(dist) if step < t.steps else None
        if reason is not None:
            if saved_step != step:
                _save(cfg, dist, state, step, guard)
            if stop.stop_file is not None:
                stop.stop_file.unlink(missing_ok=True)  # consumed: a resumed run must not stop at once again
            if bar is not None:
                bar.close()
            if tracker is not None:
                tracker.finish(exit_code=EXIT_STOPPED, preempted=True)
            return StoppedEarly(step, t.steps, reason)

    if bar is not None:
        bar.close()
    if tracker is not None:
        tracker.finish()
    return None


# ---------------------------------------------------------------------------------------------------------------------
# The loop's parts, each with explicit inputs.


def _wrap(
    cfg: Config,
    dist: Dist,
    masks: MaskManager,
    modules: dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]],
    micro: int,
) -> dict[str, Network]:
    """G and D as the loop trains them: DDP, or DeepSpeed engines under a DeepSpeed launch (which copy the weights
    into their fp32 master partitions now: fresh masks are in place before this, resumed weights reach the masters
    when the optimizer state is loaded)."""
    nets: dict[str, Network] = {}
    if dist.uses_deepspeed:
        masks.attach_to_engine(
            edit_state=lambda net, param, edit: nets[net].edit_state(param, edit),
            mask_master=lambda net, layers: nets[net].mask_master(
                [layer.param for layer in layers], [layer.fmask for layer in layers]
            ),
        )
    if dist.world_size > 1 and cfg.train.cross_replica_bn:
        plain = []  # a user's own G (model.builder) may hold torch's batch norm, which sees this rank's images only
        for module in modules["G"][0].modules():  # after the EMA's copy of G, which must stay free of collectives
            if isinstance(module, CrossReplicaBatchNorm2d):
                module.sum_over_replicas = dist.sum_with_grad
            elif isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                plain.append(type(module).__name__)
        if plain and dist.is_main:
            print(
                f"sgtrain: warning: G's {plain[0]} normalises over each rank's images, not the global batch: use "
                "sgtrain.models.layers.CrossReplicaBatchNorm2d for statistics over all ranks",
                file=sys.stderr,
                flush=True,
            )
    for net, (module, optimizer) in modules.items():
        nets[net] = dist.wrap(module, optimizer, micro_batch=micro, accumulation=cfg.train.accumulation)
    return nets


def _autocast(cfg: Config, dist: Dist) -> Callable[[], Any]:
    if cfg.train.mixed_precision == "bf16":
        return lambda: torch.autocast(device_type=dist.device.type, dtype=torch.bfloat16)
    return nullcontext


def _start_tracking(cfg: Config, dist: Dist, step: int, micro: int, resources: ExitStack) -> Tracker | None:
    """metrics.jsonl (cut back to this step on a resume) and W&B when enabled, on rank 0. If W&B does not start
    there, every rank stops with rank 0's message instead of waiting for it in the first collective."""
    t, run_dir = cfg.train, Path(cfg.run_dir)
    tracker, failure = None, None
    if dist.is_main:
        print(
            f"sgtrain: {run_dir} on {dist.describe()}: global batch {t.batch_size} = {dist.world_size} ranks x "
            f"{micro} images x {t.accumulation} accumulation rounds; {'resuming at' if step else 'from'} step {step}",
            flush=True,
        )
        (run_dir / "samples").mkdir(parents=True, exist_ok=True)
        if step < t.steps:
            checkpoint.write_atomic(run_dir / "config.yaml", config_to_yaml(cfg).encode())
        else:
            print(f"sgtrain: {run_dir} is complete ({step} of {t.steps} steps): nothing to train", flush=True)
        try:
            tracker = Tracker(cfg, run_dir, resume_step=step)
        except ConfigError as error:
            failure = error
        else:
            resources.enter_context(tracker)  # closed (and the W&B run marked failed) if the run fails
    if int(dist.all_reduce(torch.tensor([failure is not None], dtype=torch.int64), "max")):
        raise failure or ConfigError("experiment tracking did not start on rank 0 (its error says why)")
    dist.barrier()
    return tracker


class NonFiniteGuard:
    """The step's finiteness check: whether every rank's losses and the network's gradients of this update are
    finite (one tiny all-reduce). If not: skip the update (``train.nonfinite: skip``) or raise for a rollback,
    within ``train.max_nonfinite`` events."""

    def __init__(self, cfg: Config, dist: Dist, progress: Progress, *, events: int) -> None:
        self.train, self.dist, self.progress, self.events = cfg.train, dist, progress, events

    def __call__(self, net: str, losses: list[torch.Tensor], module: torch.nn.Module) -> bool:
        grads = [p.grad for p in module.parameters() if p.grad is not None]  # (none under DeepSpeed: the engine's)
        if int(self.dist.all_reduce(nonfinite_flag([torch.stack(losses).float(), *grads]), "max")) == 0:
            return True
        t, step = self.train, self.progress.step + 1
        self.events += 1
        # DeepSpeed has stepped inside backward already: only a rollback undoes it.
        rollback = t.nonfinite == "rollback" or self.dist.uses_deepspeed
        message = f"non-finite {net} loss or gradient at step {step} ({self.events} of {t.max_nonfinite})"
        if rollback or self.events > t.max_nonfinite:
            raise NonFiniteError(
                message, step=step, events=self.events, rollback=rollback and self.events <= t.max_nonfinite
            )
        if self.dist.is_main:
            print(f"sgtrain: warning: {message}: that {net} update is skipped", file=sys.stderr, flush=True)
        module.zero_grad(set_to_none=True)
        return False


def _float_tensors(value: Any) -> list[torch.Tensor]:
    """Every floating-point tensor in a nested checkpoint state."""
    if isinstance(value, torch.Tensor):
        return [value] if value.is_floating_point() else []
    if isinstance(value, dict):
        return [t for v in value.values() for t in _float_tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _float_tensors(v)]
    return []


def _save(cfg: Config, dist: Dist, state: CheckpointIO, step: int, guard: NonFiniteGuard) -> int:
    """Write the checkpoint of ``step`` (rank 0) and return the step. Every rank builds the state: DeepSpeed's
    optimizer states and every rank's stream position are gathered."""
    saved = state.state_dict()
    # Never a checkpoint with a NaN or Inf in it: every rank checks its copy (identical under DDP), so all agree.
    if int(dist.all_reduce(nonfinite_flag(_float_tensors(saved)), "max")):
        t = cfg.train
        raise NonFiniteError(
            f"the state of step {step} holds a NaN or Inf: its checkpoint is not written",
            step=step,
            events=guard.events + 1,
            rollback=t.nonfinite == "rollback" and guard.events < t.max_nonfinite,
        )
    if dist.is_main:
        checkpoint.save_checkpoint(Path(cfg.run_dir), step, saved, keep=cfg.train.keep_checkpoints)
    dist.barrier()
    return step


class Evaluation:
    """The EMA generator's metrics at an evaluation step, logged, and the best checkpoints kept (``run_dir/best``)."""

    def __init__(self, cfg: Config, dist: Dist, ema: EMA, tracker: Tracker | None) -> None:
        from sgtrain.metrics.evaluate import extractor_for

        self.cfg, self.dist, self.ema, self.tracker = cfg, dist, ema, tracker
        self.extractor = extractor_for(cfg, device=dist.device)  # before any step: a missing Inception file stops

    def __call__(self, step: int) -> None:
        from sgtrain.generators import LoadedGenerator
        from sgtrain.metrics.evaluate import METRICS, RESULTS, evaluate_generator

        t, run_dir = self.cfg.train, Path(self.cfg.run_dir)
        path = run_dir / "checkpoints" / f"step-{step:08d}.pt"
        result = evaluate_generator(
            LoadedGenerator(self.ema.module, self.cfg, step, path),
            metrics=METRICS,
            num_samples=t.eval_samples,
            truncation=None,
            extractor=self.extractor,
            seed=self.cfg.seed,
            comm=self.dist,
            device=self.dist.device,
        )
        if self.tracker is not None:
            self.tracker.log({"step": step, **{f"eval/{k}": result[k] for k in RESULTS if k in result}})
            checkpoint.keep_best(run_dir, path, step, result[t.eval_metric], t.eval_metric, keep=t.keep_best)
        self.dist.barrier()

    def if_missing(self, step: int) -> None:
        """Evaluate ``step`` unless the metrics log holds its evaluation (rank 0 reads the log; all ranks follow)."""
        logged = self.dist.is_main and _has_eval_record(Path(self.cfg.run_dir) / METRICS_FILE, step)
        if int(self.dist.all_reduce(torch.tensor([0 if logged else 1], dtype=torch.int64), "min")):
            self(step)


def _has_eval_record(path: Path, step: int) -> bool:
    """Whether the metrics log holds the evaluation of ``step``."""
    if not path.is_file():
        return False
    for line in path.read_text().splitlines():
        record = json.loads(line) if line else {}
        if record.get("step") == step and any(key.startswith("eval/") for key in record):
            return True
    return False


def _iteration_flops(
    cfg: Config, report: dict[str, Any], g_densities: dict[str, float], d_densities: dict[str, float]
) -> float:
    """Training FLOPs of one G iteration (with its D steps) at the given layer densities (sgtrain.flops conventions)."""
    return layers_iteration_flops(
        report["G"]["layers"],
        report["D"]["layers"],
        g_densities,
        d_densities,
        batch_size=cfg.train.batch_size,
        d_steps=cfg.train.d_steps,
        dense_weight_grads=dense_weight_gradients(cfg.sparse),
    )


@dataclass
class Interval:
    """The sums of one logging interval: losses of the updates applied, the latest topology update's figures."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    applied: dict[str, int] = field(default_factory=lambda: {"D": 0, "G": 0})  # optimizer steps per network
    topology: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    start: float = field(default_factory=time.perf_counter)

    def add(self, result: StepResult, masks: MaskManager) -> None:
        self.steps += 1
        for d_loss in result.d_losses:
            self.sums["d_loss_real"] = self.sums.get("d_loss_real", 0.0) + d_loss[0]
            self.sums["d_loss_fake"] = self.sums.get("d_loss_fake", 0.0) + d_loss[1]
        self.applied["D"] += len(result.d_losses)
        if result.g_loss is not None:
            self.sums["g_loss"] = self.sums.get("g_loss", 0.0) + result.g_loss
            self.applied["G"] += 1
        if result.topology:  # each masked layer's density too, after every update (W&B plots them per layer)
            self.topology.update(result.topology)
            for net in ("G", "D"):
                self.topology.update({f"sparse/{net}/{name}": d for name, d in masks.layer_densities(net).items()})

    def record(
        self,
        cfg: Config,
        dist: Dist,
        progress: Progress,
        batches: BatchSource,
        nonfinite_events: int,
        status: dict[str, float],
    ) -> dict[str, Any]:
        """The interval's metrics.jsonl record (every rank calls it: the losses are averaged over ranks); ``status``:
        the mask manager's figures as the interval ends (densities, ADAPT's balance ratio)."""
        elapsed = time.perf_counter() - self.start
        flops = progress.flops
        record: dict[str, Any] = {
            "step": progress.step,
            "images_seen": batches.position,
            "train_flops": flops["sparse"],
        }
        record["world_size"] = dist.world_size
        record["train_flops_vs_dense"] = flops["sparse"] / flops["dense"]
        for name, total in self.sums.items():  # means over the updates applied (skipped ones have no loss)
            record[name] = float(dist.mean(total)) / self.applied["D" if name.startswith("d_") else "G"]
        if nonfinite_events:
            record["nonfinite/events"] = nonfinite_events
        record["images_per_s"] = self.steps * cfg.train.d_steps * cfg.train.batch_size / max(elapsed, 1e-9)
        if batches.bad is not None:  # corrupt samples skipped so far, all ranks
            record["data/bad_samples"] = int(dist.all_reduce(torch.tensor([batches.bad]), "sum"))
        record.update(status)
        record.update(self.topology)  # the latest topology update's figures, once
        if not all(math.isfinite(v) for v in record.values()):  # a safety net: steps check their own values
            raise NonFiniteError(
                f"non-finite metrics at step {progress.step}: {record}", step=progress.step, events=0, rollback=False
            )
        return record
