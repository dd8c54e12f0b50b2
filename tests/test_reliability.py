"""The fault suite: each promise of docs/reliability.md, proven by injecting its fault.

kill -9 at random moments and inside a checkpoint write; damaged checkpoints; a full disk; NaN and Inf in losses,
gradients and state; a rank that dies; bad input wherever a user types or points.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from multiprocess import run_ranks
from test_stream import write_shards

from sgtrain import checkpoint
from sgtrain.__main__ import main
from sgtrain.checkpoint import CheckpointError
from sgtrain.losses import HINGE, GanLoss
from sgtrain.stopping import NonFiniteError
from sgtrain.train import Hooks, train

TINY_ARGS = ["--model.g_ch=4", "--model.d_ch=4", "--model.dim_z=20", "--model.shared_dim=8", "--train.batch_size=8"]
# The embedded default (STU-GAN, half-dense G and D), tiny, in memory, every step logged, checkpoints every 2 steps.
RUN_ARGS = [*TINY_ARGS, "--config", "digits.yaml", "--data.shards=null", "--train.steps=12", "--train.log_every=1"]
RUN_ARGS += ["--train.checkpoint_every=2", "--sparse.update_every=3", "--train.ema_start=1"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _final(run_dir: Path) -> dict[str, Any]:
    return checkpoint.load_checkpoint(checkpoint.list_checkpoints(run_dir)[-1])


def _assert_same_run(a: Path, b: Path, assert_trees_equal) -> None:
    x, y = _final(a), _final(b)
    for key in ("step", "position", "G", "D", "ema", "opt_g", "opt_d", "masks", "rng"):
        assert_trees_equal(x[key], y[key], key)
    steps = [json.loads(line)["step"] for line in (a / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))  # no step lost or repeated in the log


def _files(directory: Path) -> dict[str, str]:
    """Every file under ``directory`` by relative path, with its sha256."""
    if not directory.exists():
        return {}
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run, in a subprocess like the runs it is compared with (same threads, same code path)."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    result = subprocess.run(
        [sys.executable, "-m", "sgtrain", *RUN_ARGS, f"--run_dir={run_dir}"], env=ENV, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


# --------------------------------------------------------------------------------------------------------------------
# 1. kill -9 at any moment.


def _logged(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def test_kill_9_at_random_moments_then_resume_equals_the_uninterrupted_run(
    tmp_path: Path, straight: Path, assert_trees_equal
) -> None:
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "sgtrain", *RUN_ARGS, f"--run_dir={run_dir}"]
    rng = random.Random(0)
    kills = 0
    while True:
        process = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        # Kill once the log reaches a random step (a few past where this start began), a random fraction of a step
        # later: mid-step, mid-log or mid-checkpoint, wherever that falls.
        target = _logged(run_dir) + rng.randint(1, 4)
        deadline = time.monotonic() + 120
        while process.poll() is None and _logged(run_dir) < target and time.monotonic() < deadline:
            time.sleep(0.01)
        if process.poll() is None and kills < 4:
            time.sleep(rng.uniform(0.0, 0.15))
            process.kill()
            process.wait()
            kills += 1
            continue
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr[-3000:]
        break
    assert kills >= 2
    _assert_same_run(run_dir, straight, assert_trees_equal)


_DIE_IN_WRITE = """
import os, signal, sys
import sgtrain.checkpoint as ckpt
real_save, real_atomic = ckpt.torch.save, ckpt.write_atomic
where = sys.argv.pop(1)

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def save(obj, handle, *args, **kwargs):
    if where == "checkpoint" and obj.get("step") == 4:  # half the bytes on disk, then killed
        import io
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        handle.flush()
        die()
    return real_save(obj, handle, *args, **kwargs)

def atomic(path, data):
    if where == "record" and path.name == "step-00000004.pt.json":  # the checkpoint is in place, its record is not
        die()
    return real_atomic(path, data)

ckpt.torch.save, ckpt.write_atomic = save, atomic
from sgtrain.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("where", ["checkpoint", "record"])
def test_kill_9_inside_a_checkpoint_write_resumes_from_the_previous_one(
    tmp_path: Path, straight: Path, where: str, assert_trees_equal
) -> None:
    run_dir = tmp_path / "run"
    args = [*RUN_ARGS, f"--run_dir={run_dir}"]
    died = subprocess.run([sys.executable, "-c", _DIE_IN_WRITE, where, *args], env=ENV, capture_output=True, text=True)
    assert died.returncode == -signal.SIGKILL
    assert [p.name for p in checkpoint.list_checkpoints(run_dir)] == ["step-00000002.pt"]
    resumed = subprocess.run([sys.executable, "-m", "sgtrain", *args], env=ENV, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming at step 2" in resumed.stdout
    _assert_same_run(run_dir, straight, assert_trees_equal)


def test_a_log_line_torn_by_a_kill_is_dropped_on_resume(tiny_config) -> None:
    run_dir = train(tiny_config(train__steps=2))
    with open(run_dir / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 3, "g_lo')  # killed in the middle of an append
    train(tiny_config(train__steps=4))
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


# --------------------------------------------------------------------------------------------------------------------
# 2. Damaged checkpoints; 3. a full disk.


@pytest.mark.parametrize("damage", ["truncated", "flipped byte", "checksum record missing", "checkpoint missing"])
def test_a_damaged_latest_checkpoint_is_reported_and_the_previous_used(tiny_config, damage: str) -> None:
    cfg = tiny_config(train__steps=2, train__checkpoint_every=1)
    run_dir = train(cfg)
    latest = run_dir / "checkpoints" / "step-00000002.pt"
    data = latest.read_bytes()
    if damage == "truncated":
        latest.write_bytes(data[: len(data) - 100])
    elif damage == "flipped byte":
        latest.write_bytes(data[:1000] + bytes([data[1000] ^ 0x01]) + data[1001:])
    elif damage == "checksum record missing":
        latest.with_name(latest.name + ".json").unlink()
    else:
        latest.unlink()
    message = {"truncated": "truncated", "flipped byte": "sha256 differs"}.get(damage, "incomplete")
    with pytest.warns(UserWarning, match=message):
        path, state = checkpoint.load_latest(run_dir)
    assert path.name == "step-00000001.pt" and state["step"] == 1
    with pytest.warns(UserWarning, match=message):
        train(tiny_config(train__steps=3, train__checkpoint_every=1))  # resumes from step 1 and goes on
    assert _final(run_dir)["step"] == 3


def test_a_full_disk_during_a_checkpoint_write_stops_the_run_and_keeps_the_previous_one(
    tiny_config, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tiny_config(train__steps=4, train__checkpoint_every=2)
    real_save = torch.save

    def save(obj: Any, handle: Any, *args: Any, **kwargs: Any) -> None:
        if isinstance(obj, dict) and obj.get("step") == 4:
            handle.write(b"\0" * 4096)  # some of it fits, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", save)
    with pytest.raises(CheckpointError, match=r"could not write checkpoint step-00000004\.pt.*No space left on device"):
        train(cfg)
    run_dir = Path(cfg.run_dir)
    (kept,) = checkpoint.list_checkpoints(run_dir)
    assert kept.name == "step-00000002.pt"
    checkpoint.verify(kept)  # intact
    assert [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")] == []  # no partial file
    monkeypatch.undo()
    train(cfg)  # with room on the disk again, the same run resumes from step 2 and completes
    assert _final(run_dir)["step"] == 4


def test_a_full_disk_through_the_cli_is_one_line_and_exit_2(tmp_path: Path) -> None:
    code = (
        "import errno, os, sys, sgtrain.checkpoint as c\n"
        "def full(*a, **k): raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))\n"
        "c.torch.save = full\n"
        "from sgtrain.__main__ import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    args = [*TINY_ARGS, "--data.shards=null", "--train.steps=1", f"--run_dir={tmp_path / 'run'}"]
    result = subprocess.run([sys.executable, "-c", code, *args], env=ENV, capture_output=True, text=True)
    assert result.returncode == 2
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("sgtrain: error:")]
    assert "No space left on device" in line and "Traceback" not in result.stderr


# --------------------------------------------------------------------------------------------------------------------
# 4. NaN and Inf.


def _poisoned(real: Any, calls: set[int] | None = None, after: int | None = None, value: float = float("nan")) -> Any:
    """``real`` (a loss function) whose n-th call returns ``value`` for n in ``calls`` or n > ``after``."""
    count = {"n": 0}

    def loss(*args: Any) -> Any:
        count["n"] += 1
        out = real(*args)
        if isinstance(out, tuple):
            return tuple(o * value if count["n"] in (calls or ()) or (after and count["n"] > after) else o for o in out)
        return out * value if count["n"] in (calls or ()) or (after is not None and count["n"] > after) else out

    return loss


def _all_finite(state: dict[str, Any]) -> bool:
    tensors = [*state["G"].values(), *state["D"].values(), *state["ema"].values()]
    for opt in ("opt_g", "opt_d"):
        tensors += [v for slot in state[opt]["state"].values() for v in slot.values() if torch.is_tensor(v)]
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


@pytest.mark.parametrize(("net", "value"), [("G", float("nan")), ("D", float("inf"))])
def test_skip_drops_the_update_with_a_non_finite_loss_and_logs_it(
    tiny_config, capsys: pytest.CaptureFixture[str], net: str, value: float
) -> None:
    if net == "G":
        losses = GanLoss(HINGE.discriminator, _poisoned(HINGE.generator, calls={3}, value=value))
    else:
        losses = GanLoss(_poisoned(HINGE.discriminator, calls={3}, value=value), HINGE.generator)
    cfg = tiny_config(train__steps=5, train__checkpoint_every=1, train__nonfinite="skip")
    run_dir = train(cfg, hooks=Hooks(losses=losses))
    assert f"non-finite {net} loss or gradient at step 3 (1 of 10): that {net} update is skipped" in (
        capsys.readouterr().err
    )
    for path in checkpoint.list_checkpoints(run_dir):
        assert _all_finite(checkpoint.load_checkpoint(path))
    state = _final(run_dir)
    steps = {"G": state["opt_g"]["state"][0]["step"], "D": state["opt_d"]["state"][0]["step"]}
    assert steps == {"G": 4 if net == "G" else 5, "D": 4 if net == "D" else 5}  # exactly one update dropped
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("nonfinite/events", 0) for r in records] == [0, 0, 1, 1, 1]
    assert all(isinstance(r["g_loss"], float) for r in records if "g_loss" in r)


def test_rollback_after_a_transient_nan_ends_where_an_uninterrupted_run_does(
    tiny_config, tmp_path: Path, assert_trees_equal
) -> None:
    common = {"train__steps": 6, "train__checkpoint_every": 2, "sparse__method": "stu", "sparse__update_every": 2}
    common |= {"sparse__density_g": 0.5, "sparse__density_d": 0.5, "train__ema_start": 1}
    straight = train(tiny_config(tmp_path / "straight", **common))
    # The 5th G loss is NaN once: the run rolls back to step 4 and replays step 5 without it.
    poisoned = Hooks(losses=GanLoss(HINGE.discriminator, _poisoned(HINGE.generator, calls={5})))
    rolled = train(tiny_config(tmp_path / "rolled", train__nonfinite="rollback", **common), hooks=poisoned)
    a, b = _final(rolled), _final(straight)
    for key in ("step", "position", "G", "D", "ema", "opt_g", "opt_d", "masks"):
        assert_trees_equal(a[key], b[key], key)
    records = [json.loads(line) for line in (rolled / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r.get("nonfinite/events", 0) for r in records] == [0, 0, 0, 0, 1, 1]


def test_a_nan_that_comes_back_after_a_rollback_stops_the_run_without_a_checkpoint_of_it(tiny_config) -> None:
    poisoned = Hooks(losses=GanLoss(HINGE.discriminator, _poisoned(HINGE.generator, after=2)))
    cfg = tiny_config(train__steps=6, train__checkpoint_every=2, train__nonfinite="rollback")
    with pytest.raises(NonFiniteError, match=r"at step 3 .*came back at the same step after a rollback"):
        train(cfg, hooks=poisoned)
    assert [p.name for p in checkpoint.list_checkpoints(cfg.run_dir)] == ["step-00000002.pt"]


def test_skipping_stops_past_max_nonfinite_with_exit_4(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from sgtrain.__main__ import run_guarded, train_config\n"
        "from sgtrain.losses import HINGE, GanLoss\n"
        "from sgtrain.train import Hooks, train\n"
        "nan = GanLoss(HINGE.discriminator, lambda *a: HINGE.generator(*a) * float('nan'))\n"
        "cfg = train_config(sys.argv[1:])\n"
        "sys.exit(run_guarded(lambda: train(cfg, hooks=Hooks(losses=nan))))\n"
    )
    args = [*TINY_ARGS, "--data.shards=null", "--train.steps=10", "--train.max_nonfinite=3"]
    args += [f"--run_dir={tmp_path / 'run'}", "--train.checkpoint_every=1"]
    result = subprocess.run([sys.executable, "-c", code, *args], env=ENV, capture_output=True, text=True)
    assert result.returncode == 4, result.stderr[-2000:]
    assert "sgtrain: error: non-finite G loss or gradient at step 4 (4 of 3)" in result.stderr
    for path in checkpoint.list_checkpoints(tmp_path / "run"):
        assert _all_finite(checkpoint.load_checkpoint(path))


def test_a_checkpoint_with_a_nan_in_it_is_never_written(tiny_config) -> None:
    def poison_ema(step: int, gan: Any, result: Any) -> None:
        if step == 4:  # a NaN that no loss or gradient showed: straight into the EMA's weights
            next(iter(gan.ema.module.parameters())).data[0] = float("nan")

    cfg = tiny_config(train__steps=6, train__checkpoint_every=2)
    with pytest.raises(NonFiniteError, match="the state of step 4 holds a NaN or Inf: its checkpoint is not written"):
        train(cfg, hooks=Hooks(after_iteration=poison_ema))
    assert [p.name for p in checkpoint.list_checkpoints(cfg.run_dir)] == ["step-00000002.pt"]


# --------------------------------------------------------------------------------------------------------------------
# 5. A rank that dies.


def _rank_one_dies(rank: int, cfg_dict: dict[str, Any], out_dir: str) -> None:
    from sgtrain.config import config_from_dict

    hooks = Hooks()
    if rank == 1:  # rank 1 vanishes at its 3rd G loss, as a process killed by the OOM killer would
        count = {"n": 0}

        def dying(*args: Any) -> Any:
            count["n"] += 1
            if count["n"] == 3:
                os._exit(9)
            return HINGE.generator(*args)

        hooks = Hooks(losses=GanLoss(HINGE.discriminator, dying))
    started = time.monotonic()
    try:
        train(config_from_dict(cfg_dict), hooks=hooks)
    finally:
        Path(out_dir, f"rank{rank}.txt").write_text(str(time.monotonic() - started))


def test_when_one_rank_dies_the_other_exits_non_zero_instead_of_hanging(tiny_config, tmp_path: Path) -> None:
    from sgtrain.config import config_to_dict

    cfg = tiny_config(tmp_path / "run", train__steps=50, train__collective_timeout_s=20)
    results = run_ranks(_rank_one_dies, config_to_dict(cfg), str(tmp_path), timeout=120)
    assert results[1].exitcode == 9
    assert results[0].exitcode not in (0, None), "rank 0 hung or finished without its peer"
    assert float((tmp_path / "rank0.txt").read_text()) < 20 + 30  # within the timeout (plus start-up)


# --------------------------------------------------------------------------------------------------------------------
# 7. Bad input: one clear line, exit 2, nothing overwritten.


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    assert main([*TINY_ARGS, "--data.shards=null", "--train.steps=2", f"--run_dir={run_dir}"]) == 0
    return run_dir


def _bad_inputs(tmp: Path, finished: Path) -> dict[str, tuple[list[str], str]]:
    good = tmp / "good"
    write_shards(good, shards=2, per_shard=8, size=32)
    bare = tmp / "bare"  # no manifest: classes are only seen when read
    write_shards(bare, shards=2, per_shard=8, size=32, manifest=False)
    small = tmp / "small"
    write_shards(small, shards=2, per_shard=8, size=16, manifest=False)
    garbage = tmp / "garbage"
    garbage.mkdir()
    for i in range(2):
        (garbage / f"train-{i:06d}.tar").write_bytes(os.urandom(4096))
    (tmp / "typo.yaml").write_text("train:\n  stpes: 10\n")
    run = ["--train.steps=2", f"--run_dir={tmp / 'new-run'}"]
    two_classes = ["--train.sample_classes=2"]
    return {
        "unknown key": (["--train.bogus=1", *run], "unknown config key train.bogus; valid keys:"),
        "mistyped key": (["--config", str(tmp / "typo.yaml"), *run], "unknown config key train.stpes; did you mean"),
        "wrong type": (["--train.steps=many", *run[1:]], "train.steps must be an integer, got 'many'"),
        "out of range": (["--sparse.density_g=1.5", *run], "sparse.density_g must be in (0, 1], got 1.5"),
        "missing config file": (["--config", str(tmp / "nope.yaml"), *run], "nope.yaml"),
        "no shards there": ([f"--data.shards={tmp / 'none'}/train-{{0..3}}.tar", *run], "do not exist"),
        "corrupt shards": ([f"--data.shards={garbage}/train-{{000000..000001}}.tar", *run], "not a readable tar shard"),
        "image of the wrong size": ([f"--data.shards={small}/train-{{000000..000001}}.tar", *run], "is 16x16 px"),
        "more classes than the model": (
            [f"--data.shards={good}", "--model.n_classes=2", "--train.sample_classes=2", *run],
            "data.shards hold 10 classes but model.n_classes is smaller",
        ),
        "class out of range": (
            [f"--data.shards={bare}/train-{{000000..000001}}.tar", "--model.n_classes=2", *two_classes, *run],
            "but model.n_classes is 2",
        ),
        "incompatible run dir": (
            ["--model.g_ch=8", f"--run_dir={finished}", "--train.steps=4"],
            "model.g_ch: 4 in the checkpoint, 8 now); use a new run_dir",
        ),
    }


BAD_INPUTS = [
    "unknown key",
    "mistyped key",
    "wrong type",
    "out of range",
    "missing config file",
    "no shards there",
    "corrupt shards",
    "image of the wrong size",
    "more classes than the model",
    "class out of range",
    "incompatible run dir",
]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_clear_line_and_exit_2_with_nothing_overwritten(
    case: str, tmp_path: Path, finished_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    extra, expected = _bad_inputs(tmp_path, finished_run)[case]
    base = [a for a in TINY_ARGS if not any(a.startswith(e.split("=")[0] + "=") for e in extra)]
    before = _files(finished_run)
    capsys.readouterr()
    assert main([*base, "--data.num_workers=0", *extra]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("sgtrain: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert expected in lines[0], lines[0]
    assert _files(finished_run) == before
    new = tmp_path / "new-run"
    for path in checkpoint.list_checkpoints(new):
        pytest.fail(f"{path} was written by a run with bad input")
