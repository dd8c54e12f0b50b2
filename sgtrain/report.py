"""`sgtrain report`: PNG plots of a run from its own records (metrics.jsonl, the latest checkpoint, config.yaml).

Usage::

    python -m sgtrain report runs/cifar10               # -> runs/cifar10/report/{losses,eval,sparsity,...}.png
    python -m sgtrain report runs/cifar10 --out /tmp/look

Plots are drawn on bare :class:`matplotlib.figure.Figure` objects (Agg through ``savefig``), never through pyplot, so
no global backend or figure state changes in the process that calls this.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from sgtrain.checkpoint import CheckpointError
from sgtrain.config import ConfigError
from sgtrain.sparse.balance import EXPLORE, GROW, HOLD, SHRINK
from sgtrain.sparse.methods import DECISION_CODES

DPI = 110
NETWORKS = ("G", "D")
STEPS = "step (G updates)"  # the x label of every plot over steps
COLORS = {"G": "tab:blue", "D": "tab:orange"}
TRAIN_KEYS = ("images_seen", "g_loss")  # a record carrying either is a training record (train.py's maintenance)
# Known evaluation metrics, in plotting order: (keys on one panel, title, y label). Others under eval/ get a panel each.
EVAL_PANELS = (
    (("eval/fid",), "FID (lower is better)", "FID"),
    (("eval/kid",), "KID (lower is better)", "KID"),
    (("eval/is",), "IS (higher is better)", "IS"),
    (("eval/precision", "eval/recall"), "precision and recall (higher is better)", "fraction"),
    (("eval/classes_covered",), "classes covered (higher is better)", "classes"),
)
# ADAPT's decisions on D's density as balance.png marks them: (marker, colour, legend label), in legend order.
DECISION_STYLES = {
    GROW: ("^", "tab:green", "grow D (ratio at or above upper)"),
    SHRINK: ("v", "tab:red", "shrink D (ratio at or below lower)"),
    EXPLORE: ("*", "tab:purple", "explore D at its cap"),
    HOLD: ("o", "tab:gray", "hold D"),
}
_FLOPS_UNITS = ("FLOPs", "kFLOPs", "MFLOPs", "GFLOPs", "TFLOPs", "PFLOPs", "EFLOPs", "ZFLOPs")


def load_records(run_dir: str | Path) -> dict[str, list[dict[str, Any]]]:
    """``{"train": [...], "eval": [...]}``: a run's metrics.jsonl records in step order, one per (step, kind).

    A step logged twice (a resumed run that rewrote its tail) keeps the record written last. Records of neither kind
    are left out; unknown keys are kept as they are. Raises :class:`ConfigError` on a missing run directory or metrics
    file, a line that is not a JSON object with an integer ``step``, or a file without training records.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: no such run directory")
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError(f"{path}: no metrics file (`sgtrain train` writes one into every run directory)")
    latest: dict[tuple[str, int], dict[str, Any]] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path}:{number}: not a JSON record ({error.msg})") from None
        step = record.get("step") if isinstance(record, dict) else None
        if not isinstance(step, int) or isinstance(step, bool):
            raise ConfigError(f"{path}:{number}: a record must be a JSON object with an integer 'step'")
        if any(key.startswith("eval/") for key in record):
            latest[("eval", step)] = record
        elif any(key in record for key in TRAIN_KEYS):
            latest[("train", step)] = record
    records: dict[str, list[dict[str, Any]]] = {"train": [], "eval": []}
    for (kind, _), record in sorted(latest.items(), key=lambda item: item[0][1]):
        records[kind].append(record)
    if not records["train"]:
        raise ConfigError(f"{path}: no training records (an empty file, or a run stopped before its first log)")
    return records


def series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """Steps and values of the records that carry a number under ``key``."""
    steps, values = [], []
    for record in records:
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            steps.append(record["step"])
            values.append(float(value))
    return steps, values


def flops_at(steps: list[int], train: list[dict[str, Any]]) -> list[float] | None:
    """Cumulative training FLOPs at ``steps``: the training record's ``train_flops`` at a logged step, linear between
    logged steps (from 0 FLOPs at step 0), extended at the last interval's rate past the last one. None without
    ``train_flops`` in the records."""
    known_steps, known = series(train, "train_flops")
    if not known_steps:
        return None
    if known_steps[0] > 0:
        known_steps, known = [0, *known_steps], [0.0, *known]
    result = np.interp(steps, known_steps, known)
    if len(known_steps) >= 2:
        rate = (known[-1] - known[-2]) / (known_steps[-1] - known_steps[-2])
        for i, step in enumerate(steps):
            if step > known_steps[-1]:
                result[i] = known[-1] + rate * (step - known_steps[-1])
    return [float(x) for x in result]


def flops_unit(peak: float) -> tuple[float, str]:
    """``(divisor, name)`` of the largest FLOPs unit that keeps ``peak`` at 1 or more: 3.4e9 -> (1e9, "GFLOPs")."""
    power = 0
    while peak >= 1000 ** (power + 1) and power < len(_FLOPS_UNITS) - 1:
        power += 1
    return 1000.0**power, _FLOPS_UNITS[power]


def write_report(run_dir: str | Path, out: str | Path | None = None) -> dict[str, Path | str]:
    """Write the plots of a run into ``out`` (default ``run_dir/report``): ``{file name: path written, or why it was
    skipped}``. Bad input raises :class:`ConfigError` before anything is written."""
    run_dir = Path(run_dir)
    records = load_records(run_dir)
    config = _read_config(run_dir)
    out = Path(out) if out is not None else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    title = f"{run_dir.resolve().name}, step {records['train'][-1]['step']}"
    figures = {
        "losses.png": _losses(records["train"], title),
        "eval.png": _eval(records, config, title),
        "sparsity.png": _sparsity(records["train"], config, title),
        "balance.png": _balance(records["train"], config, title),
        "layers.png": _layers(run_dir),
        "throughput.png": _throughput(records["train"], title),
    }
    results: dict[str, Path | str] = {}
    for name, figure in figures.items():
        if isinstance(figure, str):  # skipped, and why
            results[name] = figure
            continue
        figure.savefig(out / name, dpi=DPI)
        results[name] = out / name
    return results


def format_summary(results: dict[str, Path | str]) -> str:
    """One line per plot: the path written, or the file skipped and why."""
    return "\n".join(
        f"sgtrain: wrote {value}" if isinstance(value, Path) else f"sgtrain: skipped {name}: {value}"
        for name, value in results.items()
    )


def _read_config(run_dir: Path) -> dict[str, Any]:
    # The plots need only the metrics; the config adds targets and reasons. An old or hand-edited one is not an error.
    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return config if isinstance(config, dict) else {}


def _setting(config: dict[str, Any], section: str, key: str) -> Any:
    part = config.get(section)
    return part.get(key) if isinstance(part, dict) else None


def _figure(rows: int, cols: int, height: float = 4.2, width: float = 12.0) -> tuple[Figure, np.ndarray]:
    figure = Figure(figsize=(width, height * rows), dpi=DPI, layout="constrained")
    return figure, figure.subplots(rows, cols, squeeze=False)


def _line(ax: Axes, steps: list[float], values: list[float], label: str, **style: Any) -> None:
    """A curve; long noisy ones are drawn faintly with a bold trailing mean (window 2% of the points) on top."""
    if len(values) <= 100:
        ax.plot(steps, values, label=label, marker="o" if len(values) <= 30 else None, markersize=3, **style)
        return
    window = max(2, len(values) // 50)
    ax.plot(steps, values, alpha=0.25, linewidth=0.8, **style)
    mean = np.convolve(values, np.ones(window) / window, mode="valid")
    ax.plot(steps[window - 1 :], mean, label=f"{label} (mean of {window})", linewidth=1.6, **style)


def _finish(ax: Axes, title: str, xlabel: str, ylabel: str, **legend: Any) -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if xlabel == STEPS:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small", **legend)


def _losses(train: list[dict[str, Any]], title: str) -> Figure:
    figure, axes = _figure(1, 2)
    d_ax, g_ax = axes[0]
    steps, real = series(train, "d_loss_real")
    _, fake = series(train, "d_loss_fake")
    _line(d_ax, steps, real, "on real", color="tab:green")
    _line(d_ax, steps, fake, "on fake", color="tab:red")
    if len(real) == len(fake):
        _line(d_ax, steps, [r + f for r, f in zip(real, fake, strict=True)], "real + fake", color="black")
    _finish(d_ax, "discriminator loss (hinge)", STEPS, "loss per D step")
    _line(g_ax, *series(train, "g_loss"), "G", color=COLORS["G"])
    _finish(g_ax, "generator loss (hinge)", STEPS, "loss")
    figure.suptitle(f"losses: {title}")
    return figure


def _eval(records: dict[str, list[dict[str, Any]]], config: dict[str, Any], title: str) -> Figure | str:
    evals = records["eval"]
    if not evals:
        every = _setting(config, "train", "eval_every")
        if every is None:
            return "no evaluation records"
        if every == 0:
            return "no evaluation records (train.eval_every = 0)"
        return (
            f"no evaluation records yet (train.eval_every = {every}, last logged step {records['train'][-1]['step']})"
        )
    present = {key for record in evals for key in record if key.startswith("eval/")}
    panels = [panel for panel in EVAL_PANELS if present & set(panel[0])]
    known = {key for panel in EVAL_PANELS for key in panel[0]}
    panels += [((key,), key.removeprefix("eval/"), key.removeprefix("eval/")) for key in sorted(present - known)]
    # One FLOPs unit for every panel, chosen from the run's total so far; no FLOPs column without train_flops.
    peak = max(series(records["train"], "train_flops")[1], default=None)
    divisor, unit = flops_unit(peak or 0.0)
    figure, axes = _figure(len(panels), 1 if peak is None else 2, height=3.4)
    for row, (keys, panel_title, ylabel) in enumerate(panels):
        for key in keys:
            steps, values = series(evals, key)
            if not steps:
                continue
            label = key.removeprefix("eval/") if len(keys) > 1 else None
            axes[row][0].plot(steps, values, marker="o", markersize=3, label=label)
            if peak is not None:
                flops = [f / divisor for f in flops_at(steps, records["train"])]
                axes[row][1].plot(flops, values, marker="o", markersize=3, label=label)
        for ax in axes[row]:
            if ylabel == "fraction":
                ax.set_ylim(-0.03, 1.03)
            elif ylabel == "classes":
                ax.yaxis.set_major_locator(MaxNLocator(integer=True))
                ax.set_ylim(0, (_setting(config, "model", "n_classes") or ax.get_ylim()[1]) + 0.5)
        _finish(axes[row][0], f"{panel_title}, over steps", STEPS, ylabel)
        if peak is not None:
            xlabel = f"training compute so far ({unit})"
            _finish(axes[row][1], f"{panel_title}, over training compute", xlabel, ylabel)
    figure.suptitle(f"evaluation of the EMA generator: {title}")
    return figure


def _sparsity(train: list[dict[str, Any]], config: dict[str, Any], title: str) -> Figure | str:
    if not any(key.startswith("sparse/") for record in train for key in record):
        method = _setting(config, "sparse", "method")
        return f"no topology updates logged (sparse.method = {method})"
    figure, axes = _figure(1, 2, height=4.5)
    density_ax, change_ax = axes[0]
    for net in NETWORKS:
        color = COLORS[net]
        steps, values = series(train, f"sparse/{net}_density")
        if steps:
            # G broader than D: at equal targets the two lines coincide and both should stay visible.
            width = 3.0 if net == "G" else 1.5
            density_ax.plot(
                steps, values, color=color, linewidth=width, marker="o", markersize=3, label=f"{net} density"
            )
        steps, values = series(train, f"sparse/{net}_itop_rate")
        if steps:
            label = f"{net} exploration (ITOP) rate: ever active"
            density_ax.plot(steps, values, color=color, linestyle="--", marker="^", markersize=4, label=label)
        target = _setting(config, "sparse", f"density_{net.lower()}")
        if isinstance(target, (int, float)):
            density_ax.axhline(target, color=color, linestyle=":", linewidth=1, label=f"{net} target {target:g}")
        steps, values = series(train, f"sparse/{net}_mask_change")
        if steps:
            change_ax.plot(steps, values, color=color, marker="o", markersize=3, label=f"{net} mask change")
    steps, values = series(train, "sparse/drop_fraction")
    if steps:  # broad and pale: with drop-and-grow the mask change lies on it
        change_ax.plot(steps, values, color="gray", linewidth=5, alpha=0.35, label="scheduled drop fraction", zorder=1)
    _finish(density_ax, "density and exploration", STEPS, "fraction of weights")
    _finish(change_ax, "topology updates: weights swapped (or pruned)", STEPS, "fraction of active weights")
    figure.suptitle(f"sparsity: {title}")
    return figure


def _balance(train: list[dict[str, Any]], config: dict[str, Any], title: str) -> Figure | str:
    """ADAPT: the balance ratio against its bounds, and the densities it steers. A decision is marked at the record
    that carries it, the first logged step at or after the decision (one per interval: the latest)."""
    adapt = _setting(config, "sparse", "adapt")
    adapt = adapt if isinstance(adapt, dict) else {}
    if not any("adapt/balance_ratio" in record for record in train):
        method = _setting(config, "sparse", "method")
        if method != "adapt":
            return f"no balance ratio logged (sparse.method = {method}; ADAPT logs one)"
        return (
            f"no balance ratio logged yet (sparse.adapt.sample_every = {adapt.get('sample_every')}, "
            f"last logged step {train[-1]['step']})"
        )
    names = {code: name for name, code in DECISION_CODES.items()}
    decided = [r for r in train if names.get(r.get("adapt/decision")) and "adapt/decided_ratio" in r]
    figure, axes = _figure(1, 2, height=4.5)
    ratio_ax, density_ax = axes[0]
    steps, lower = series(train, "adapt/lower")
    _, upper = series(train, "adapt/upper")
    if steps and len(lower) == len(upper):
        fixed = len({*lower}) == len({*upper}) == 1
        band = f"bounds [{lower[-1]:g}, {upper[-1]:g}]: D holds between" if fixed else "bounds: D holds between"
        ratio_ax.fill_between(steps, lower, upper, step="post", color="tab:green", alpha=0.15, label=band)
        for values in (lower, upper):
            ratio_ax.plot(steps, values, color="tab:green", linewidth=1, drawstyle="steps-post")
    _line(ratio_ax, *series(train, "adapt/balance_ratio"), "window-mean balance ratio", color="black")
    for net in NETWORKS:
        steps, values = series(train, f"sparse/{net}_density")
        width = 3.0 if net == "G" else 1.5  # G broader than D: where the two lines meet both stay visible
        style = {"color": COLORS[net], "linewidth": width, "drawstyle": "steps-post"}
        density_ax.plot(steps, values, label=f"{net} density", **style)
    for decision, (marker, color, label) in DECISION_STYLES.items():
        marked = [r for r in decided if names[r["adapt/decision"]] == decision]
        if not marked:
            continue
        steps = [r["step"] for r in marked]
        style = {"marker": marker, "s": 90 if marker == "*" else 50, "color": color, "edgecolors": "black", "zorder": 3}
        label = f"{label}: {len(marked)}"
        ratio_ax.scatter(steps, [r["adapt/decided_ratio"] for r in marked], label=label, **style)
        density_ax.scatter(steps, [r.get("sparse/D_density", r.get("adapt/D_density")) for r in marked], **style)
    floor, cap, variant = adapt.get("minimum"), adapt.get("cap"), adapt.get("variant")
    if isinstance(floor, (int, float)):
        density_ax.axhline(floor, color="tab:gray", linestyle=":", linewidth=1, label=f"D floor {floor:g}")
    if variant == "strict" and isinstance(cap, (int, float)):  # relax lets D grow to dense
        density_ax.axhline(cap, color="tab:gray", linestyle="--", linewidth=1, label=f"D cap {cap:g} (strict)")
    density_ax.set_ylim(bottom=0)
    below = {"loc": "upper center", "bbox_to_anchor": (0.5, -0.14), "ncol": 2}  # off the curves
    _finish(ratio_ax, "balance ratio; decided ratio at D's decisions", STEPS, "balance ratio", **below)
    _finish(density_ax, "densities; markers: D's decisions", STEPS, "fraction of weights", **below)
    figure.suptitle(f"ADAPT ({variant}): {title}" if variant else f"ADAPT: {title}")
    return figure


def _layers(run_dir: Path) -> Figure | str:
    from sgtrain.inspection import inspect_checkpoint

    try:
        report = inspect_checkpoint(run_dir)
    except (CheckpointError, ConfigError) as error:
        return str(error)
    networks = report["networks"]
    count = max(len(info["layers"]) for info in networks.values())
    figure, axes = _figure(1, len(networks), height=max(4.0, 0.28 * count + 1.5))
    for ax, (net, info) in zip(axes[0], networks.items(), strict=True):
        names = [layer["name"] for layer in info["layers"]]
        densities = [layer["density"] for layer in info["layers"]]
        rows = np.arange(len(names))
        ax.barh(rows, densities, color=COLORS.get(net, "tab:gray"), alpha=0.8)
        for row, density in zip(rows, densities, strict=True):  # a column right of the bars: no line crosses it
            ax.text(1.02, row, f"{density:.2f}", va="center", fontsize="x-small")
        ax.axvline(info["density"], color="black", label=f"{net} overall {info['density']:.3f}")
        ax.axvline(info["target_density"], color="black", linestyle=":", label=f"target {info['target_density']:g}")
        ax.set_yticks(rows, names, fontsize="small")
        ax.invert_yaxis()  # the first layer on top, as `sgtrain inspect` lists them
        ax.set_xlim(0, 1.1)
        below = {"loc": "upper center", "bbox_to_anchor": (0.5, -0.16), "ncol": 2}
        _finish(ax, f"{net}: density per layer", "density (fraction of weights active)", "", **below)
    figure.suptitle(f"masks at step {report['step']} ({report['method']}): {Path(report['checkpoint']).name}")
    return figure


def _throughput(train: list[dict[str, Any]], title: str) -> Figure:
    figure, axes = _figure(1, 1, width=10.0)
    ax = axes[0][0]
    steps, values = series(train, "images_per_s")
    sizes = sorted({int(r["world_size"]) for r in train if isinstance(r.get("world_size"), int)})
    ranks = f" on {', '.join(map(str, sizes))} rank{'s' if sizes != [1] else ''}" if sizes else ""
    _line(ax, steps, values, f"real images / s{ranks}", color="tab:purple")
    if values and all(math.isfinite(v) for v in values):
        ax.set_ylim(bottom=0)
    _finish(ax, "real images per second, all ranks together", STEPS, "images / s")
    figure.suptitle(f"throughput: {title}")
    return figure
