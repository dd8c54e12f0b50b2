"""`sgtrain bench`: every suite runs (shrunk by --tiny) and the JSON holds every figure the README's table names."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sgtrain.__main__ import main
from sgtrain.benchmarks.suites import FORMAT, SUITES


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    assert main(["bench", "--suite", "all", "--tiny", "--json", str(out)]) == 0
    return json.loads(out.read_text())


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def test_the_json_names_the_machine_and_every_suite(bench: dict[str, Any]) -> None:
    assert bench["format"] == FORMAT and bench["tiny"] is True
    assert {"date", "cpu_model", "cpus", "torch_threads", "gpu", "torch", "python"} <= bench["machine"].keys()
    assert list(bench["suites"]) == list(SUITES)
    assert all(_number(suite["wall_s"]) for suite in bench["suites"].values())


def test_every_named_figure_is_a_number(bench: dict[str, Any]) -> None:
    s = bench["suites"]
    # Training step per model config, dense vs sparse, medians and the ratios measured in the same process.
    (step,) = s["step"]["configs"].values()  # --tiny: the first config only
    for side in ("dense", "sparse"):
        assert _number(step[side]["median_s"])
    assert _number(step["sparse_vs_dense_time"]) and 0 < step["sparse_vs_dense_flops"] < 1
    # Mask enforcement: the manager vs a state-dict round trip.
    assert _number(s["masks"]["manager"]["median_s"]) and _number(s["masks"]["speedup"])
    # ADAPT's balance-ratio sampling (--tiny: digits): per iteration with a sample every 10 and with none, the
    # overhead, and one pass measured directly (a difference of timings: any sign at this size).
    balance = s["balance"]
    assert balance["sample_every"] == 10 and balance["d_steps"] == 1
    assert all(abs(density - 0.1) < 0.01 for density in balance["measured_density"].values())
    for side in ("sampling", "none"):
        assert _number(balance[side]["median_s"]) and balance[side]["n"] == 1
    for key in ("overhead_pct", "overhead_paired_pct", "pass_per_iteration_s", "pass_per_iteration_pct"):
        assert _number(balance[key]), key
    assert _number(balance["balance_pass"]["median_s"])
    # Topology update, 1 rank vs 2 ranks, sharded vs naive, with bytes.
    cases = s["topology"]["update_s"]
    assert any(case.startswith("1r/") for case in cases)
    assert {"2r/sharded/local/1t", "2r/naive/local/1t", "2r/sharded/DDP/1t", "2r/naive/DDP/1t"} <= cases.keys()
    assert all(_number(v) for v in cases.values())
    assert all(_number(v) for v in s["topology"]["sent_bytes_per_rank"].values())
    # Data loading vs raw decode; evaluation features/s.
    assert _number(s["data"]["ratio"]) and _number(s["data"]["one_core"]["wds_torchrgb"]["images_per_s"])
    assert _number(s["eval"]["classifier_32px"]["images_per_s"])
    assert s["eval"]["inception"] is None or _number(s["eval"]["inception"]["images_per_s"])
    # Export: file sizes against the dense file and the goal; sparse vs dense inference at two batch sizes.
    for size in s["export"]["size"].values():
        assert _number(size["ratio"]) and _number(size["coded_vs_goal"]) and size["file_bytes"] < size["dense_bytes"]
    rows = s["export"]["inference"]["results"]
    assert {row["batch"] for row in rows} == {1, 4} and {row["density"] for row in rows} >= {1.0, 0.1}
    for row in rows:
        assert _number(row["speedup"]) and row["max_abs_diff"] <= 1e-4


def test_the_summary_holds_each_suites_headline(bench: dict[str, Any]) -> None:
    summary = bench["summary"]
    headlines = ("step_digits_sparse_vs_dense_time", "masks_speedup_vs_state_dict", "data_loader_vs_raw_decode")
    for key in (*headlines, "balance_overhead_pct", "balance_pass_per_iteration_pct"):
        assert _number(summary[key]), key
    assert summary["topology_update_s"] and summary["inference_speedup"] and summary["export_coded_vs_goal"]


def test_a_bad_suite_or_json_path_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--suite", "speed"]) == 2
    assert "--suite must be all or some of step, masks" in capsys.readouterr().err
    assert main(["bench", "--suite", "eval", "--json", str(tmp_path / "missing" / "x.json")]) == 2
    assert "its directory does not exist" in capsys.readouterr().err
