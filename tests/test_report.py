"""`sgtrain report`: the records the plots are drawn from, the PNGs written, and bad input refused before writing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from matplotlib.collections import PathCollection
from PIL import Image

from sgtrain.__main__ import main
from sgtrain.report import _balance, flops_at, flops_unit, load_records, series
from sgtrain.train import train

PLOTS = ("losses.png", "eval.png", "sparsity.png", "layers.png", "throughput.png")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six steps of STU with topology updates at steps 2 and 4, checkpoints and evaluations at steps 3 and 6."""
    from sgtrain.config import load_config

    values = {"model.g_ch": 4, "model.d_ch": 4, "model.dim_z": 20, "model.shared_dim": 8, "train.batch_size": 8}
    values.update({"train.steps": 6, "train.log_every": 1, "train.sample_every": 1000, "train.checkpoint_every": 3})
    values.update({"train.eval_every": 3, "train.eval_samples": 20})
    values.update({"sparse.method": "stu", "sparse.density_g": 0.5, "sparse.density_d": 0.5, "sparse.update_every": 2})
    values["sparse.update_end"] = 0.75  # updates at 2 and 4 only (the default, 1.0, adds one at the last step)
    values["run_dir"] = str(tmp_path_factory.mktemp("run"))
    return train(load_config(None, values))


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _write_lines(path: Path, records: list[dict | str]) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))


def _assert_png(path: Path) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert 1000 <= image.width <= 1400 and 400 <= image.height <= 2500, image.size  # ~110 dpi, 10-12 in wide
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 50  # drawn on, not a blank canvas
    with Image.open(path) as image:
        image.verify()


def test_records_are_the_metrics_file_one_per_step_and_kind(run_dir: Path) -> None:
    lines = _lines(run_dir / "metrics.jsonl")
    records = load_records(run_dir)
    assert records["train"] == [r for r in lines if "g_loss" in r]
    assert records["eval"] == [r for r in lines if "eval/fid" in r]
    assert [r["step"] for r in records["train"]] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records["eval"]] == [3, 6]
    by_step = {r["step"]: r for r in records["train"]}
    assert series(records["train"], "sparse/G_mask_change") == (
        [2, 4],
        [by_step[s]["sparse/G_mask_change"] for s in (2, 4)],
    )
    assert series(records["train"], "sparse/drop_fraction")[0] == [2, 4]
    assert series(records["eval"], "eval/classes_covered") == (
        [3, 6],
        [float(r["eval/classes_covered"]) for r in records["eval"]],
    )
    # Evaluations fall on logged steps: their FLOPs are those of the training record, exactly.
    assert flops_at([3, 6], records["train"]) == [by_step[3]["train_flops"], by_step[6]["train_flops"]]


def test_report_command_writes_every_plot(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "look"
    assert main(["report", str(run_dir), "--out", str(out)]) == 0
    wrote = [f"sgtrain: wrote {out / name}" for name in PLOTS]
    skipped = "sgtrain: skipped balance.png: no balance ratio logged (sparse.method = stu; ADAPT logs one)"
    assert capsys.readouterr().out.splitlines() == [*wrote[:3], skipped, *wrote[3:]]
    assert sorted(p.name for p in out.iterdir()) == sorted(PLOTS)
    for name in PLOTS:
        _assert_png(out / name)


def test_run_without_checkpoints_or_evaluations(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # The records of the run, without its checkpoints: every plot that needs only the metrics is drawn, by default
    # into RUN_DIR/report.
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(run_dir / "metrics.jsonl", copy)
    shutil.copy(run_dir / "config.yaml", copy)
    assert main(["report", str(copy)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert f"sgtrain: skipped layers.png: {copy}: no complete checkpoint in this run directory" in printed
    assert sorted(p.name for p in (copy / "report").iterdir()) == sorted(set(PLOTS) - {"layers.png"})
    # A dense run that never evaluated: no eval.png and no sparsity.png, each said.
    dense = tmp_path / "dense"
    dense.mkdir()
    (dense / "config.yaml").write_text("train:\n  eval_every: 0\nsparse:\n  method: dense\n")
    logged = [r for r in _lines(run_dir / "metrics.jsonl") if "g_loss" in r]
    _write_lines(dense / "metrics.jsonl", [{k: v for k, v in r.items() if not k.startswith("sparse/")} for r in logged])
    assert main(["report", str(dense)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"sgtrain: wrote {dense / 'report' / 'losses.png'}",
        "sgtrain: skipped eval.png: no evaluation records (train.eval_every = 0)",
        "sgtrain: skipped sparsity.png: no topology updates logged (sparse.method = dense)",
        "sgtrain: skipped balance.png: no balance ratio logged (sparse.method = dense; ADAPT logs one)",
        f"sgtrain: skipped layers.png: {dense}: no complete checkpoint in this run directory",
        f"sgtrain: wrote {dense / 'report' / 'throughput.png'}",
    ]
    for name in ("losses.png", "throughput.png"):
        _assert_png(dense / "report" / name)


def test_balance_plot_of_an_adapt_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # Strict ADAPT from D at 0.3 by steps of 0.1 up to a cap of 0.4: a sample every 2 steps from step 2, decisions at
    # 4 (grow), 6 (explore at the cap), 8 (shrink) and 10 (hold), each logged at its step.
    config = {"sparse": {"method": "adapt", "adapt": {"variant": "strict", "minimum": 0.05, "cap": 0.4}}}
    config["sparse"]["adapt"]["sample_every"] = 2
    (tmp_path / "config.yaml").write_text(json.dumps(config))  # JSON is YAML
    ratios = {2: 0.7, 4: 0.6, 6: 0.6, 8: 0.3, 10: 0.5}
    decisions = {4: (1.0, 0.4), 6: (2.0, 0.4), 8: (-1.0, 0.3), 10: (0.0, 0.3)}  # step: (decision code, D after it)
    records, d_density, decided = [], 0.3, None
    for step in range(1, 12):
        record = {"step": step, "images_seen": 8 * step, "g_loss": 1.0, "adapt/lower": 0.45, "adapt/upper": 0.55}
        if step in decisions:
            record["adapt/decision"], d_density = decisions[step]
            decided = ratios[step]
        record.update({"sparse/G_density": 0.2, "sparse/D_density": d_density, "adapt/D_density": d_density})
        if step >= 2:  # the window's mean after the latest sample
            record["adapt/balance_ratio"] = ratios[step - step % 2]
        if decided is not None:
            record["adapt/decided_ratio"] = decided
        records.append(record)
    # Before the first sample: skipped, and why.
    _write_lines(tmp_path / "metrics.jsonl", records[:1])
    assert main(["report", str(tmp_path)]) == 0
    skipped = (
        "sgtrain: skipped balance.png: no balance ratio logged yet (sparse.adapt.sample_every = 2, last logged step 1)"
    )
    assert skipped in capsys.readouterr().out.splitlines()
    _write_lines(tmp_path / "metrics.jsonl", records)
    assert main(["report", str(tmp_path)]) == 0
    assert f"sgtrain: wrote {tmp_path / 'report' / 'balance.png'}" in capsys.readouterr().out.splitlines()
    _assert_png(tmp_path / "report" / "balance.png")
    # Each decision marked, by its kind, at the decided ratio (left) and at D's density after it (right).
    ratio_ax, density_ax = _balance(load_records(tmp_path)["train"], config, "t").axes
    assert [text.get_text() for text in ratio_ax.get_legend().get_texts()] == [
        "bounds [0.45, 0.55]: D holds between",
        "window-mean balance ratio",
        "grow D (ratio at or above upper): 1",
        "shrink D (ratio at or below lower): 1",
        "explore D at its cap: 1",
        "hold D: 1",
    ]
    assert [text.get_text() for text in density_ax.get_legend().get_texts()] == [
        "G density",
        "D density",
        "D floor 0.05",
        "D cap 0.4 (strict)",
    ]
    for ax, marked in (
        (ratio_ax, [(4, 0.6), (8, 0.3), (6, 0.6), (10, 0.5)]),
        (density_ax, [(4, 0.4), (8, 0.3), (6, 0.4), (10, 0.3)]),
    ):
        points = [tuple(c.get_offsets()[0]) for c in ax.collections if isinstance(c, PathCollection)]
        assert points == marked


def test_a_step_logged_twice_keeps_its_last_record(tmp_path: Path) -> None:
    def logged(step: int, **values: float) -> dict:
        return {"step": step, "images_seen": 8 * step, "train_flops": 100.0 * step, "g_loss": 1.0, **values}

    _write_lines(
        tmp_path / "metrics.jsonl",
        [
            logged(1),
            logged(2, g_loss=5.0),
            {"step": 2, "eval/fid": 10.0},
            logged(4, g_loss=6.0),
            # A resume from step 2 rewrote the tail: steps 2 (both kinds) and 4 again, step 3 now logged too.
            logged(2, g_loss=7.0),
            {"step": 2, "eval/fid": 20.0, "eval/is": 3.0},
            "",
            logged(3, **{"sparse/G/blocks.0.conv1": 0.4}),  # per-layer densities: kept, plotted nowhere
            {"step": 3, "time": 12.5},  # a record of neither kind: replaces nothing
            logged(4, g_loss=8.0),
        ],
    )
    records = load_records(tmp_path)
    assert [(r["step"], r["g_loss"]) for r in records["train"]] == [(1, 1.0), (2, 7.0), (3, 1.0), (4, 8.0)]
    assert records["train"][2]["sparse/G/blocks.0.conv1"] == 0.4
    assert records["eval"] == [{"step": 2, "eval/fid": 20.0, "eval/is": 3.0}]
    # Between logged steps the FLOPs are interpolated (from 0 at step 0), past the last one extended at its rate.
    sparse = [r for r in records["train"] if r["step"] in (2, 4)]
    assert flops_at([1, 2, 3, 6], sparse) == [100.0, 200.0, 300.0, 600.0]
    assert flops_at([1], [{"step": 1, "g_loss": 0.0}]) is None
    assert (
        flops_unit(3.4e9) == (1e9, "GFLOPs")
        and flops_unit(2.5e17) == (1e15, "PFLOPs")
        and flops_unit(0) == (1, "FLOPs")
    )


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (None, "no such run directory"),
        ([], "no metrics file"),
        ([""], "no training records"),
        (['{"step": 1, "g_loss": 1.0}', '{"step": 2, "g_lo'], "metrics.jsonl:2: not a JSON record"),
        (["[1, 2]"], "metrics.jsonl:1: a record must be a JSON object with an integer 'step'"),
        (['{"step": "3", "g_loss": 1.0}'], "metrics.jsonl:1: a record must be a JSON object with an integer 'step'"),
        (['{"step": 3, "eval/fid": 1.0}'], "no training records"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(
    lines: list[str] | None, message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = tmp_path / "run"
    if lines is not None:
        run.mkdir()
    if lines:
        (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    assert main(["report", str(run), "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("sgtrain: error: ") and message in captured.err
    assert captured.err.count("\n") == 1
    assert not out.exists() and not (run / "report").exists()
