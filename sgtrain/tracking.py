"""Experiment tracking on rank 0: ``run_dir/metrics.jsonl`` always, mirrored to Weights & Biases when enabled.

The training loop opens one :class:`Tracker` on rank 0 before its first step and hands it every record::

    with Tracker(cfg, run_dir, resume_step=step) as tracker:  # W&B failing to start raises ConfigError here
        ...
        tracker.log({"step": step, "g_loss": 0.71, ...})  # one JSON line; one W&B row
        tracker.log_image(step, "samples", path)  # a sample grid already written as a PNG

metrics.jsonl stays the run's record: it is written whatever the tracking config says, and a resumed run first drops
the records after its checkpoint's step, so the file reads as one uninterrupted run. W&B gets the same records as one
W&B run per run directory: its id is drawn once and kept in ``run_dir/wandb_id.txt``, and every later start of the
run (a resume, a requeue) continues that W&B run. wandb's own files go under ``run_dir/wandb/``.
"""

from __future__ import annotations

import json
import secrets
import string
from pathlib import Path
from types import TracebackType
from typing import Any

from sgtrain import checkpoint
from sgtrain.config import Config, ConfigError, config_to_dict

METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb_id.txt"
# The x-axis of every W&B chart. W&B's own step must only increase within a W&B run, but a resumed training run
# logs again the steps between its checkpoint and the point where the previous attempt died. Passing
# ``step=record["step"]`` would make W&B drop those records online (with a warning) while metrics.jsonl keeps them.
# Rewinding the W&B run to the checkpoint (``wandb.init(resume_from=f"{id}?_step={step}")``) would be exact, but it
# is a preview feature that needs the server's support (none offline, none on W&B Server) and rules out custom step
# metrics. So W&B's step just counts rows, and the training step is logged as this metric, which every other key
# is plotted against (``define_metric("*", step_metric=...)``): nothing is dropped, online or offline, and charts
# show a resume's repeated steps drawn over the first attempt's (the same values when the run resumed exactly).
STEP_METRIC = "train/step"


class Tracker:
    """metrics.jsonl of ``run_dir`` plus, when ``cfg.tracking.wandb`` is enabled, a W&B run mirroring it. Rank 0 only.

    ``resume_step`` is the step the run starts from (0 for a new run, else the loaded checkpoint's step): records
    logged after it by an earlier attempt are dropped from metrics.jsonl first. Raises :class:`ConfigError` if W&B is
    enabled and does not start (e.g. ``mode: online`` without an API key), so construct it before the first step.
    """

    def __init__(self, cfg: Config, run_dir: str | Path, *, resume_step: int) -> None:
        self.run_dir = Path(run_dir)
        self.metrics_path = self.run_dir / METRICS_FILE
        self.wandb_id: str | None = None  # the W&B run's id while one is open
        self._wandb: Any = None  # the wandb module, imported only when a W&B run is opened
        self._run: Any = None
        self._log_images = cfg.tracking.wandb.log_images
        self._finished = False
        self.run_dir.mkdir(parents=True, exist_ok=True)
        _truncate_metrics(self.metrics_path, resume_step)
        if cfg.tracking.wandb.enabled and cfg.tracking.wandb.mode != "disabled":
            self._start_wandb(cfg)

    def _start_wandb(self, cfg: Config) -> None:
        import wandb  # here, not at the top: importing wandb takes about a second that a run without it never pays

        settings = cfg.tracking.wandb
        run_id = _wandb_run_id(self.run_dir)
        try:
            run = wandb.init(
                project=settings.project,
                entity=settings.entity,
                name=settings.name or self.run_dir.resolve().name,
                group=settings.group,
                tags=settings.tags,
                config=config_to_dict(cfg),
                # Always explicit: with no mode wandb goes online, and without an API key fails at once.
                mode=settings.mode,
                dir=str(self.run_dir.resolve()),
                id=run_id,
                resume="allow",  # the run's first start creates the W&B run; every later one continues it
                reinit="create_new",  # never hand back some other W&B run still open in this process
            )
        except Exception as error:  # wandb.errors.Error, or whatever its service process or the network raised
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise ConfigError(
                f"tracking.wandb: W&B did not start in {settings.mode} mode: {reason} (--tracking.wandb.mode=offline "
                "logs without a server, for `wandb sync` later; --tracking.wandb.enabled=false turns W&B off)"
            ) from error
        run.define_metric(STEP_METRIC)
        run.define_metric("*", step_metric=STEP_METRIC)
        self._wandb, self._run, self.wandb_id = wandb, run, run_id

    def log(self, record: dict[str, Any]) -> None:
        """Append ``record`` (an int ``"step"`` and scalar values) to metrics.jsonl and, when on, to W&B."""
        self._check_open()
        step = record["step"]
        if not isinstance(step, int) or isinstance(step, bool):
            raise TypeError(f"a record's step must be an int, got {step!r}")
        with open(self.metrics_path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self._run is not None:
            self._run.log({STEP_METRIC: step, **{key: value for key, value in record.items() if key != "step"}})

    def log_image(self, step: int, key: str, path: str | Path) -> None:
        """Upload the image file at ``path`` (e.g. a sample grid) to W&B under ``key``; metrics.jsonl is not touched."""
        self._check_open()
        if self._run is not None and self._log_images:
            image = self._wandb.Image(str(path), caption=f"step {step}")
            self._run.log({STEP_METRIC: step, key: image})

    def finish(self, *, exit_code: int = 0, preempted: bool = False) -> None:
        """Close the W&B run (a no-op without one, and on a second call).

        ``exit_code`` 0 marks the W&B run finished, any other value failed; with ``preempted`` (a run stopped on
        request that will be resumed) and a non-zero ``exit_code`` W&B shows it as preempted instead.
        """
        if self._finished:
            return
        self._finished = True
        run, self._run = self._run, None
        if run is not None:
            if preempted:
                run.mark_preempting()
            run.finish(exit_code=exit_code)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.finish(exit_code=0 if exc_type is None else 1)

    def _check_open(self) -> None:
        if self._finished:
            raise RuntimeError(f"the tracker of {self.run_dir} is finished")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records logged after ``step``: a resumed run logs those steps again. A line that does not parse (the
    torn last line of a process killed while appending) is dropped too."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line)
    checkpoint.write_atomic(path, "".join(line + "\n" for line in kept).encode())


def _wandb_run_id(run_dir: Path) -> str:
    """The W&B run id of ``run_dir``: read back, or drawn and written before the W&B run is created, so that a
    crash at any point leaves at most one W&B run per run directory."""
    path = run_dir / WANDB_ID_FILE
    if path.is_file():
        return path.read_text().strip()
    # W&B's own form: 8 characters of [a-z0-9], 2.8e12 ids, unique enough within a project.
    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    checkpoint.write_atomic(path, (run_id + "\n").encode())
    return run_id
