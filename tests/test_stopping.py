"""Stopping on request (SIGUSR1, SIGTERM, a stop file): one checkpoint, exit 75, an exact resume; a complete run
is not retrained; an evaluation lost to a stop between checkpoint and log is done on resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from multiprocess import assert_all_succeeded, run_ranks
from stops import StopAfter

from sgtrain import checkpoint
from sgtrain.stopping import EXIT_STOPPED, StoppedEarly, StopRequest
from sgtrain.train import train

TINY_ARGS = ["--model.g_ch=4", "--model.d_ch=4", "--model.dim_z=20", "--model.shared_dim=8", "--train.batch_size=8"]


def _steps_logged(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines if "g_loss" in json.loads(line)]


def _last_state(run_dir: Path) -> dict[str, Any]:
    return checkpoint.load_checkpoint(checkpoint.list_checkpoints(run_dir)[-1])


def test_a_stop_request_checkpoints_once_and_the_resume_equals_an_uninterrupted_run(
    tiny_config, tmp_path: Path, assert_trees_equal
) -> None:
    common = {"train__steps": 6, "train__checkpoint_every": 4, "sparse__method": "stu", "sparse__update_every": 2}
    common |= {"sparse__density_g": 0.5, "sparse__density_d": 0.5, "train__ema_start": 1}
    split = tiny_config(tmp_path / "split", **common)
    with pytest.raises(StoppedEarly, match="stopped by a test request after step 3 of 6") as stopped:
        train(split, stop=StopAfter(3))
    assert stopped.value.step == 3
    # The stop wrote the step-3 checkpoint (not a checkpoint step) and nothing after it.
    assert [p.name for p in checkpoint.list_checkpoints(split.run_dir)] == ["step-00000003.pt"]
    assert _steps_logged(Path(split.run_dir)) == [1, 2, 3]

    train(split)
    straight = tiny_config(tmp_path / "straight", **common)
    train(straight)
    a, b = _last_state(Path(split.run_dir)), _last_state(Path(straight.run_dir))
    for key in ("step", "position", "flops", "G", "D", "ema", "opt_g", "opt_d", "masks", "rng"):
        assert_trees_equal(a[key], b[key], key)
    assert _steps_logged(Path(split.run_dir)) == list(range(1, 7))  # no step lost or repeated


def test_a_stop_on_a_checkpoint_step_writes_that_checkpoint_once(tiny_config, tmp_path: Path) -> None:
    cfg = tiny_config(train__steps=6, train__checkpoint_every=2)
    with pytest.raises(StoppedEarly):
        train(cfg, stop=StopAfter(2))
    (only,) = checkpoint.list_checkpoints(cfg.run_dir)
    assert only.name == "step-00000002.pt"
    assert only.with_name(only.name + ".json").is_file()


def test_a_stop_file_stops_the_run_and_is_consumed(tiny_config, tmp_path: Path) -> None:
    stop_file = tmp_path / "stop"
    request = StopRequest(stop_file=stop_file)
    assert request.local() is None
    stop_file.touch()
    cfg = tiny_config(train__steps=5)
    with pytest.raises(StoppedEarly, match=f"the stop file {stop_file}"):
        train(cfg, stop=request)
    assert _last_state(Path(cfg.run_dir))["step"] == 1
    assert not stop_file.exists()  # a resumed run does not stop again at once
    train(cfg, stop=StopRequest(stop_file=stop_file))
    assert _last_state(Path(cfg.run_dir))["step"] == 5


def test_a_finished_run_is_not_retrained(tiny_config, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tiny_config(train__steps=2)
    run_dir = train(cfg)
    before = {p.name: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").iterdir()}
    metrics = (run_dir / "metrics.jsonl").read_text()
    train(cfg)
    assert f"{run_dir} is complete (2 of 2 steps): nothing to train" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").iterdir()} == before
    assert (run_dir / "metrics.jsonl").read_text() == metrics


def test_an_evaluation_lost_between_checkpoint_and_log_is_done_on_resume(tiny_config) -> None:
    cfg = tiny_config(train__steps=4, train__checkpoint_every=2, train__eval_every=2, train__eval_samples=20)
    run_dir = train(cfg)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    evals = [json.loads(line) for line in lines if "eval/fid" in line]
    assert [r["step"] for r in evals] == [2, 4]
    # As if the run had been killed after writing the step-4 checkpoint, before its evaluation was logged.
    (run_dir / "metrics.jsonl").write_text(
        "".join(line + "\n" for line in lines if "eval/" not in line or '"step": 2' in line)
    )
    train(cfg)
    redone = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if "eval/fid" in line]
    assert [r["step"] for r in redone] == [2, 4]
    assert redone[1]["eval/fid"] == pytest.approx(evals[1]["eval/fid"], rel=1e-9)  # the same samples, same value
    train(cfg)  # and once logged, it is not done again
    again = [line for line in (run_dir / "metrics.jsonl").read_text().splitlines() if "eval/fid" in line]
    assert len(again) == 2


@pytest.mark.parametrize(("signum", "workers"), [(signal.SIGUSR1, 2), (signal.SIGTERM, 0)])
def test_a_signal_to_the_command_stops_it_with_exit_75_after_a_checkpoint(
    tmp_path: Path, signum: signal.Signals, workers: int
) -> None:
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "sgtrain", "--config", "digits.yaml", *TINY_ARGS, f"--run_dir={run_dir}"]
    args += ["--train.steps=100000", "--train.log_every=1", "--train.checkpoint_every=100000"]
    args += [f"--data.num_workers={workers}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # A session of its own, signalled as a whole: as Slurm or a terminal signal every process of a job, data-loader
    # workers included, which must not die before the trainer has finished its step.
    process = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "metrics.jsonl").is_file() or len(_steps_logged(run_dir)) < 3:
            assert process.poll() is None and time.monotonic() < deadline, (
                process.stderr.read() if process.poll() else ""
            )
            time.sleep(0.1)
        os.killpg(process.pid, signum)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == EXIT_STOPPED, stderr[-3000:]
    step = _last_state(run_dir)["step"]
    assert f"stopped by {signum.name} after step {step} of 100000" in stderr
    assert _steps_logged(run_dir) == list(range(1, step + 1))

    # The same command resumes (here to a nearer end), then, once complete, does nothing.
    finish = [a if not a.startswith("--train.steps=") else f"--train.steps={step + 2}" for a in args]
    resumed = subprocess.run(finish, capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming at step {step}" in resumed.stdout
    assert _steps_logged(run_dir) == list(range(1, step + 3))
    again = subprocess.run(finish, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0 and "is complete" in again.stdout


def _stop_on_rank_one(rank: int, cfg_dict: dict[str, Any], out_dir: str) -> None:
    from sgtrain.config import config_from_dict
    from sgtrain.dist import Dist
    from sgtrain.train import training_loop

    dist = Dist()
    try:
        # Only rank 1 is asked (as when a signal or stop file reaches one node): both must stop after step 3.
        stopped = training_loop(config_from_dict(cfg_dict), dist, StopAfter(3) if rank == 1 else StopRequest(""))
    finally:
        dist.shutdown()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"step": stopped.step if stopped else None}))


def test_a_request_to_one_rank_stops_every_rank_after_the_same_step(tiny_config, tmp_path: Path) -> None:
    from sgtrain.config import config_to_dict

    cfg = tiny_config(tmp_path / "run", train__steps=8, sparse__method="stu", sparse__update_every=2)
    assert_all_succeeded(run_ranks(_stop_on_rank_one, config_to_dict(cfg), str(tmp_path), timeout=240))
    assert [json.loads((tmp_path / f"rank{r}.json").read_text())["step"] for r in (0, 1)] == [3, 3]
    assert [p.name for p in checkpoint.list_checkpoints(cfg.run_dir)] == ["step-00000003.pt"]
