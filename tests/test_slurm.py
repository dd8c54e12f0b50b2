"""slurm/biggan.sh on a real one-node Slurm cluster (tests/slurm.py starts it): a 2-process CPU run to its end, and
a run stopped by SIGUSR1 that checkpoints, requeues itself and resumes without losing or repeating a step.

Slurm 22.05 facts these tests rest on (measured): the requeued job keeps its id and appends to the same log
(``--open-mode=append``); ``sbatch --wait`` keeps waiting across a requeue, but it polls at growing intervals (up to
half a minute), so the requeue test polls ``scontrol show job`` itself; ``scancel --signal=USR1 --batch`` delivers
what ``--signal=B:USR1@T`` does, to the batch shell only.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sgtrain import checkpoint
from slurm import SlurmCluster, slurm_cluster  # noqa: F401 (slurm_cluster: the fixture)

SCRIPT = Path(__file__).resolve().parents[1] / "slurm" / "biggan.sh"
REPO = SCRIPT.parents[1]
TINY = ["--config", "digits.yaml", "--model.g_ch=4", "--model.d_ch=4", "--model.dim_z=20", "--model.shared_dim=8"]
TINY += ["--train.batch_size=8", "--train.log_every=1", "--sparse.update_every=2"]
START = re.compile(r"^biggan\.sh: job (\d+) restart (\d+): .* x 2 processes, master ", re.MULTILINE)


def test_the_script_is_valid_bash() -> None:
    result = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_the_script_asks_slurm_for_requeue_and_an_early_signal() -> None:
    directives = [line.split(None, 1)[1] for line in SCRIPT.read_text().splitlines() if line.startswith("#SBATCH ")]
    assert "--requeue" in directives
    assert any(d.startswith("--signal=B:USR1@") for d in directives)
    assert "--open-mode=append" in directives
    assert "--ntasks-per-node=1" in directives


@pytest.fixture(scope="module")
def job_env(slurm_cluster: SlurmCluster, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:  # noqa: F811
    """The submitting environment (sbatch hands it to the job): CPU mode, 2 processes, this venv's Python."""
    return {
        "SGTRAIN_CPU": "1",
        "GPUS_PER_NODE": "2",
        "PYTHON": sys.executable,
        "SGTRAIN_CACHE": str(tmp_path_factory.mktemp("slurm-cache")),  # shared: the digits shards are made once
        "HF_HOME": str(tmp_path_factory.mktemp("slurm-hf")),  # no user-level accelerate config
        "OMP_NUM_THREADS": "1",
    }


def _sbatch(cluster: SlurmCluster, env: dict[str, str], run_dir: Path, log: Path, *args: str, **kwargs):
    # --gpus-per-node=0 overrides the script's GPU request: this cluster has none.
    command = ["sbatch", "--gpus-per-node=0", f"--output={log}", *kwargs.pop("options", []), str(SCRIPT)]
    return cluster.run(*command, *args, env={**env, "RUN_DIR": str(run_dir)}, cwd=REPO, **kwargs)


def _tail(log: str, chars: int = 8000) -> str:
    """The end of a job log for a failure message, without the progress bars (carriage-return redraws)."""
    lines = [line.rsplit("\r", 1)[-1] for line in log.splitlines()]
    return "\n".join(line for line in lines if not line.startswith("run:"))[-chars:]


def _steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if '"g_loss"' in line]


@pytest.fixture(scope="module")
def finished_job(slurm_cluster: SlurmCluster, job_env, tmp_path_factory: pytest.TempPathFactory):  # noqa: F811
    """`sbatch --wait slurm/biggan.sh` training 8 steps: (the sbatch result, job info, run dir, log text)."""
    tmp = tmp_path_factory.mktemp("slurm-finished")
    run_dir, log = tmp / "run", tmp / "job.log"
    try:
        result = _sbatch(
            slurm_cluster, job_env, run_dir, log, *TINY, "--train.steps=8", options=["--wait"], check=False, timeout=240
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"sbatch --wait still waiting after 240 s\n{_tail(log.read_text()) if log.exists() else ''}")
    job_id = re.search(r"Submitted batch job (\d+)", result.stdout).group(1)
    return result, slurm_cluster.job(job_id), run_dir, log.read_text()


def test_sbatch_wait_trains_with_two_processes_and_leaves_a_run_directory(finished_job) -> None:
    result, info, run_dir, log = finished_job
    assert result.returncode == 0, f"{result.stderr}\n{_tail(log)}"
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0"
    assert [p.name for p in checkpoint.list_checkpoints(run_dir)] == ["step-00000008.pt"]
    assert (run_dir / "config.yaml").is_file()
    assert _steps(run_dir) == list(range(1, 9))  # each step once
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {r["world_size"] for r in records if "g_loss" in r} == {2}  # one process group, not two lone ranks


def test_a_run_that_reaches_its_last_step_is_not_requeued(finished_job) -> None:
    _, info, _, log = finished_job
    assert info["Restarts"] == "0"
    assert [m.group(2) for m in START.finditer(log)] == ["0"], _tail(log)
    assert re.search(r"^biggan\.sh: job \d+ restart 0: finished \(exit 0\)$", log, re.MULTILINE), _tail(log)
    assert "requeued" not in log


def test_usr1_checkpoints_requeues_and_the_job_resumes_without_losing_or_repeating_a_step(
    slurm_cluster: SlurmCluster,  # noqa: F811
    job_env,
    tmp_path: Path,
) -> None:
    run_dir, log_path, planned = tmp_path / "run", tmp_path / "job.log", 60
    submitted = _sbatch(slurm_cluster, job_env, run_dir, log_path, *TINY, f"--train.steps={planned}")
    job_id = re.search(r"Submitted batch job (\d+)", submitted.stdout).group(1)

    # A few steps in, the signal Slurm sends before the time limit: to the batch shell only.
    start = time.monotonic()
    while len(_steps(run_dir)) < 3:
        state = slurm_cluster.job(job_id)["JobState"]
        assert state in ("PENDING", "RUNNING") and time.monotonic() - start < 120, (
            f"job {job_id} {state} before 3 steps\n{_tail(log_path.read_text()) if log_path.exists() else ''}"
        )
        time.sleep(0.2)
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", job_id)
    info = slurm_cluster.wait_job(job_id, timeout=180)
    log = log_path.read_text()

    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", _tail(log)
    assert info["Restarts"] == "1", _tail(log)
    # One log for both starts (same job id, appended), the second start counted as restart 1.
    assert [(m.group(1), m.group(2)) for m in START.finditer(log)] == [(job_id, "0"), (job_id, "1")], _tail(log)
    stopped = re.search(rf"sgtrain: stopped by the stop file \S+ after step (\d+) of {planned};", log)
    assert stopped, _tail(log)
    step = int(stopped.group(1))
    assert 3 <= step < planned
    # (exit 1: torch's elastic agent under `accelerate launch` reports the workers' 75 as a failure.)
    assert re.search(r"restart 0: stopped after a checkpoint \(exit \d+\); requeued", log), _tail(log)
    assert f"resuming at step {step}" in log
    assert re.search(r"^biggan\.sh: job \d+ restart 1: finished \(exit 0\)$", log, re.MULTILINE), _tail(log)
    # No step lost or repeated; the stop's checkpoint and the final one.
    assert _steps(run_dir) == list(range(1, planned + 1))
    assert [p.name for p in checkpoint.list_checkpoints(run_dir)][-1] == f"step-{planned:08d}.pt"
    assert f"step-{step:08d}.pt" in [p.name for p in checkpoint.list_checkpoints(run_dir)]


def test_a_failing_trainer_fails_the_job_without_requeue(
    slurm_cluster: SlurmCluster,  # noqa: F811
    job_env,
    tmp_path: Path,
) -> None:
    run_dir, log_path = tmp_path / "run", tmp_path / "job.log"
    submitted = _sbatch(slurm_cluster, job_env, run_dir, log_path, *TINY, "--train.no_such_key=1")
    job_id = re.search(r"Submitted batch job (\d+)", submitted.stdout).group(1)
    info = slurm_cluster.wait_job(job_id, timeout=120)
    log = log_path.read_text()
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", _tail(log)
    assert "no_such_key" in log  # sgtrain's own error, exit 2 (reported as 1 by torch's elastic agent)
    assert re.search(r"^biggan\.sh: job \d+ restart 0: failed \(exit [1-9]\d*\)$", log, re.MULTILINE), _tail(log)
    assert "requeued" not in log
