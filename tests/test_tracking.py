"""Tracking: metrics.jsonl always; W&B runs offline, read back from their .wandb transaction logs (no network)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from sgtrain.config import Config, ConfigError, config_from_dict, config_to_dict, config_to_yaml, load_config
from sgtrain.tracking import STEP_METRIC, WANDB_ID_FILE, Tracker

REPO = Path(__file__).resolve().parents[1]
W_AND_B_KEYS = ("_step", "_runtime", "_timestamp")  # W&B's own columns in every history row


@pytest.fixture(autouse=True)
def _wandb_sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No network, no API key, and wandb's own directories (logs, settings, cache) under tmp_path, not in $HOME."""
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    for variable in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(variable, str(tmp_path / "wandb-home" / variable.lower()))


def _config(run_dir: Path, **wandb: Any) -> Config:
    return load_config(None, {"run_dir": str(run_dir), **{f"tracking.wandb.{k}": v for k, v in wandb.items()}})


def _write_png(path: Path) -> bytes:
    from PIL import Image

    pixels = bytes(range(48))  # 4x4 RGB
    Image.frombytes("RGB", (4, 4), pixels).save(path)
    return path.read_bytes()


# --------------------------------------------------------------------------------------------------------------------
# Reading an offline run back.


def _wandb_records(path: Path) -> list[Any]:
    """The protobuf records of a .wandb transaction log: a 7-byte header (":W&B", magic 0xBEE1, version 0), then
    LevelDB's log format: 32 KiB blocks of chunks, each with a 7-byte header (CRC32 4, length 2 little-endian,
    type 1 full | 2 first | 3 middle | 4 last); a block's tail shorter than a header is padding."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B" and data[4:6] == (0xBEE1).to_bytes(2, "little")
    block, position, pending, records = 32768, 7, b"", []
    while position + 7 <= len(data):
        left = block - position % block
        length, kind = int.from_bytes(data[position + 4 : position + 6], "little"), data[position + 6]
        if left < 7 or (length == 0 and kind == 0):
            position += left
            continue
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _offline_runs(run_dir: Path) -> list[dict[str, Any]]:
    """Every offline W&B run under ``run_dir/wandb`` in the order they started: its directory, transaction log, run
    record, history rows (key -> decoded value, nested keys joined by "/", W&B's own columns dropped), metric
    definitions, exit codes and whether it was marked preempting."""
    import wandb

    # run.finish() can return before wandb's service process has written an offline run's log (seen on the first run
    # of a process: the file held only its header); shutting the service down waits for every write.
    wandb.teardown()
    runs = []
    for directory in (run_dir / "wandb").glob("offline-run-*"):
        (log,) = directory.glob("run-*.wandb")
        records = _wandb_records(log)
        kinds = [record.WhichOneof("record_type") for record in records]
        rows = []
        for record in records:
            if record.WhichOneof("record_type") == "history":
                items = {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item
                }
                rows.append({key: value for key, value in items.items() if key not in W_AND_B_KEYS})
        runs.append(
            {
                "dir": directory,
                "log": log,
                "run": next(record.run for record in records if record.WhichOneof("record_type") == "run"),
                "rows": rows,
                "metrics": [record.metric for record in records if record.WhichOneof("record_type") == "metric"],
                "exit_codes": [
                    record.exit.exit_code for record in records if record.WhichOneof("record_type") == "exit"
                ],
                "preempting": "preempting" in kinds,
            }
        )
    return sorted(runs, key=lambda run: run["run"].start_time.ToNanoseconds())


def _metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------------------------------------------------
# Offline runs.


def test_offline_run_holds_the_config_records_and_sample_grid(tmp_path: Path) -> None:
    run_dir = tmp_path / "stu-digits"
    cfg = _config(run_dir, enabled=True, mode="offline", tags="[stu, digits]", group="seeds")
    grid = _write_png(tmp_path / "step-00000002.png")
    records = [
        {"step": 1, "g_loss": 1 / 3, "d_loss_real": 2e-7, "images_seen": 32, "sparse/G_density": 0.1},
        {"step": 2, "g_loss": -0.7071067811865476, "d_loss_real": 1e300, "images_seen": 64, "images_per_s": 123.5},
        {"step": 2, "eval/fid": 204.25, "eval/classes_covered": 10},  # a second record of one step: its own row
    ]
    with Tracker(cfg, run_dir, resume_step=0) as tracker:
        for record in records:
            tracker.log(record)
        tracker.log_image(2, "samples", tmp_path / "step-00000002.png")

    assert _metrics(run_dir) == records  # metrics.jsonl holds the records and nothing of the image
    (run,) = _offline_runs(run_dir)
    run_id = (run_dir / WANDB_ID_FILE).read_text().strip()
    assert re.fullmatch(r"[a-z0-9]{8}", run_id) and run["log"].name == f"run-{run_id}.wandb"
    assert (run["run"].run_id, run["run"].project, run["run"].display_name) == (run_id, "sgtrain", "stu-digits")
    assert run["run"].run_group == "seeds" and list(run["run"].tags) == ["stu", "digits"]
    config = {item.key: json.loads(item.value_json) for item in run["run"].config.update if item.key != "_wandb"}
    assert config == config_to_dict(cfg)  # the resolved config, tracking section included
    # Every key is plotted against the training step, logged as a value: W&B's own step only counts rows.
    assert [(m.glob_name, m.step_metric) for m in run["metrics"] if m.glob_name] == [("*", STEP_METRIC)]
    scalars = [{STEP_METRIC: r["step"], **{k: v for k, v in r.items() if k != "step"}} for r in records]
    assert run["rows"][:3] == scalars  # exact: JSON carries a float's shortest round-trip form
    image = run["rows"][3]
    assert image[STEP_METRIC] == 2 and image["samples/_type"] == "image-file" and image["samples/caption"] == "step 2"
    assert (run["dir"] / "files" / image["samples/path"]).read_bytes() == grid
    assert run["exit_codes"] == [0] and not run["preempting"]
    # dir= beats $WANDB_DIR: every W&B file of the run is in the run directory.
    assert not (tmp_path / "wandb-home" / "wandb_dir").exists()


def test_log_images_off_keeps_grids_out_of_wandb(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _write_png(tmp_path / "grid.png")
    with Tracker(_config(run_dir, enabled=True, log_images=False), run_dir, resume_step=0) as tracker:
        tracker.log({"step": 1, "g_loss": 0.5})
        tracker.log_image(1, "samples", tmp_path / "grid.png")
    (run,) = _offline_runs(run_dir)
    assert run["rows"] == [{STEP_METRIC: 1, "g_loss": 0.5}]
    assert not list(run["dir"].rglob("*.png"))


def test_resumed_run_continues_the_wandb_run_and_relogs_the_lost_steps(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cfg = _config(run_dir, enabled=True, mode="offline")
    # First attempt: logs steps 1-5, checkpoints at step 3, then dies.
    with pytest.raises(FloatingPointError), Tracker(cfg, run_dir, resume_step=0) as tracker:
        for step in range(1, 6):
            tracker.log({"step": step, "g_loss": step / 10})
        raise FloatingPointError("the run died after step 5")
    run_id = (run_dir / WANDB_ID_FILE).read_text().strip()

    # Second attempt from the step-3 checkpoint: metrics.jsonl is cut back before the first step runs.
    tracker = Tracker(cfg, run_dir, resume_step=3)
    assert _metrics(run_dir) == [{"step": step, "g_loss": step / 10} for step in (1, 2, 3)]
    for step in range(4, 7):
        tracker.log({"step": step, "g_loss": step / 100})
    tracker.finish(exit_code=75, preempted=True)  # stopped on request, to be resumed again
    tracker.finish()  # idempotent
    with pytest.raises(RuntimeError, match="finished"):
        tracker.log({"step": 7, "g_loss": 0.0})

    expected = [{"step": s, "g_loss": s / 10} for s in (1, 2, 3)] + [{"step": s, "g_loss": s / 100} for s in (4, 5, 6)]
    assert _metrics(run_dir) == expected
    first, second = _offline_runs(run_dir)
    assert first["run"].run_id == second["run"].run_id == run_id  # one W&B run, continued
    assert first["run"].resume and second["run"].resume  # resume="allow": `wandb sync` appends to the run
    assert first["log"].name == second["log"].name == f"run-{run_id}.wandb"
    assert first["run"].start_time.ToNanoseconds() < second["run"].start_time.ToNanoseconds()
    assert first["rows"] == [{STEP_METRIC: s, "g_loss": s / 10} for s in range(1, 6)]
    # The steps after the checkpoint are logged again, not dropped as a step W&B has seen.
    assert second["rows"] == [{STEP_METRIC: s, "g_loss": s / 100} for s in (4, 5, 6)]
    assert (first["exit_codes"], first["preempting"]) == ([1], False)  # failed
    assert (second["exit_codes"], second["preempting"]) == ([75], True)  # preempted


def test_wandb_that_fails_to_start_is_one_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import wandb

    def no_key(**_: Any) -> None:  # what wandb.init raises online without an API key (checked by hand, no network)
        raise wandb.errors.UsageError("No API key configured. Use `wandb login` to log in.")

    monkeypatch.setattr(wandb, "init", no_key)
    with pytest.raises(ConfigError) as error:
        Tracker(_config(tmp_path / "run", enabled=True, mode="online"), tmp_path / "run", resume_step=0)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("tracking.wandb: W&B did not start in online mode: No API key configured.")


# --------------------------------------------------------------------------------------------------------------------
# Without W&B.

_WITHOUT_WANDB = """
import json, sys
from pathlib import Path
from sgtrain.config import load_config
from sgtrain.tracking import Tracker

grid, files = Path(sys.argv[1]), {}
for name, overrides in json.loads(sys.argv[2]).items():
    run_dir = grid.parent / name
    cfg = load_config(None, {"run_dir": str(run_dir), **overrides})
    with Tracker(cfg, run_dir, resume_step=0) as tracker:
        tracker.log({"step": 1, "g_loss": 0.5})
        tracker.log_image(1, "samples", grid)
    files[name] = sorted(str(path.relative_to(run_dir)) for path in run_dir.rglob("*"))
print(json.dumps({"imported": "wandb" in sys.modules, "files": files}))
"""


def test_without_wandb_only_metrics_jsonl_is_written_and_wandb_never_imported(tmp_path: Path) -> None:
    grid = tmp_path / "grid.png"
    _write_png(grid)
    runs = {"enabled-false": {}, "mode-disabled": {"tracking.wandb.enabled": True, "tracking.wandb.mode": "disabled"}}
    result = subprocess.run(  # a fresh interpreter: this one has imported wandb for the other tests
        [sys.executable, "-c", textwrap.dedent(_WITHOUT_WANDB), str(grid), json.dumps(runs)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(result.stdout) == {"imported": False, "files": {name: ["metrics.jsonl"] for name in runs}}
    for name in runs:
        assert _metrics(tmp_path / name) == [{"step": 1, "g_loss": 0.5}]
    assert not (tmp_path / "wandb-home").exists()


def test_metrics_jsonl_is_truncated_to_the_resume_step_without_wandb(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lines = [{"step": 1, "g_loss": 0.1}, {"step": 2, "eval/fid": 9.5}, {"step": 3, "g_loss": 0.3}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    with Tracker(_config(run_dir), run_dir, resume_step=2) as tracker:
        assert _metrics(run_dir) == lines[:2]
        tracker.log({"step": 3, "g_loss": 0.25})
    assert _metrics(run_dir) == [*lines[:2], {"step": 3, "g_loss": 0.25}]
    with pytest.raises(TypeError, match="step must be an int"), Tracker(_config(run_dir), run_dir, resume_step=3) as t:
        t.log({"step": 3.0, "g_loss": 0.25})


# --------------------------------------------------------------------------------------------------------------------
# The tracking.wandb config section.


def test_wandb_section_from_dotted_overrides_and_yaml(tmp_path: Path) -> None:
    assert Config().tracking.wandb.enabled is False and Config().tracking.wandb.mode == "offline"
    dotted = load_config(
        None,
        {
            "tracking.wandb.enabled": "true",
            "tracking.wandb.mode": "online",
            "tracking.wandb.entity": "lab",
            "tracking.wandb.tags": "[stu, cifar10]",
            "tracking.wandb.log_images": "false",
        },
    )
    w = dotted.tracking.wandb
    assert (w.enabled, w.mode, w.entity, w.tags, w.log_images, w.project) == (
        True,
        "online",
        "lab",
        ["stu", "cifar10"],
        False,
        "sgtrain",
    )
    delta = tmp_path / "tracked.yaml"
    delta.write_text("tracking:\n  wandb:\n    enabled: true\n    project: gans\n    tags: [a]\n    name: seed-0\n")
    w = load_config(delta).tracking.wandb
    assert (w.enabled, w.project, w.tags, w.name, w.mode, w.entity) == (True, "gans", ["a"], "seed-0", "offline", None)
    cfg = load_config(delta, {"tracking.wandb.group": "seeds"})
    assert config_from_dict(config_to_dict(cfg)) == cfg
    assert load_config(_written(tmp_path / "resolved.yaml", config_to_yaml(cfg))) == cfg
    # A config saved before this section existed (an old checkpoint) reads with tracking off.
    old = config_to_dict(Config())
    del old["tracking"]
    assert config_from_dict(old) == Config()


def _written(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"tracking.wandb.mode": "cloud"}, "tracking.wandb.mode must be one of online, offline, disabled, got 'cloud'"),
        ({"tracking.wandb.enabled": "maybe"}, "tracking.wandb.enabled must be true or false, got 'maybe'"),
        ({"tracking.wandb.tags": "[[stu]]"}, "tracking.wandb.tags[0] must be a string, got ['stu']"),
        ({"tracking.wandb.tags": f"[{'x' * 65}]"}, "tracking.wandb.tags must be 1-64 characters each"),
        ({"tracking.wandb.project": ""}, "tracking.wandb.project must not be empty"),
        (
            {"tracking.wandb.projekt": "x"},
            "unknown config key tracking.wandb.projekt; did you mean tracking.wandb.project?",
        ),
        ({"tracking.wandb": "on"}, "tracking.wandb is a section"),
    ],
)
def test_bad_wandb_values_name_the_key(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, overrides)


def test_cli_takes_the_dotted_wandb_flags(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sgtrain",
            "print-config",
            "--tracking.wandb.enabled=true",
            "--tracking.wandb.mode=offline",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    printed = load_config(_written(tmp_path / "printed.yaml", result.stdout))
    assert printed.tracking.wandb.enabled is True and printed.tracking.wandb.mode == "offline"


# --------------------------------------------------------------------------------------------------------------------
# The training loop's records in W&B.


def test_a_training_run_logs_losses_densities_exploration_grids_and_throughput_to_wandb(tiny_config) -> None:
    from sgtrain.train import train

    cfg = tiny_config(
        train__steps=4,
        train__sample_every=2,
        sparse__method="stu",
        sparse__density_g=0.5,
        sparse__density_d=0.5,
        sparse__update_every=2,
        sparse__explore="GD",
        tracking__wandb__enabled=True,
        tracking__wandb__mode="offline",
    )
    run_dir = train(cfg)
    (run,) = _offline_runs(run_dir)
    config = {item.key: json.loads(item.value_json) for item in run["run"].config.update if item.key != "_wandb"}
    assert config == config_to_dict(cfg)
    scalars = [row for row in run["rows"] if "samples/_type" not in row]
    # W&B holds exactly what metrics.jsonl holds, record for record.
    assert scalars == [
        {STEP_METRIC: r["step"], **{k: v for k, v in r.items() if k != "step"}} for r in _metrics(run_dir)
    ]
    keys = set().union(*scalars)
    assert {"g_loss", "d_loss_real", "d_loss_fake", "images_per_s", "train_flops", "world_size"} <= keys
    for net in ("G", "D"):
        assert {f"sparse/{net}_density", f"sparse/{net}_itop_rate", f"sparse/{net}_mask_change"} <= keys
        layers = [key for key in keys if key.startswith(f"sparse/{net}/")]
        values = [row[layer] for row in scalars for layer in layers if layer in row]
        assert len(layers) >= 5 and values and all(0 < value <= 1 for value in values)
    grids = [row for row in run["rows"] if "samples/_type" in row]
    assert [row[STEP_METRIC] for row in grids] == [2, 4]
    for row in grids:
        assert (run["dir"] / "files" / row["samples/path"]).stat().st_size > 0
    assert run["exit_codes"] == [0]
