"""sgtrain's command line: parse and dispatch, nothing else.

python -m sgtrain                                         # train the embedded default (digits, CPU is enough)
python -m sgtrain --config cifar10.yaml --train.steps=200 # same as `train --config ...`
python -m sgtrain print-config --config imagenet128.yaml  # the resolved config, nothing run
accelerate launch -m sgtrain --config imagenet128.yaml    # data-parallel GPUs
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sgtrain.config import Config

# Exit codes (sgtrain.stopping): 2 bad input (config, paths, checkpoints, launch), before any work where possible;
# 3 the ranks' masks diverged; 75 stopped on request (SIGUSR1, SIGTERM or $SGTRAIN_STOP_FILE) after writing a
# checkpoint: the same command resumes (slurm/biggan.sh requeues on it); 4 a NaN or Inf that train.nonfinite could
# not get past (no checkpoint of it written); 1 a study with failed cells.
DEFAULT_CONFIG = "digits.yaml"  # the embedded default job: what `python -m sgtrain` trains without --config

COMMANDS = {
    "train": "train a GAN (the default command): [--config FILE] [--section.key=value ...]",
    "print-config": "print the resolved config as YAML: [--config FILE] [--section.key=value ...]",
    "inspect": "masks of a run's latest checkpoint (or a checkpoint file): RUN_DIR_OR_CHECKPOINT [--json]",
    "flops": "inference and training FLOPs, dense and sparse: [--config FILE] [--section.key=value ...] [--json]",
    "evaluate": "FID, KID, IS, precision/recall, classes covered of a run's EMA generator: RUN_DIR_OR_CHECKPOINT "
    "[--metrics fid,kid,is,pr,classes] [--num-samples N] [--truncation T] [--extractor auto|inception|classifier] "
    "[--inception FILE] [--standing] [--json]",
    "sample": "a class-conditional grid from a run's EMA generator: RUN_DIR_OR_CHECKPOINT|--from G.sgt --out grid.png "
    "[--classes 1,3,5] [--truncation 0.5] [--per-class 8] [--interpolate] [--standing] [--seed 0]",
    "export": "the EMA generator as one compact sparse file (safetensors), for sample --from: RUN_DIR_OR_CHECKPOINT "
    "--out G.sgt [--force]",
    "bench": "efficiency figures, dense vs sparse, as JSON: "
    "[--suite all|step,masks,balance,topology,data,eval,export,grown] [--json out.json] [--tiny]",
    "report": "PNG plots of a run (losses, evaluation, sparsity, ADAPT's balance ratio, per-layer densities, "
    "throughput): RUN_DIR "
    "[--out DIR (default RUN_DIR/report)]",
    "study": "a grid of runs testing the paper's claims, and its report: --grid study.yaml [--workers N] "
    "[--shard K/N] [--bench digits,ring8,grid25] [--out DIR] [--report FILE] [--report-only]",
    "make-shards": "write webdataset shards: --source imagefolder:PATH|npz:PATH|cifar10:PATH[:test]|digits|mnist5k "
    "--out DIR --resolution R [--shard-size N] [--format jpg|png] [--workers N]",
}


def train(config: str | None = None, **overrides: Any) -> None:
    """Train from the defaults, a YAML delta (--config; a bare name resolves to the shipped configs/) and
    dotted overrides (--train.steps=200). Resumes from the run directory's latest checkpoint."""
    from sgtrain.config import load_config
    from sgtrain.train import train as run

    cfg = load_config(config or DEFAULT_CONFIG, overrides)
    run(cfg)


def print_config(config: str | None = None, **overrides: Any) -> None:
    """Print the resolved config (defaults + --config + overrides) as YAML."""
    from sgtrain.config import config_to_yaml, load_config

    print(config_to_yaml(load_config(config or DEFAULT_CONFIG, overrides)), end="")


def inspect(path: str, json: bool = False) -> None:
    """Print densities per network and layer, the exploration rate and the step of a checkpoint."""
    import json as json_module

    from sgtrain.inspection import format_report, inspect_checkpoint

    report = inspect_checkpoint(path)
    print(json_module.dumps(report) if json else format_report(report))


def flops(config: str | None = None, json: bool = False, **overrides: Any) -> None:
    """Per-network inference FLOPs and training FLOPs per iteration, dense and at the configured densities."""
    import json as json_module

    from sgtrain.config import load_config
    from sgtrain.flops import config_flops, format_config_flops

    report = config_flops(load_config(config or DEFAULT_CONFIG, overrides))
    print(json_module.dumps(report) if json else format_config_flops(report))


def make_shards(
    source: str,
    out: str,
    resolution: int,
    shard_size: int = 2000,
    format: str = "jpg",
    workers: int | None = None,
    quality: int = 95,
) -> None:
    """Centre-crop, resize (antialiased) and write ``source`` as tar shards with a class map and a manifest."""
    from sgtrain.data.shards import make_shards as write

    write(
        source, out, resolution=resolution, shard_size=shard_size, image_format=format, workers=workers, quality=quality
    )


def evaluate(
    run: str,
    *,  # options by flag only: a stray second path must not land in --metrics or --truncation
    metrics: Any = "fid,kid,is,pr,classes",
    num_samples: int = 10_000,
    truncation: float | None = None,
    extractor: str = "auto",
    inception: str | None = None,
    seed: int = 0,
    json: bool = False,
    standing: bool = False,
) -> None:
    """Metrics of the EMA generator of a run's latest checkpoint; `accelerate launch` shares the sampling out."""
    import json as json_module

    from sgtrain.dist import Dist
    from sgtrain.metrics.evaluate import evaluate_run, format_result

    chosen = metrics if isinstance(metrics, (list, tuple)) else str(metrics).split(",")
    dist = Dist()
    try:
        result = evaluate_run(
            run,
            metrics=[str(m).strip() for m in chosen if str(m).strip()],
            num_samples=num_samples,
            truncation=truncation,
            extractor_kind=extractor,
            inception=inception,
            seed=seed,
            comm=dist,
            device=dist.device,
            standing=standing,
        )
    except BaseException:
        dist.shutdown(clean=False)
        raise
    dist.shutdown()
    if dist.is_main:
        print(json_module.dumps(result) if json else format_result(result))


def sample(
    run: str,
    out: str,
    *,  # options by flag only, as evaluate's
    classes: Any = None,
    truncation: float | None = None,
    per_class: int = 8,
    interpolate: bool = False,
    standing: bool = False,
    seed: int = 0,
) -> None:
    """Class-conditional samples (or z interpolations) of a run's EMA generator, one row per class, as one PNG."""
    from sgtrain.sampling import sample_command

    sample_command(
        run,
        out,
        classes=classes,
        truncation=truncation,
        per_class=per_class,
        interpolate=interpolate,
        standing=standing,
        seed=seed,
    )


def export(run: str, out: str, force: bool = False) -> None:
    """Write the EMA generator of a run's latest checkpoint (or a checkpoint file) as a sparse-coded file."""
    from sgtrain.export import export_generator, format_summary

    print(format_summary(export_generator(str(run), str(out), force=force)))


def bench(suite: str = "all", json: str | None = None, tiny: bool = False) -> None:
    """Run the benchmark suites (each warms up, repeats, reports medians and dense-vs-sparse ratios)."""
    from sgtrain.benchmarks.suites import Settings, format_summary, run

    settings = Settings(suite=suite if isinstance(suite, str) else ",".join(suite), json=json, tiny=tiny)
    print(format_summary(run(settings)))


def report(run: str, out: str | None = None) -> None:
    """Plots of a run from its metrics.jsonl, latest checkpoint and config.yaml, one PNG per topic."""
    from sgtrain.report import format_summary, write_report

    print(format_summary(write_report(str(run), out if out is None else str(out))))


def study(
    grid: str = "study.yaml",
    workers: int = 1,
    shard: str | None = None,
    out: str | None = None,
    report: str | None = None,
    report_only: bool = False,
    bench: str | None = None,
) -> None:
    """Run a study grid's missing cells (resuming interrupted ones) over worker processes, then write its report."""
    from sgtrain.study import load_grid, run_study, write_study_report

    loaded = load_grid(str(grid), out, report)
    if report_only:
        print(f"sgtrain study: wrote {write_study_report(loaded)}")
        return
    command = f"python -m sgtrain study --grid {grid} --workers {workers}" + (f" --shard {shard}" if shard else "")
    command += (f" --out {out}" if out else "") + (f" --report {report}" if report else "")
    benches = None if bench is None else (str(bench).split(",") if isinstance(bench, str) else list(bench))
    command += f" --bench {','.join(benches)}" if benches else ""
    outcome = run_study(loaded, workers=int(workers), shard=shard, benches=benches, command=command)
    if "report" in outcome:
        print(f"sgtrain study: wrote {outcome['report']}")


def _usage() -> str:
    lines = ["usage: python -m sgtrain [COMMAND] [--config FILE] [--section.key=value ...]", "", "commands:"]
    lines += [f"  {name:<14}{text}" for name, text in COMMANDS.items()]
    lines += ["", "With no command, sgtrain trains. `python -m sgtrain COMMAND --help` shows a command's flags."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if not argv or argv[0].startswith("-"):
        argv = ["train", *argv]
    if argv[0] == "sample":  # `sample --from G.sgt`: `from` is a Python keyword, so it names the run argument
        argv = [a.replace("--from", "--run", 1) if a == "--from" or a.startswith("--from=") else a for a in argv]
    if argv[0] not in COMMANDS:
        print(f"sgtrain: error: unknown command {argv[0]!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    if any(arg in ("-h", "--help") for arg in argv[1:]):
        print(f"usage: python -m sgtrain {argv[0]}: {COMMANDS[argv[0]]}")
        if argv[0] in ("train", "print-config", "flops"):
            print("Keys and defaults: python -m sgtrain print-config")
        return 0

    import fire

    from sgtrain.study import StudyFailed

    commands = {"train": train, "print-config": print_config, "inspect": inspect, "flops": flops}
    commands["make-shards"] = make_shards
    commands["sample"] = sample
    commands["evaluate"] = evaluate
    commands["report"] = report
    commands["export"] = export
    commands["bench"] = bench
    commands["study"] = study
    stray = _stray_arguments(commands[argv[0]], argv[1:])
    if stray:
        # fire would call the command first and complain about the leftover afterwards, once the work is done.
        print(
            f"sgtrain: error: {argv[0]}: unexpected argument {stray!r}: options go by flag ({COMMANDS[argv[0]]})",
            file=sys.stderr,
        )
        return 2
    try:
        return run_guarded(lambda: fire.Fire(commands, command=argv, name="sgtrain"))
    except StudyFailed as error:
        print(f"sgtrain: error: {error}", file=sys.stderr)
        return 1
    except fire.core.FireExit as exit_:
        return int(exit_.code or 0)


def _stray_arguments(command: Callable[..., Any], args: list[str]) -> str | None:
    """The first bare argument beyond ``command``'s positional parameters, for commands whose options are
    keyword-only (evaluate, sample); None where there is none or the command takes no keyword-only options."""
    import inspect as signatures

    parameters = signatures.signature(command).parameters.values()
    kinds = signatures.Parameter
    if not any(p.kind is kinds.KEYWORD_ONLY for p in parameters):
        return None
    options = {p.name: p for p in parameters}
    free = [p.name for p in parameters if p.kind is kinds.POSITIONAL_OR_KEYWORD]
    bare, i = [], 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--"):
            name = arg[2:].split("=", 1)[0].replace("-", "_")
            if name in free:
                free.remove(name)  # a positional parameter given by flag (sample --from)
            parameter = options.get(name)
            takes_value = "=" not in arg and not (parameter is not None and parameter.annotation in (bool, "bool"))
            i += 2 if takes_value else 1
        else:
            bare.append(arg)
            i += 1
    return bare[len(free)] if len(bare) > len(free) else None


def run_guarded(command: Callable[[], Any]) -> int:
    """Run ``command`` and map sgtrain's errors to one line on stderr and the exit code (``sgtrain.stopping``).

    For programs that embed sgtrain, e.g. ``run_guarded(lambda: train(train_config(argv), hooks=...))``."""
    from sgtrain.checkpoint import CheckpointError
    from sgtrain.config import ConfigError
    from sgtrain.data.stream import DataError
    from sgtrain.dist import LaunchError
    from sgtrain.sparse.sync import MaskDivergenceError
    from sgtrain.stopping import (
        EXIT_BAD_INPUT,
        EXIT_DIVERGED,
        EXIT_NONFINITE,
        EXIT_STOPPED,
        NonFiniteError,
        StoppedEarly,
    )

    try:
        command()
    except (ConfigError, CheckpointError, LaunchError, DataError) as error:
        print(f"sgtrain: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except MaskDivergenceError as error:
        print(f"sgtrain: error: {error}", file=sys.stderr)
        return EXIT_DIVERGED
    except NonFiniteError as error:
        print(f"sgtrain: error: {error}", file=sys.stderr)
        return EXIT_NONFINITE
    except StoppedEarly as stopped:
        if os.environ.get("RANK", "0") == "0":
            print(f"sgtrain: {stopped}", file=sys.stderr, flush=True)
        return EXIT_STOPPED
    return 0


def train_config(argv: list[str]) -> Config:
    """The config that ``python -m sgtrain [--config FILE] [--section.key=value ...]`` trains (values as a shell
    gives them: the config coerces them)."""
    from sgtrain.config import ConfigError, load_config

    config, overrides, rest = None, {}, list(argv)
    while rest:
        arg = rest.pop(0)
        if arg == "--config" and rest:
            config = rest.pop(0)
        elif arg.startswith("--config="):
            config = arg.partition("=")[2]
        elif arg.startswith("--") and "=" in arg:
            key, _, value = arg[2:].partition("=")
            overrides[key] = value
        else:
            raise ConfigError(f"expected --config FILE or --section.key=value, got {arg!r}")
    return load_config(config or DEFAULT_CONFIG, overrides)


if __name__ == "__main__":
    sys.exit(main())
