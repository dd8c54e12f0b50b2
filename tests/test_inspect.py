"""`sgtrain inspect` and `sgtrain flops`: the reports users read."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from sgtrain import checkpoint
from sgtrain.inspection import format_report, inspect_checkpoint
from sgtrain.sparse.topology import unpack_mask
from sgtrain.train import train


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sgtrain", *args], capture_output=True, text=True)


def test_inspect_reports_masks_of_a_sparse_run(tiny_config) -> None:
    cfg = tiny_config(
        train__steps=4, sparse__method="stu", sparse__density_g=0.3, sparse__density_d=0.5, sparse__update_every=2
    )
    run_dir = train(cfg)
    result = _cli("inspect", str(run_dir), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["step"] == 4 and set(report["networks"]) == {"G", "D"}
    assert "adapt" not in report  # ADAPT's state only for ADAPT runs
    state = checkpoint.load_checkpoint(checkpoint.list_checkpoints(run_dir)[-1])
    for net, target in (("G", 0.3), ("D", 0.5)):
        info = report["networks"][net]
        assert info["target_density"] == target
        active = sum(layer["active"] for layer in info["layers"])
        numel = sum(layer["numel"] for layer in info["layers"])
        assert info["density"] == active / numel
        assert abs(info["density"] - target) <= len(info["layers"]) / numel  # within one weight per layer
        assert info["itop_rate"] >= info["density"]
        for layer in info["layers"]:
            assert set(layer) == {"name", "shape", "numel", "active", "nnz", "density"}
            assert layer["nnz"] <= layer["active"] and layer["density"] == layer["active"] / layer["numel"]
            mask = unpack_mask(state["masks"]["layers"][f"{net}.{layer['name']}"]["mask"], layer["shape"])
            assert layer["active"] == int(mask.sum())
            assert layer["nnz"] == int(torch.count_nonzero(state[net][f"{layer['name']}.weight"]))
    assert report["networks"]["G"]["itop_rate"] > report["networks"]["G"]["density"]  # G explored
    # A checkpoint file works as well as its run directory, and the table names every layer.
    path = checkpoint.list_checkpoints(run_dir)[-1]
    assert inspect_checkpoint(path)["networks"] == report["networks"]
    table = format_report(report)
    assert all(layer["name"] in table for layer in report["networks"]["D"]["layers"])


def test_inspect_reports_the_adapt_state(tiny_config) -> None:
    # A sample every step into a window of 2, decisions every 2 steps: one, at step 2 (the last step has none).
    cfg = tiny_config(
        train__steps=4,
        sparse__method="adapt",
        sparse__density_g=0.3,
        sparse__density_d=0.5,
        sparse__adapt__sample_every=1,
        sparse__adapt__window=2,
        sparse__adapt__update_every=2,
    )
    run_dir = train(cfg)
    report = inspect_checkpoint(run_dir)
    last = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    decided = last["adapt/decided_ratio"]
    decision = "shrink" if decided <= 0.45 else "grow" if decided >= 0.55 else "hold"
    density = {"shrink": 0.45, "hold": 0.5, "grow": 0.55}[decision]
    assert report["adapt"] == {
        "variant": "relax",
        "lower": 0.45,
        "upper": 0.55,
        "minimum": 0.05,
        "highest": 1.0,
        "d_density": density,
        "window_size": 2,
        "window_samples": 2,
        "balance_ratio": last["adapt/balance_ratio"],  # the same window's mean as the step-4 record, bit for bit
        "decisions": 1,
        "decision": decision,
        "decided_ratio": decided,
    }
    assert last["adapt/D_density"] == density and report["networks"]["D"]["density"] == last["sparse/D_density"]
    assert json.loads(json.dumps(report)) == report  # what --json prints
    assert format_report(report).splitlines()[1:5] == [
        "",
        f"ADAPT (relax): D density {density:.4f} (floor 0.05, highest 1), bounds [0.45, 0.55]",
        f"  balance window 2 of 2 samples, mean ratio {last['adapt/balance_ratio']:.4f}",
        f"  latest decision: {decision} at ratio {decided:.4f} (decisions so far: 1)",
    ]
    # Before the first sample (strict: D's highest density is its cap).
    adapt = {**report["adapt"], "variant": "strict", "highest": 0.5, "d_density": 0.5, "window_samples": 0}
    adapt.update(balance_ratio=None, decisions=0, decision=None, decided_ratio=None)
    assert format_report({**report, "adapt": adapt}).splitlines()[2:5] == [
        "ADAPT (strict): D density 0.5000 (floor 0.05, highest 0.5), bounds [0.45, 0.55]",
        "  balance window 0 of 2 samples, mean ratio none yet",
        "  latest decision: none yet",
    ]


def test_inspect_of_a_dense_run_and_bad_paths(tiny_config, tmp_path: Path) -> None:
    run_dir = train(tiny_config(train__steps=1))
    report = inspect_checkpoint(run_dir)
    assert report["method"] == "dense" and "adapt" not in report
    assert report["networks"]["G"]["density"] == 1.0 and report["networks"]["D"]["itop_rate"] == 1.0
    missing = _cli("inspect", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "no such run directory or checkpoint file" in missing.stderr
    (tmp_path / "empty").mkdir()
    empty = _cli("inspect", str(tmp_path / "empty"))
    assert empty.returncode == 2 and "no complete checkpoint" in empty.stderr


def test_flops_command_dense_vs_sparse() -> None:
    result = _cli("flops", "--config", "cifar10.yaml", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert round(report["G"]["inference_dense"]) == 3_363_298_304  # the cifar10 BigGAN G, per image
    assert report["G"]["inference_sparse"] < 0.5 * report["G"]["inference_dense"]  # G at density 0.2 (ERK)
    assert 0 < report["train_iteration"]["sparse_fraction"] < 1
    dense = json.loads(_cli("flops", "--config", "cifar10_dense.yaml", "--json").stdout)
    assert dense["train_iteration"]["sparse_fraction"] == 1.0
    assert dense["train_iteration"]["dense"] == report["train_iteration"]["dense"]


def test_run_logs_training_flops_relative_to_dense(tiny_config) -> None:
    cfg = tiny_config(train__steps=2, sparse__method="static", sparse__density_g=0.3, sparse__density_d=0.5)
    run_dir = train(cfg)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert 0 < records[-1]["train_flops_vs_dense"] < 1
    assert records[-1]["train_flops"] == 2 * records[0]["train_flops"]  # static masks: the same cost every step
