"""The training loop: one function, read top to bottom.

Launch (see README for all of them)::

    python -m sgtrain                                              # embedded default, one CPU
    python -m sgtrain --config cifar10.yaml --train.steps=200      # a shipped config plus overrides
    accelerate launch -m sgtrain --config imagenet128.yaml         # data-parallel GPUs
"""

from __future__ import annotations

import gc
import json
import math
import sys
import time
from contextlib import ExitStack, nullcontext
from pathlib import Path
from typing import Any

import torch

from sgtrain import checkpoint
from sgtrain.config import Config, ConfigError, config_from_dict, config_to_dict, config_to_yaml
from sgtrain.data.builtin import BUILTIN_DATASETS, IndexStream, load_builtin
from sgtrain.data.shards import bundled_shards
from sgtrain.data.stream import ShardLoader, resolve_shards
from sgtrain.dist import Dist, Network
from sgtrain.ema import EMA
from sgtrain.flops import dense_weight_gradients, flops_report, layers_iteration_flops
from sgtrain.images import save_grid
from sgtrain.losses import d_hinge, g_hinge
from sgtrain.models import Discriminator, Generator
from sgtrain.models.layers import CrossReplicaBatchNorm2d
from sgtrain.sparse import MaskManager
from sgtrain.sparse.sync import Comm
from sgtrain.stopping import EXIT_STOPPED, NonFiniteError, StoppedEarly, StopRequest
from sgtrain.tracking import METRICS_FILE, Tracker

SAMPLES_PER_CLASS = 8  # columns of a sample grid


def build_models(cfg: Config) -> tuple[Generator, Discriminator]:
    """G and D of ``cfg.model``, initialised from ``cfg.seed`` (identical on every rank)."""
    m = cfg.model
    torch.manual_seed(cfg.seed)
    generator = Generator(
        resolution=m.resolution,
        n_classes=m.n_classes,
        ch=m.g_ch,
        dim_z=m.dim_z,
        shared_dim=m.shared_dim,
        hier=m.hier,
        attn_res=m.g_attn,
        init=m.init,
        bn_eps=m.bn_eps,
        sn_eps=m.sn_eps,
    )
    discriminator = Discriminator(
        resolution=m.resolution, n_classes=m.n_classes, ch=m.d_ch, attn_res=m.d_attn, init=m.init, sn_eps=m.sn_eps
    )
    return generator, discriminator


def build_training(
    cfg: Config, device: torch.device | str = "cpu", *, comm: Comm | None = None, local_scores: bool = False
) -> tuple[Generator, Discriminator, torch.optim.Adam, torch.optim.Adam, MaskManager]:
    """G and D on ``device``, their Adam optimizers (BigGAN's betas and eps) and the mask manager (not initialized).

    ``comm`` and ``local_scores`` go to the mask manager (see :class:`MaskManager`)."""
    t = cfg.train
    G, D = build_models(cfg)
    G, D = G.to(device), D.to(device)
    opt_g = torch.optim.Adam(G.parameters(), lr=t.g_lr, betas=tuple(t.betas), eps=t.adam_eps)
    opt_d = torch.optim.Adam(D.parameters(), lr=t.d_lr, betas=tuple(t.betas), eps=t.adam_eps)
    masks = MaskManager(
        cfg.sparse,
        generator=G,
        discriminator=D,
        optimizers={"G": opt_g, "D": opt_d},
        total_steps=t.steps,
        seed=cfg.seed,
        comm=comm,
        local_scores=local_scores,
    )
    return G, D, opt_g, opt_d, masks


def step_generator(seed: int, step: int) -> torch.Generator:
    """The RNG for the latents of G step ``step``: a pure function of the two, so resumes are exact.

    It draws the latents of the global batch and each rank takes its own slice: rank r's latents are a pure function
    of (seed, rank, step) that does not depend on the number of ranks, so a run on N processes matches a run on one
    process with the same global batch (and can resume on a different number of processes).
    """
    return torch.Generator().manual_seed(seed * 1_000_000_007 + step)


def sample_noise(cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed latents ``[C*8, dim_z]`` and classes ``[C*8]`` of the sample grids: one row per class."""
    classes = cfg.train.sample_classes
    generator = torch.Generator().manual_seed(cfg.seed + 7919)
    z = torch.randn(classes * SAMPLES_PER_CLASS, cfg.model.dim_z, generator=generator)
    y = torch.arange(classes).repeat_interleave(SAMPLES_PER_CLASS)
    return z, y


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


def _nonfinite_flag(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``[1]`` int64: 1 if any floating-point tensor holds a NaN or Inf, else 0 (ready for an all-reduce "max").

    One fused max-|x| over the whole list (NaN and Inf survive a max) and one host sync, not one per tensor."""
    floats = [t.detach() for t in tensors if t.is_floating_point() and t.numel()]
    if not floats:
        return torch.zeros(1, dtype=torch.int64)
    peak = torch.stack(torch._foreach_norm(floats, float("inf"))).float()
    return torch.tensor([0 if bool(torch.isfinite(peak).all()) else 1], dtype=torch.int64)


def _has_eval_record(path: Path, step: int) -> bool:
    """Whether the metrics log holds the evaluation of ``step``."""
    if not path.is_file():
        return False
    for line in path.read_text().splitlines():
        record = json.loads(line) if line else {}
        if record.get("step") == step and any(key.startswith("eval/") for key in record):
            return True
    return False


# Settings a run cannot change when it resumes: they define the weights and masks in the checkpoint.
FIXED_ON_RESUME = {
    "model": None,  # every key
    "sparse": (
        "method",
        "distribution",
        "erk_power",
        "density_g",
        "density_d",
        "targets",
        "dense_first_last",
        "optimizer_state",  # masked mode keeps inactive moments at zero; a dense-mode checkpoint holds warm ones
    ),
}


# Settings added after checkpoints existed, with the behaviour those older checkpoints were trained with: a saved
# config holds every field of its time, so a missing one means "before it existed", not today's default.
LEGACY_SETTINGS = {
    "sparse": {"optimizer_state": "masked", "drop_fraction_min": 0.0},
    "train": {"ema_buffers": "copy"},
}


def _check_resumable(cfg: Config, saved: dict[str, Any], path: Path) -> None:
    saved = {key: dict(value) if isinstance(value, dict) else value for key, value in saved.items()}
    for section, values in LEGACY_SETTINGS.items():
        for key, value in values.items():
            saved.setdefault(section, {}).setdefault(key, value)
    old = config_from_dict(saved)
    diff = []
    for section, keys in FIXED_ON_RESUME.items():
        before, now = getattr(old, section), getattr(cfg, section)
        for key in keys or vars(now):
            if getattr(before, key) != getattr(now, key):
                diff.append(f"{section}.{key}: {getattr(before, key)!r} in the checkpoint, {getattr(now, key)!r} now")
    if diff:
        raise ConfigError(f"{path} was trained with other settings ({'; '.join(diff)}); use a new run_dir")


DATA_FIELDS = ("next", "good", "bad")  # a rank's stream state besides its per-worker offsets


def _gather_data_state(loader: ShardLoader, dist: Dist) -> dict[str, Any]:
    """Every rank's stream position (per-worker offsets and the rest), for rank 0's checkpoint."""
    state = loader.state_dict()
    row = torch.tensor(state["offsets"] + [state[key] for key in DATA_FIELDS], dtype=torch.int64)
    table = torch.zeros(dist.world_size, len(row), dtype=torch.int64)
    table[dist.rank] = row
    table = dist.all_reduce(table, "sum")
    workers = len(state["offsets"])
    ranks = [
        {"offsets": r[:workers].tolist(), **dict(zip(DATA_FIELDS, r[workers:].tolist(), strict=True))} for r in table
    ]
    return {"world_size": dist.world_size, "workers": workers, "ranks": ranks}


def _rank_data_state(saved: dict[str, Any] | None, dist: Dist, workers: int, step: int) -> dict[str, Any] | None:
    """This rank's saved stream position, if the checkpoint was written by as many ranks and workers as now."""
    if saved is None:
        return None
    if saved["world_size"] == dist.world_size and saved["workers"] == max(workers, 1):
        return saved["ranks"][dist.rank]
    if dist.is_main:
        print(
            f"sgtrain: warning: the checkpoint's data position is for {saved['world_size']} ranks x {saved['workers']} "
            f"workers, this run has {dist.world_size} x {max(workers, 1)}: the streams restart from their beginning "
            f"at step {step}, so some samples are seen again before others",
            file=sys.stderr,
            flush=True,
        )
    return None


def train(cfg: Config, stop: StopRequest | None = None) -> Path:
    """Train ``cfg`` to ``cfg.train.steps`` G steps, resuming from the run directory's latest checkpoint.

    Raises :class:`~sgtrain.stopping.StoppedEarly` after a checkpoint when SIGUSR1, SIGTERM or the stop file asked
    the run to stop (``python -m sgtrain`` exits 75 then). ``stop`` replaces the default request watcher. A NaN or
    Inf rolls the run back to its latest checkpoint under ``train.nonfinite: rollback`` (a :class:`NonFiniteError`
    when it comes back at the same step or past ``train.max_nonfinite``)."""
    dist = Dist(timeout_s=cfg.train.collective_timeout_s)
    events, rolled_back_at = 0, None
    try:
        while True:
            try:
                with stop or StopRequest() as request, ExitStack() as resources:
                    stopped = training_loop(cfg, dist, request, resources, nonfinite_events=events)
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
) -> StoppedEarly | None:
    """The whole run on this rank: set up or resume, then alternate D and G steps until ``cfg.train.steps``.

    Returns a :class:`StoppedEarly` (not raised, so that the caller can leave the process group cleanly first) when
    ``stop`` asked every rank to stop early; the checkpoint of that step is written by then. ``resources`` (the
    caller's) closes what the run opened, such as the W&B run, when it fails. ``nonfinite_events``: NaN/Inf events
    of earlier attempts in this process (rollbacks), counted towards ``train.max_nonfinite``."""
    stop = stop or StopRequest()
    resources = resources if resources is not None else ExitStack()
    t = cfg.train
    run_dir = Path(cfg.run_dir)
    micro_global = t.batch_size // t.accumulation
    if micro_global % dist.world_size:
        raise ConfigError(
            f"train.batch_size / train.accumulation = {micro_global} images must split evenly over "
            f"{dist.world_size} processes"
        )
    micro = micro_global // dist.world_size  # images per rank per forward pass
    mine = slice(dist.rank * micro, (dist.rank + 1) * micro)  # this rank's share of a global micro-batch
    if cfg.data.shards is not None:
        spec = cfg.data.shards
        if spec in BUILTIN_DATASETS:  # bundled data as shards, written into the cache on first use
            if dist.is_main:
                spec = str(bundled_shards(spec, cfg.model.resolution))
            dist.barrier()  # the other ranks then find them (or, on another node, write their own)
            if not dist.is_main:
                spec = str(bundled_shards(spec, cfg.model.resolution))
        shards = resolve_shards(spec)
        if shards.resolution is not None and shards.resolution != cfg.model.resolution:
            raise ConfigError(
                f"data.shards hold {shards.resolution} px images (manifest.json), model.resolution is "
                f"{cfg.model.resolution}"
            )
        if shards.num_classes is not None and shards.num_classes > cfg.model.n_classes:
            raise ConfigError(f"data.shards hold {shards.num_classes} classes but model.n_classes is smaller")
    else:
        data = load_builtin(cfg.data.dataset, cfg.model.resolution)
        if data.n_classes > cfg.model.n_classes:
            raise ConfigError(f"data.dataset {data.name} has {data.n_classes} classes but model.n_classes is smaller")

    # Build models, optimizers and the mask manager; resume from the latest complete checkpoint, if any.
    G, D, opt_g, opt_d, masks = build_training(cfg, dist.device, comm=dist)
    step, position = 0, 0
    flops = {"sparse": 0.0, "dense": 0.0}  # cumulative training FLOPs of this run and of its dense counterpart
    latest = checkpoint.load_latest(run_dir)
    if latest is None:
        masks.initialize()  # masks (and the pruned dense weights for prune_finetune) before the EMA copies G
        ema = EMA(G, decay=t.ema_decay, start=t.ema_start, buffers=t.ema_buffers)
    else:
        path, state = latest
        _check_resumable(cfg, state["config"], path)
        G.load_state_dict(state["G"])
        D.load_state_dict(state["D"])
        ema = EMA(G, decay=t.ema_decay, start=t.ema_start, buffers=t.ema_buffers)
        ema.load_state_dict(state["ema"])
        masks.load_state_dict(state["masks"])
        step, position = int(state["step"]), int(state["position"])
        flops = {key: float(value) for key, value in state["flops"].items()}
        torch.set_rng_state(state["rng"]["torch"])
        if torch.cuda.is_available() and len(state["rng"]["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    # Every rank picked its checkpoint itself (shared storage can disagree, e.g. NFS caching or a damaged newest
    # file seen by one node only) and drew or loaded its masks: all must start from the same step and topology.
    steps = torch.tensor([step], dtype=torch.int64)
    if int(dist.all_reduce(steps.clone(), "min")) != int(dist.all_reduce(steps.clone(), "max")):
        raise checkpoint.CheckpointError(f"the ranks found different latest checkpoints in {run_dir / 'checkpoints'}")
    masks.check_identical("at the start of the run")
    # FLOPs of every weight layer per image, measured once; a step's cost then follows the masks' densities.
    layer_flops = flops_report(
        G,
        D,
        resolution=cfg.model.resolution,
        n_classes=cfg.model.n_classes,
        dim_z=cfg.model.dim_z,
        batch_size=1,
        d_steps=1,
    )
    dense_iteration = _iteration_flops(cfg, layer_flops, {}, {})
    if dist.world_size > 1 and cfg.train.cross_replica_bn:
        for module in G.modules():  # after the EMA's copy of G, which must stay free of collectives
            if isinstance(module, CrossReplicaBatchNorm2d):
                module.sum_over_replicas = dist.sum_with_grad
    # Wrap G and D for data-parallel training: DDP, or DeepSpeed engines under a DeepSpeed launch. An engine copies
    # the weights into its fp32 master partitions now, so masks and resumed weights are in place before this.
    nets: dict[str, Network] = {}
    if dist.uses_deepspeed:
        masks.attach_to_engine(
            edit_state=lambda net, param, edit: nets[net].edit_state(param, edit),
            mask_master=lambda net, layers: nets[net].mask_master(
                [layer.param for layer in layers], [layer.fmask for layer in layers]
            ),
        )
    for net, module, optimizer in (("G", G, opt_g), ("D", D, opt_d)):
        nets[net] = dist.wrap(module, optimizer, micro_batch=micro, accumulation=t.accumulation)
    if latest is not None:
        nets["G"].load_optimizer_state(latest[1]["opt_g"])
        nets["D"].load_optimizer_state(latest[1]["opt_d"])
    G_net, D_net = nets["G"], nets["D"]
    # Real images: a rank's slice of each global batch of the bundled data, or its own stream of the shards.
    loader = None
    if cfg.data.shards is not None:
        saved = latest[1].get("data") if latest is not None else None
        loader = ShardLoader(
            shards,
            seed=cfg.seed,
            rank=dist.rank,
            world_size=dist.world_size,
            workers=cfg.data.num_workers,
            batch_size=micro,
            resolution=cfg.model.resolution,
            num_classes=cfg.model.n_classes,
            resampled=cfg.data.resampled,
            max_bad_fraction=cfg.data.max_bad_fraction,
            state=_rank_data_state(saved, dist, cfg.data.num_workers, step),
        )
    else:
        stream = IndexStream(len(data), seed=cfg.seed, rank=dist.rank, world_size=dist.world_size)

    def real_batch() -> tuple[torch.Tensor, torch.Tensor]:
        if loader is not None:
            return loader.next(dist.device)
        index = stream.indices(position, micro_global)
        return data.images[index], data.labels[index]

    autocast = (
        torch.autocast(device_type=dist.device.type, dtype=torch.bfloat16)
        if t.mixed_precision == "bf16"
        else nullcontext()
    )
    fixed_z, fixed_y = sample_noise(cfg)
    metrics_path = run_dir / METRICS_FILE
    # metrics.jsonl (cut back to this step on a resume) and W&B when enabled, on rank 0. If W&B does not start there,
    # every rank stops with rank 0's message instead of waiting for it in the first collective.
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

    saved_step = step if latest is not None else -1

    def save() -> None:
        nonlocal saved_step
        saved_step = step
        # Under DeepSpeed the optimizer states are gathered from every rank's partition, and every rank's stream
        # position is gathered too: all ranks take part.
        optimizer_states = {"opt_g": G_net.optimizer_state(), "opt_d": D_net.optimizer_state()}
        # Never a checkpoint with a NaN or Inf in it: every rank checks its copy (identical under DDP), so all agree.
        tensors = [*G.state_dict().values(), *D.state_dict().values(), *ema.state_dict().values()]
        for opt in optimizer_states.values():
            tensors += [v for slot in opt["state"].values() for v in slot.values() if isinstance(v, torch.Tensor)]
        if int(dist.all_reduce(_nonfinite_flag(tensors), "max")):
            raise NonFiniteError(
                f"the state of step {step} holds a NaN or Inf: its checkpoint is not written",
                step=step,
                events=nonfinite_events + 1,
                rollback=t.nonfinite == "rollback" and nonfinite_events < t.max_nonfinite,
            )
        data_state = _gather_data_state(loader, dist) if loader is not None else None
        if dist.is_main:
            state = {
                "step": step,
                "position": position,
                "flops": flops,
                "G": G.state_dict(),
                "D": D.state_dict(),
                "ema": ema.state_dict(),
                **optimizer_states,
                "masks": masks.state_dict(),
                "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all()},
                "config": config_to_dict(cfg),
            }
            if data_state is not None:
                state["data"] = data_state
            checkpoint.save_checkpoint(run_dir, step, state, keep=t.keep_checkpoints)
        dist.barrier()

    def sample_grid() -> None:
        if dist.is_main:
            with torch.no_grad(), autocast:
                images = ema.module(fixed_z.to(dist.device), fixed_y.to(dist.device))
            path = run_dir / "samples" / f"step-{step:08d}.png"
            save_grid(images, path, nrow=SAMPLES_PER_CLASS)
            tracker.log_image(step, "samples", path)

    evaluator = None
    if t.eval_every:
        from sgtrain.metrics.evaluate import extractor_for

        evaluator = extractor_for(cfg, device=dist.device)  # before any step: a missing Inception file stops here

    def evaluate_and_keep_best() -> None:
        from sgtrain.metrics.evaluate import evaluate_generator
        from sgtrain.sampling import LoadedGenerator

        path = run_dir / "checkpoints" / f"step-{step:08d}.pt"
        result = evaluate_generator(
            LoadedGenerator(ema.module, cfg, step, path),
            metrics=["fid", "kid", "is", "pr", "classes"],
            num_samples=t.eval_samples,
            truncation=None,
            extractor=evaluator,
            seed=cfg.seed,
            rank=dist.rank,
            world_size=dist.world_size,
            all_reduce=dist.all_reduce,
            device=dist.device,
        )
        if dist.is_main:
            keys = ("fid", "kid", "is", "precision", "recall", "classes_covered")
            tracker.log({"step": step, **{f"eval/{k}": result[k] for k in keys if k in result}})
            checkpoint.keep_best(run_dir, path, step, result[t.eval_metric], t.eval_metric, keep=t.keep_best)
        dist.barrier()

    # A run stopped (killed, or asked to stop) between writing an evaluation step's checkpoint and logging its
    # evaluation does that evaluation now, so that no evaluation step goes missing from the log or the best list.
    if evaluator is not None and latest is not None and step > 0 and step % t.eval_every == 0:
        missing = torch.tensor([0 if dist.is_main and _has_eval_record(metrics_path, step) else 1], dtype=torch.int64)
        if int(dist.all_reduce(missing, "min")):  # rank 0's answer: only it reads the log
            evaluate_and_keep_best()

    progress = None
    if dist.is_main:
        from tqdm import tqdm

        progress = tqdm(total=t.steps, initial=step, unit="step", dynamic_ncols=True, desc=run_dir.name)
        resources.enter_context(progress)  # closed on a failure too, so an error message starts on its own line
    sums: dict[str, torch.Tensor] = {}
    applied = {"D": 0, "G": 0}  # optimizer steps taken per network in this log interval

    def finite(net: str, losses: list[torch.Tensor], module: torch.nn.Module) -> bool:
        """Whether every rank's losses and ``net``'s gradients of this update are finite (one tiny all-reduce).
        If not: skip the update (``train.nonfinite: skip``) or raise for a rollback, within ``max_nonfinite``."""
        nonlocal nonfinite_events
        grads = [p.grad for p in module.parameters() if p.grad is not None]  # (none under DeepSpeed: the engine's)
        if int(dist.all_reduce(_nonfinite_flag([torch.stack(losses).float(), *grads]), "max")) == 0:
            return True
        nonfinite_events += 1
        # DeepSpeed has stepped inside backward already: only a rollback undoes it.
        rollback = t.nonfinite == "rollback" or dist.uses_deepspeed
        message = f"non-finite {net} loss or gradient at step {step + 1} ({nonfinite_events} of {t.max_nonfinite})"
        if rollback or nonfinite_events > t.max_nonfinite:
            raise NonFiniteError(
                message,
                step=step + 1,
                events=nonfinite_events,
                rollback=rollback and nonfinite_events <= t.max_nonfinite,
            )
        if dist.is_main:
            print(f"sgtrain: warning: {message}: that {net} update is skipped", file=sys.stderr, flush=True)
        module.zero_grad(set_to_none=True)
        return False

    topology: dict[str, float] = {}
    interval_start, interval_steps = time.perf_counter(), 0

    while step < t.steps:
        rng = step_generator(cfg.seed, step)

        def latents() -> tuple[torch.Tensor, torch.Tensor]:
            z = torch.randn(micro_global, cfg.model.dim_z, generator=rng)[mine]  # noqa: B023 (rng is this step's)
            y = torch.randint(cfg.model.n_classes, (micro_global,), generator=rng)[mine]  # noqa: B023
            return z.to(dist.device), y.to(dist.device)

        # Update discriminator.
        G.train()
        D_net.forward.train()
        for _ in range(t.d_steps):
            D_net.zero_grad()
            d_losses = []
            for rnd in range(t.accumulation):
                real, y_real = real_batch()
                real, y_real = real.to(dist.device), y_real.to(dist.device)
                position += micro_global
                z, y_fake = latents()
                with torch.no_grad(), autocast:
                    fake = G(z, y_fake)
                # One D pass over real and fake together, as BigGAN does: half the kernel launches.
                with D_net.accumulating(last=rnd == t.accumulation - 1):
                    with autocast:
                        logits = D_net.forward(torch.cat([real, fake.to(real.dtype)]), torch.cat([y_real, y_fake]))
                        loss_real, loss_fake = d_hinge(logits[:micro], logits[micro:])
                    D_net.backward((loss_real + loss_fake) / t.accumulation)  # (a DeepSpeed step: not under autocast)
                d_losses.append(torch.stack([loss_real.detach(), loss_fake.detach()]) / t.accumulation)
            if not finite("D", d_losses, D):
                continue
            d_loss = torch.stack(d_losses).sum(0)
            sums["d_loss_real"] = sums.get("d_loss_real", 0.0) + d_loss[0]
            sums["d_loss_fake"] = sums.get("d_loss_fake", 0.0) + d_loss[1]
            applied["D"] += 1
            masks.before_step("D")
            D_net.optimizer_step()
            masks.after_step("D")

        # Update generator. D's parameters are frozen and D is called unwrapped, so this backward neither
        # produces D gradients nor makes DDP (or a DeepSpeed engine) reduce them.
        D.requires_grad_(False)
        G_net.zero_grad()
        g_losses = []
        for rnd in range(t.accumulation):
            z, y = latents()
            with G_net.accumulating(last=rnd == t.accumulation - 1):
                with autocast:
                    g_loss = g_hinge(D(G_net.forward(z, y), y))
                G_net.backward(g_loss / t.accumulation)
            g_losses.append(g_loss.detach() / t.accumulation)
        D.requires_grad_(True)
        if finite("G", g_losses, G):
            sums["g_loss"] = sums.get("g_loss", 0.0) + torch.stack(g_losses).sum()
            applied["G"] += 1
            masks.before_step("G")
            G_net.optimizer_step()
            masks.after_step("G")
        step += 1

        # Update EMA (sparse: masked with G's mask).
        ema.update(G, step)
        masks.after_ema(ema.module)

        # Topology update.
        changed = masks.maybe_update(step)
        if changed:  # each masked layer's density too, after every update (W&B plots them per layer)
            for net in ("G", "D"):
                changed.update({f"sparse/{net}/{name}": d for name, d in masks.layer_densities(net).items()})
        topology.update(changed)

        # Maintenance.
        flops["dense"] += dense_iteration
        flops["sparse"] += _iteration_flops(cfg, layer_flops, masks.layer_densities("G"), masks.layer_densities("D"))
        interval_steps += 1
        if step % t.log_every == 0 or step == t.steps:
            elapsed = time.perf_counter() - interval_start
            record: dict[str, Any] = {"step": step, "images_seen": position, "train_flops": flops["sparse"]}
            record["world_size"] = dist.world_size
            record["train_flops_vs_dense"] = flops["sparse"] / flops["dense"]
            for name, total in sums.items():  # means over the updates applied (skipped ones have no loss)
                record[name] = float(dist.mean(total)) / applied["D" if name.startswith("d_") else "G"]
            if nonfinite_events:
                record["nonfinite/events"] = nonfinite_events
            record["images_per_s"] = interval_steps * t.d_steps * t.batch_size / max(elapsed, 1e-9)
            if loader is not None:  # corrupt samples skipped so far, all ranks
                record["data/bad_samples"] = int(dist.all_reduce(torch.tensor([loader.bad]), "sum"))
            record.update(topology)  # the latest topology update's figures, once
            topology = {}
            if not all(math.isfinite(v) for v in record.values()):  # a safety net: steps check their own values
                raise NonFiniteError(
                    f"non-finite metrics at step {step}: {record}", step=step, events=0, rollback=False
                )
            if dist.is_main:
                tracker.log(record)
                # (NaN shown when every update of a network in the interval was skipped: it has no loss then)
                shown = {"d": record.get("d_loss_real", math.nan) + record.get("d_loss_fake", math.nan)}
                shown["g"] = record.get("g_loss", math.nan)
                progress.set_postfix(**{k: f"{v:.3f}" for k, v in shown.items()}, img_s=f"{record['images_per_s']:.0f}")
            sums, interval_start, interval_steps = {}, time.perf_counter(), 0
            applied = {"D": 0, "G": 0}
        if progress is not None:
            progress.update(1)
        if step % t.sample_every == 0 or step == t.steps:
            sample_grid()
        if step % t.checkpoint_every == 0 or step == t.steps:
            save()
        if t.eval_every and step % t.eval_every == 0:
            evaluate_and_keep_best()
        # A stop request (signal or stop file, on any rank) ends the run here on every rank, after one checkpoint.
        reason = stop.agreed(dist.all_reduce) if step < t.steps else None
        if reason is not None:
            if saved_step != step:
                save()
            if stop.stop_file is not None:
                stop.stop_file.unlink(missing_ok=True)  # consumed: a resumed run must not stop at once again
            if progress is not None:
                progress.close()
            if tracker is not None:
                tracker.finish(exit_code=EXIT_STOPPED, preempted=True)
            return StoppedEarly(step, t.steps, reason)

    if progress is not None:
        progress.close()
    if tracker is not None:
        tracker.finish()
    return None
