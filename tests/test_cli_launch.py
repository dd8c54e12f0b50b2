"""Launching through Accelerate's CLI, as users do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from sgtrain import checkpoint


def test_accelerate_launch_single_process(tmp_path: Path) -> None:
    """`accelerate launch -m sgtrain --config digits.yaml --train.steps=20` trains as one process."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf")}  # no user-level accelerate config leaks in
    env.pop("WORLD_SIZE", None)
    command = ["accelerate", "launch", "-m", "sgtrain", "--config", "digits.yaml", "--train.steps=20"]
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", *command[2:], f"--run_dir={run_dir}"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert [p.name for p in checkpoint.list_checkpoints(run_dir)] == ["step-00000020.pt"]
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "samples" / "step-00000020.png").is_file()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 20
    state = checkpoint.load_checkpoint(checkpoint.list_checkpoints(run_dir)[-1])
    # One process read the whole global batch of every D step.
    assert state["position"] == 20 * state["config"]["train"]["d_steps"] * state["config"]["train"]["batch_size"]
