"""The paper's claims at the study's scale, each judged from the numbers by one function.

A claim function takes the grid and its aggregated rows and returns the claim's ``(claim, verdict, evidence)``, or
None where the grid has no cells to test it; :func:`claims` asks each in the order the report lists them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from sgtrain.study.grid import Grid
from sgtrain.study.stats import Comparison, Rows, Stat, compare

Verdict = tuple[str, str, str]  # (claim, verdict, evidence)
Settings = dict[tuple[float, float], tuple[str, dict[str, Any]]]  # (G density, D density) -> (method, its stats)


def _by_method(grid: Grid, rows: Rows, bench: str, kind: str) -> Settings:
    """(G density, D density) -> (method name, stats) of the grid's method of sparse.method ``kind``: the first one
    the grid lists, when it has variants (e.g. stu with explore G and with GD)."""
    names = [m for m, s in grid.methods.items() if s["method"] == kind][:1]
    return {(k[2], k[3]): (k[1], v) for k, v in rows.items() if k[0] == bench and k[1] in names}


def _tally(stu: Settings, other: Settings, name: str, own: str = "STU-GAN") -> tuple[str, str]:
    """(verdict, evidence) of ``own``'s (STU-GAN's) FD against another method's over the settings both have."""
    shared = sorted(set(stu) & set(other))
    if not shared:
        return "not tested", f"the grid has no {name} cells at {own}'s densities"
    outcomes = [compare(stu[k][1]["fid"], other[k][1]["fid"], lower_is_better=True) for k in shared]
    better = sum(o.gain > 0 for o in outcomes)
    clear = sum(o.verdict == "better" for o in outcomes)
    worse = sum(o.verdict == "worse" for o in outcomes)
    detail = "; ".join(
        f"G {g:g}/D {d:g}: {stu[(g, d)][1]['fid'].mean:.0f} vs {other[(g, d)][1]['fid'].mean:.0f}" for g, d in shared
    )
    evidence = (
        f"{own}'s mean FD is lower than {name}'s in {better} of {len(shared)} settings ({clear} by more than "
        f"two standard errors; {worse} worse by more than two). FD, {own} vs {name}: {detail}."
    )
    if better * 2 > len(shared) and worse == 0:
        # Better on average, but where no single setting clears the noise the evidence is weak: say so.
        return ("held" if clear else "held on average, within seed noise"), evidence
    if better * 2 > len(shared):
        return "partly held", evidence
    if min(o.seeds for o in outcomes) < 2:
        return "inconclusive (one seed)", evidence
    if worse == 0:  # not better on average, but no setting is worse beyond the noise either
        return "did not hold on average, within seed noise", evidence
    return "did not hold", evidence


def sparse_matches_dense(grid: Grid, rows: Rows) -> Verdict | None:
    """A sparse G with a sparse D, trained sparse from scratch, matches or beats dense training."""
    stu = _by_method(grid, rows, grid.image_bench, "stu")
    dense = next(iter(_by_method(grid, rows, grid.image_bench, "dense").values()), None)
    if dense is None or not stu:
        return None
    d_stats = dense[1]["fid"]
    # The paper's setting (80%-sparse G, 70%-sparse D) where the grid has it.
    target = (0.2, 0.3) if (0.2, 0.3) in stu else min(stu)
    outcome = compare(stu[target][1]["fid"], d_stats, lower_is_better=True)
    # The verdict is taken on log FD, a ratio of geometric means: FD spreads multiplicatively over seeds, and one
    # collapsed seed (FD 2,000 beside 200s) widens the standard error of an arithmetic mean until no difference
    # clears it, while on the log scale it counts as one seed among the others.
    ratio = _log_comparison(stu[target][1], dense[1])
    best = min(stu, key=lambda k: stu[k][1]["fid"].mean)
    decided = ratio if ratio is not None else outcome
    verdict = {
        "better": "held (beat dense)",
        "within noise": (
            "held (matched dense within seed noise)"
            if decided.gain >= 0
            else "inconclusive (worse on average, within seed noise)"
        ),
        "no spread": "inconclusive (one seed)",
    }.get(decided.verdict, "did not hold")
    # The margin a reader can rely on: the difference of the means with two standard errors either side.
    margin = (
        f" The difference of means (dense minus STU-GAN) is {outcome.gain:+.0f} ± {2 * outcome.se:.0f} (two "
        f"standard errors, {outcome.seeds} seeds each at least): dense's FD minus STU-GAN's lies in "
        f"[{outcome.gain - 2 * outcome.se:+.0f}, {outcome.gain + 2 * outcome.se:+.0f}] (positive: STU-GAN lower)."
        if outcome.seeds > 1
        else ""
    )
    if ratio is not None and ratio.seeds > 1:
        # gain = mean log FD of dense minus STU-GAN's, so STU-GAN's FD is exp(-gain) times dense's.
        low, high = math.exp(-ratio.gain - 2 * ratio.se), math.exp(-ratio.gain + 2 * ratio.se)
        margin += (
            f" On the log scale (the verdict's): STU-GAN's geometric-mean FD is {math.exp(-ratio.gain):.2f}x "
            f"dense's, between {low:.2f}x and {high:.2f}x at two standard errors."
        )
    by_seed = stu[target][1].get("by_seed", {}).get("fid"), dense[1].get("by_seed", {}).get("fid")
    if all(by_seed):
        worse = sum(s > d for s in by_seed[0] for d in by_seed[1])
        pairs = len(by_seed[0]) * len(by_seed[1])
        margin += f" STU-GAN's FD is higher in {worse} of the {pairs} pairs of a STU-GAN seed and a dense seed."
    recall = (
        f" Recall {stu[target][1]['recall'].text(2)} vs {dense[1]['recall'].text(2)}, precision "
        f"{stu[target][1]['precision'].text(2)} vs {dense[1]['precision'].text(2)}."
        if "recall" in stu[target][1] and "recall" in dense[1]
        else ""
    )
    return (
        f"A sparse G (density {target[0]:g}) with a sparse D (density {target[1]:g}), trained sparse "
        "from scratch, matches or beats dense BigGAN (the paper: 80%-sparse G, 70%-sparse D).",
        verdict,
        f"FD {stu[target][1]['fid'].fixed(0)} (STU-GAN, G {target[0]:g}/D {target[1]:g}) vs "
        f"{d_stats.fixed(0)} (dense).{margin}{recall} STU-GAN's best setting, G {best[0]:g}/D {best[1]:g}, reaches "
        f"{stu[best][1]['fid'].fixed(0)}. Sparse training costs "
        f"{stu[target][1]['train_flops_vs_dense'].mean:.2f} of dense training's FLOPs there.",
    )


def _log_comparison(a: dict[str, Any], b: dict[str, Any]) -> Comparison | None:
    """Row ``a`` against row ``b`` on log FD (gain positive: ``a`` lower), or None where a row lacks its seeds'
    values or an FD is not positive."""
    values = a.get("by_seed", {}).get("fid"), b.get("by_seed", {}).get("fid")
    if not all(values) or min(min(v) for v in values) <= 0:
        return None
    return compare(*(Stat.of([math.log(x) for x in v]) for v in values), lower_is_better=True)


def _stu_against(grid: Grid, rows: Rows, kind: str, name: str, claim: str) -> Verdict | None:
    """``claim``, judged by STU-GAN's FD against the method of sparse.method ``kind`` (called ``name``)."""
    stu = _by_method(grid, rows, grid.image_bench, "stu")
    other = _by_method(grid, rows, grid.image_bench, kind)
    if not other or not stu:
        return None
    return (claim, *_tally(stu, other, name))


def exploration_beats_static(grid: Grid, rows: Rows) -> Verdict | None:
    """STU-GAN's dynamic exploration of G beats static sparse training at the same densities."""
    claim = "Dynamic exploration of G (STU-GAN) beats static sparse training at the same budget."
    return _stu_against(grid, rows, "static", "static sparse", claim)


def exploration_matters_when_sparse(grid: Grid, rows: Rows) -> Verdict | None:
    """STU-GAN's FD gain over static sparse training is larger at the sparsest G than at the densest."""
    stu = _by_method(grid, rows, grid.image_bench, "stu")
    static = _by_method(grid, rows, grid.image_bench, "static")
    if not static or not stu:
        return None
    gains, variances = {}, {}  # mean FD gain over the D densities at each G density, and its variance
    for g in sorted({k[0] for k in stu} & {k[0] for k in static}):
        pairs = [k for k in stu if k[0] == g and k in static]
        gains[g] = sum(static[k][1]["fid"].mean - stu[k][1]["fid"].mean for k in pairs) / len(pairs)
        variances[g] = (
            sum(compare(stu[k][1]["fid"], static[k][1]["fid"], lower_is_better=True).se ** 2 for k in pairs)
            / len(pairs) ** 2
        )
    if len(gains) < 2:
        return None
    low, high = min(gains), max(gains)
    gap = Comparison(gains[low] - gains[high], math.sqrt(variances[low] + variances[high]), len(grid.seeds))
    if gains[low] <= 0 or gap.verdict == "worse":
        verdict = "did not hold"
    elif gap.verdict == "better":
        verdict = "held"
    else:
        verdict = "held on average, within seed noise" if gap.gain > 0 else "did not hold on average"
    by_density = ", ".join(f"{g:g}: {v:+.0f} ± {2 * math.sqrt(variances[g]):.0f}" for g, v in sorted(gains.items()))
    return (
        "Exploration matters most when the generator is very sparse.",
        verdict,
        "Mean FD gain of STU-GAN over static (averaged over D densities) by G density, ± two standard errors: "
        f"{by_density}. The gain at G {low:g} exceeds the gain at G {high:g} by {gap.gain:+.0f} ± {2 * gap.se:.0f}.",
    )


def _matches_pruning(grid: Grid, rows: Rows, kind: str, name: str) -> Verdict | None:
    """STU-GAN, sparse throughout one run, matches or beats the pruning method ``kind`` at the same density."""
    claim = f"Sparse-to-sparse training in one run matches or beats {name} at the same final density."
    return _stu_against(grid, rows, kind, name.split(" (")[0], claim)


def matches_gmp(grid: Grid, rows: Rows) -> Verdict | None:
    """STU-GAN matches or beats gradual magnitude pruning from dense."""
    return _matches_pruning(grid, rows, "gmp", "GMP (gradual magnitude pruning from dense)")


def matches_snip(grid: Grid, rows: Rows) -> Verdict | None:
    """STU-GAN matches or beats SNIP (pruning at initialisation)."""
    return _matches_pruning(grid, rows, "snip", "SNIP")


def matches_prune_finetune(grid: Grid, rows: Rows) -> Verdict | None:
    """STU-GAN matches or beats pruning a trained dense model and fine-tuning it (the paper's pruning baseline)."""
    claim = (
        "One sparse run (STU-GAN) matches or beats pruning a trained dense BigGAN and fine-tuning it, at the same "
        "final density and a fraction of its training cost."
    )
    return _stu_against(grid, rows, "prune_finetune", "prune-and-finetune", claim)


def adapt_matches_stu(grid: Grid, rows: Rows) -> Verdict | None:
    """ADAPT, which steers D's density by the balance ratio, matches or beats STU-GAN's fixed D density at the same
    G density (ADAPT's claim: a balanced D, not a fixed one, gives the better sparse GAN)."""
    adapt = _by_method(grid, rows, grid.image_bench, "adapt")
    stu = _by_method(grid, rows, grid.image_bench, "stu")
    if not adapt or not stu:
        return None
    verdict, evidence = _tally(adapt, stu, "STU-GAN (D fixed)", own="ADAPT")
    reached = [
        f"G {g:g}/D {d:g}: {v[1]['reached_density_d'].fixed()}"
        for (g, d), v in sorted(adapt.items())
        if "reached_density_d" in v[1]
    ]
    if reached:
        evidence += f" ADAPT's D ended at density {'; '.join(reached)} (started at the nominal one)."
    return (
        "Steering D's density by the balance ratio (ADAPT) matches or beats a fixed D density (STU-GAN).",
        verdict,
        evidence,
    )


def sparse_start_is_cheaper(grid: Grid, rows: Rows) -> Verdict | None:
    """STU-GAN spends fewer training FLOPs than GMP, which starts dense, at every shared density."""
    stu = _by_method(grid, rows, grid.image_bench, "stu")
    gmp = _by_method(grid, rows, grid.image_bench, "gmp")
    if not gmp or not stu:
        return None
    shared = sorted(set(stu) & set(gmp))
    ratios = [gmp[k][1]["train_flops_vs_dense"].mean / stu[k][1]["train_flops_vs_dense"].mean for k in shared]
    costs = ", ".join(f"{stu[k][1]['train_flops_vs_dense'].mean:.2f}" for k in shared)
    densities = ", ".join(f"{g:g}/{d:g}" for g, d in shared)
    return (
        "Training sparse from scratch is cheaper than starting from a dense network.",
        "held" if all(r > 1 for r in ratios) else "did not hold",
        f"GMP, which starts dense and prunes, spends {min(ratios):.1f}x to {max(ratios):.1f}x STU-GAN's "
        f"training FLOPs at the same final densities (STU-GAN: {costs} of dense, for G/D {densities}).",
    )


def covers_modes(grid: Grid, rows: Rows, bench: str) -> Verdict | None:
    """On a Gaussians benchmark, a sparse G with exploration covers at least as many modes as a static one."""
    stu = _by_method(grid, rows, bench, "stu")
    static = _by_method(grid, rows, bench, "static")
    dense = next(iter(_by_method(grid, rows, bench, "dense").values()), None)
    shared = sorted(set(stu) & set(static))
    if not shared:
        return None
    outcomes = [
        compare(stu[k][1]["modes_covered"], static[k][1]["modes_covered"], lower_is_better=False) for k in shared
    ]
    if any(o.verdict == "worse" for o in outcomes):
        verdict = "did not hold"
    elif all(o.gain >= 0 for o in outcomes):
        verdict = "held" if any(o.verdict == "better" for o in outcomes) else "held on average, within seed noise"
    else:
        verdict = "inconclusive (fewer modes on average, within seed noise)"
    parts = "; ".join(
        f"G {k[0]:g}/D {k[1]:g}: {stu[k][1]['modes_covered'].text()} vs {static[k][1]['modes_covered'].text()}"
        for k in shared
    )
    dense_text = f"; dense covers {dense[1]['modes_covered'].text()}" if dense else ""
    return (
        f"{bench}: a sparse generator with exploration covers at least as many modes as a static one.",
        verdict,
        f"Modes covered, STU-GAN vs static: {parts}{dense_text}.",
    )


# The digits claims, in the order the report lists them.
DIGITS_CLAIMS: tuple[Callable[[Grid, Rows], Verdict | None], ...] = (
    sparse_matches_dense,
    exploration_beats_static,
    exploration_matters_when_sparse,
    matches_gmp,
    matches_snip,
    matches_prune_finetune,
    sparse_start_is_cheaper,
    adapt_matches_stu,
)


def claims(grid: Grid, rows: Rows) -> list[Verdict]:
    """(claim, verdict, evidence) for each of the paper's claims the grid can test, computed from the numbers."""
    found = [claim(grid, rows) for claim in DIGITS_CLAIMS] if grid.digits is not None else []
    if grid.gaussians is not None:
        found += [covers_modes(grid, rows, bench) for bench in grid.gaussians["datasets"]]
    return [verdict for verdict in found if verdict is not None]
