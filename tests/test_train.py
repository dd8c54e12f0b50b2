"""The training loop: what one step changes, checkpoints, exact resume, refusing checkpoints that carry code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from stops import StopAfter

from sgtrain import checkpoint
from sgtrain.checkpoint import CheckpointError
from sgtrain.config import ConfigError
from sgtrain.models.build import build_models
from sgtrain.stopping import StoppedEarly
from sgtrain.train import train


def _last_state(run_dir: Path) -> dict:
    path = checkpoint.list_checkpoints(run_dir)[-1]
    return checkpoint.load_checkpoint(path)


@pytest.mark.parametrize("ema_buffers", ["average", "copy"])
def test_one_step_changes_g_d_and_ema_as_expected(tiny_config, ema_buffers: str) -> None:
    cfg = tiny_config(
        train__steps=1, train__d_steps=2, train__ema_start=0, train__ema_decay=0.9, train__ema_buffers=ema_buffers
    )
    G0, D0 = build_models(cfg.model, cfg.seed)
    train(cfg)
    state = _last_state(Path(cfg.run_dir))
    assert state["step"] == 1
    assert state["position"] == 2 * cfg.train.batch_size  # two D steps each read one global batch

    # Every G and D parameter moved (Adam's first step moves each weight with a non-zero gradient by ~lr).
    for name, p0 in G0.named_parameters():
        assert not torch.equal(state["G"][name], p0), f"G.{name} did not change"
    for name, p0 in D0.named_parameters():
        assert not torch.equal(state["D"][name], p0), f"D.{name} did not change"

    # D took two optimizer steps and G one: the G step did not update D.
    assert all(s["step"] == 2 for s in state["opt_d"]["state"].values())
    assert all(s["step"] == 1 for s in state["opt_g"]["state"].values())

    # EMA started at G's initial weights and took one step of decay 0.9 towards the new G; buffers are copied, or
    # averaged the same way (BigGAN-PyTorch's and the authors' EMA), all but BN's integer counts.
    for name, p0 in G0.named_parameters():
        expected = p0.detach().clone().lerp_(state["G"][name], 0.1)
        assert torch.equal(state["ema"][name], expected), name
    averaged = 0
    for name, b0 in G0.named_buffers():
        if ema_buffers == "copy" or not b0.is_floating_point():
            assert torch.equal(state["ema"][name], state["G"][name]), name
        else:
            assert torch.equal(state["ema"][name], b0.clone().lerp_(state["G"][name], 0.1)), name
            averaged += not torch.equal(state["ema"][name], state["G"][name])
    assert averaged > 0 or ema_buffers == "copy", "no buffer changed in the step: the test shows nothing"


def test_ema_copies_g_before_its_start(tiny_config, assert_trees_equal) -> None:
    cfg = tiny_config(train__steps=2, train__ema_start=10)
    train(cfg)
    state = _last_state(Path(cfg.run_dir))
    assert_trees_equal(state["ema"], state["G"])


def test_run_directory_contents(tiny_config) -> None:
    cfg = tiny_config(train__steps=4, train__sample_every=2, train__checkpoint_every=2, train__log_every=2)
    run_dir = train(cfg)
    assert (run_dir / "config.yaml").is_file()
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == ["step-00000002.png", "step-00000004.png"]
    assert [p.name for p in checkpoint.list_checkpoints(run_dir)] == ["step-00000002.pt", "step-00000004.pt"]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    for r in records:
        assert {"d_loss_real", "d_loss_fake", "g_loss", "images_per_s", "images_seen"} <= r.keys()
    assert records[-1]["images_seen"] == 4 * cfg.train.d_steps * cfg.train.batch_size


def test_last_k_checkpoints_kept(tiny_config) -> None:
    cfg = tiny_config(train__steps=5, train__checkpoint_every=1, train__keep_checkpoints=2)
    run_dir = train(cfg)
    assert [p.name for p in checkpoint.list_checkpoints(run_dir)] == ["step-00000004.pt", "step-00000005.pt"]
    leftovers = [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_save_load_round_trip_is_identical(tiny_config, tmp_path: Path, assert_trees_equal) -> None:
    cfg = tiny_config(train__steps=2)
    train(cfg)
    state = _last_state(Path(cfg.run_dir))
    checkpoint.save_checkpoint(tmp_path / "copy", 99, state, keep=1)
    again = checkpoint.load_checkpoint(checkpoint.list_checkpoints(tmp_path / "copy")[-1])
    assert_trees_equal(state, again)
    # And through the modules: loading the state into fresh models gives back the same tensors.
    G, D = build_models(cfg.model, cfg.seed)
    G.load_state_dict(state["G"])
    D.load_state_dict(state["D"])
    assert_trees_equal(G.state_dict(), state["G"])
    assert_trees_equal(D.state_dict(), state["D"])


@pytest.mark.parametrize("accumulation", [1, 2])
def test_stopped_and_resumed_equals_uninterrupted(
    tiny_config, tmp_path: Path, accumulation: int, assert_trees_equal
) -> None:
    n = 3
    common = {"train__d_steps": 2, "train__accumulation": accumulation, "train__ema_start": 1}
    split = tiny_config(tmp_path / "split", train__steps=n, **common)
    train(split)
    assert checkpoint.list_checkpoints(split.run_dir)[-1].name == f"step-{n:08d}.pt"
    resumed = tiny_config(tmp_path / "split", train__steps=2 * n, **common)
    train(resumed)
    straight = tiny_config(tmp_path / "straight", train__steps=2 * n, **common)
    train(straight)

    a, b = _last_state(tmp_path / "split"), _last_state(tmp_path / "straight")
    for key in ("step", "position", "flops", "G", "D", "ema", "opt_g", "opt_d", "masks"):
        assert_trees_equal(a[key], b[key], key)
    # The metrics log of the split run holds each step once.
    steps = [json.loads(line)["step"] for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 2 * n + 1))


def test_g_lr_decay_sets_g_alone_and_a_stopped_run_resumes_on_schedule(
    tiny_config, tmp_path: Path, assert_trees_equal
) -> None:
    common = {"train__steps": 4, "train__g_lr_decay_from": 0.25, "train__ema_start": 1}
    split = tiny_config(tmp_path / "split", **common)
    with pytest.raises(StoppedEarly):
        train(split, stop=StopAfter(2))
    train(split)
    train(tiny_config(tmp_path / "straight", **common))
    train(tiny_config(tmp_path / "constant", train__steps=4, train__ema_start=1, train__g_lr_decay_from=None))

    a, b = _last_state(tmp_path / "split"), _last_state(tmp_path / "straight")
    for key in ("G", "D", "ema", "opt_g", "opt_d"):
        assert_trees_equal(a[key], b[key], key)
    # The last G update ran at a third of G's rate (decay from step 1 of 4); D's rate never moved.
    assert [g["lr"] for g in b["opt_g"]["param_groups"]] == [pytest.approx(split.train.g_lr / 3)]
    assert [g["lr"] for g in b["opt_d"]["param_groups"]] == [split.train.d_lr]
    constant = _last_state(tmp_path / "constant")
    assert [g["lr"] for g in constant["opt_g"]["param_groups"]] == [split.train.g_lr]
    assert any(not torch.equal(b["G"][k], constant["G"][k]) for k in b["G"])


def test_resume_drops_metrics_logged_after_the_checkpoint(tiny_config) -> None:
    cfg = tiny_config(train__steps=2)
    run_dir = train(cfg)
    with open(run_dir / "metrics.jsonl", "a") as handle:  # as if the run had died after logging step 3
        handle.write(json.dumps({"step": 3, "g_loss": 0.0}) + "\n")
    train(tiny_config(train__steps=4))
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_resume_with_another_model_is_refused(tiny_config) -> None:
    train(tiny_config(train__steps=1))
    with pytest.raises(ConfigError, match=r"model\.g_ch: 4 in the checkpoint, 8 now\); use a new run_dir"):
        train(tiny_config(train__steps=2, model__g_ch=8))


def test_a_checkpoint_from_before_optimizer_state_resumes_only_in_masked_mode(tiny_config) -> None:
    """A checkpoint written before ``sparse.optimizer_state`` existed was trained in what is now masked mode: its
    config lacks the key, which reads as "masked", not as today's default."""
    from sgtrain.checkpoint import load_checkpoint, save_checkpoint

    sparse = {"sparse__method": "stu", "sparse__density_g": 0.5, "sparse__density_d": 0.5}
    run_dir = train(tiny_config(train__steps=1, sparse__optimizer_state="masked", **sparse))
    state = load_checkpoint(checkpoint.list_checkpoints(run_dir)[-1])
    for section, key in (("sparse", "optimizer_state"), ("sparse", "drop_fraction_min"), ("train", "ema_buffers")):
        del state["config"][section][key]  # as an older sgtrain wrote it
    save_checkpoint(run_dir, int(state["step"]), state, keep=1)
    with pytest.raises(ConfigError, match=r"sparse\.optimizer_state: 'masked' in the checkpoint, 'dense' now"):
        train(tiny_config(train__steps=2, **sparse))
    train(tiny_config(train__steps=2, sparse__optimizer_state="masked", **sparse))  # resumes
    assert checkpoint.load_checkpoint(checkpoint.list_checkpoints(run_dir)[-1])["step"] == 2


def test_damaged_latest_checkpoint_falls_back_to_the_previous(tiny_config) -> None:
    cfg = tiny_config(train__steps=2, train__checkpoint_every=1)
    run_dir = train(cfg)
    latest = checkpoint.list_checkpoints(run_dir)[-1]
    data = bytearray(latest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    latest.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="sha256 differs"):
        path, state = checkpoint.load_latest(run_dir)
    assert path.name == "step-00000001.pt" and state["step"] == 1
    latest.write_bytes(bytes(data[:100]))
    with pytest.raises(CheckpointError, match="truncated"):
        checkpoint.verify(latest)


class _RunsCode:
    """Unpickling this calls os.system: the classic malicious checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant_malicious_checkpoint(run_dir: Path, marker: Path, step: int = 5) -> Path:
    directory = checkpoint.checkpoint_dir(run_dir)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"step-{step:08d}.pt"
    torch.save({"step": step, "G": _RunsCode(marker)}, path)
    # A valid checksum record: the attacker controls the whole directory, so checksums cannot be the defence.
    meta = {"step": step, "bytes": path.stat().st_size, "sha256": checkpoint.file_sha256(path)}
    path.with_name(path.name + ".json").write_text(json.dumps(meta))
    return path


def test_checkpoint_that_would_run_code_is_refused(tiny_config, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    cfg = tiny_config(train__steps=1)
    path = _plant_malicious_checkpoint(Path(cfg.run_dir), marker)
    with pytest.raises(CheckpointError, match="refused to load"):
        checkpoint.load_checkpoint(path)
    with pytest.raises(CheckpointError, match="refused to load"):
        train(cfg)
    assert not marker.exists()
    # The fixture is a real attack: loading it the unsafe way does run the command.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_cli_refuses_malicious_checkpoint_with_exit_2(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    run_dir = tmp_path / "run"
    _plant_malicious_checkpoint(run_dir, marker)
    result = subprocess.run(
        [sys.executable, "-m", "sgtrain", f"--run_dir={run_dir}", "--model.g_ch=4", "--model.d_ch=4"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "refused to load" in result.stderr and "could run code" in result.stderr
    assert not marker.exists()


@pytest.mark.parametrize(
    ("name", "g_params", "d_params"),
    [("cifar10.yaml", 4_304_387, 4_207_361), ("imagenet128.yaml", 70_433_988, 87_982_370)],
)
def test_shipped_configs_build_the_published_models(name: str, g_params: int, d_params: int) -> None:
    """cifar10: 4.30M / 4.21M; imagenet128: 70.4M / 88.0M (BigGAN paper, reference code)."""
    from sgtrain.config import load_config
    from sgtrain.models import count_parameters

    cfg = load_config(name, {"model.init": "N02"})  # the count does not depend on init; ortho's QR costs ~9 s
    G, D = build_models(cfg.model, cfg.seed)
    assert (count_parameters(G), count_parameters(D)) == (g_params, d_params)
