"""DeepSpeed ZeRO-1/2 engines for G and D, on 2 real processes over gloo (issue 4).

DeepSpeed is an optional dependency of sgtrain and part of the test extra, so CI runs these; where it is not
installed they are skipped, saying so.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from multiprocess import assert_all_succeeded, run_ranks
from test_distributed import ROOT, STU, _final_state, _train, tiny

from sgtrain.config import ConfigError, config_from_dict
from sgtrain.dist import deepspeed_config_from_env
from sgtrain.models.build import build_models
from sgtrain.sparse import MaskManager
from sgtrain.sparse.topology import unpack_mask

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install -e '.[test]' installs it)")

ZERO2 = ROOT / "launchers" / "deepspeed_zero2.json"
Z2 = {"zero_optimization": {"stage": 2}}


class Stop(Exception):
    """Raised on every rank at the same step: a kill after the last checkpoint, without a hang."""


def _train_deepspeed(rank: int, cfg: dict[str, Any], record_dir: str | None, ds_json: str, stop_at: int) -> None:
    if ds_json:  # what `accelerate launch --config_file launchers/deepspeed_zero2.yaml` exports
        os.environ.update(ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_CONFIG_FILE=ds_json)
    if stop_at:
        real_update = MaskManager.maybe_update

        def maybe_update(self: MaskManager, step: int) -> dict[str, float]:
            if step == stop_at:
                raise Stop
            return real_update(self, step)

        MaskManager.maybe_update = maybe_update  # type: ignore[method-assign]
    with contextlib.suppress(Stop):
        _train(rank, cfg, record_dir)


def _settings(**extra: Any) -> dict[str, Any]:
    # adam_eps 1e-4: see test_distributed.test_two_ranks_match_one_process_with_the_same_global_batch.
    return {
        "train.steps": 4,
        "train.accumulation": 2,
        "train.adam_eps": 1e-4,
        "train.checkpoint_every": 1,
        **STU,
        "sparse.grow_g": "gradient",
        "sparse.grow_d": "gradient",  # D's scores travel too
        "sparse.update_every": 1,
        "sparse.update_end": 1.0,
        **extra,
    }


def _assert_close_states(a: dict[str, Any], b: dict[str, Any], atol: float) -> None:
    for net in ("G", "D", "ema"):
        for name, x in a[net].items():
            y = b[net][name]
            if x.is_floating_point():
                torch.testing.assert_close(y, x, rtol=1e-4, atol=atol, msg=lambda m, n=f"{net}.{name}": f"{n}: {m}")
            else:
                assert torch.equal(x, y), f"{net}.{name}"
    for key, entry in a["masks"]["layers"].items():
        assert torch.equal(entry["mask"], b["masks"]["layers"][key]["mask"]), key
    for opt in ("opt_g", "opt_d"):
        assert a[opt]["param_groups"] == b[opt]["param_groups"], opt
        for index, slot in a[opt]["state"].items():
            other = b[opt]["state"][index]
            assert float(slot["step"]) == float(other["step"]), f"{opt}[{index}] step"
            for key in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(other[key], slot[key], rtol=1e-3, atol=atol, msg=f"{opt}[{index}].{key}")


@pytest.mark.parametrize(("stage", "mode"), [(1, "dense"), (2, "dense"), (1, "masked"), (2, "masked")])
def test_zero_matches_ddp_with_a_sparse_update(tmp_path: Path, stage: int, mode: str) -> None:
    """ZeRO engines train the same G, D, EMA, masks and Adam moments as DDP, within fp32 tolerance. Dense mode
    (the authors'): dense gradients into the engine, fp32 master copies re-masked after every step (else a grown
    weight would start from its master's drifted value, not zero). Masked mode: gradients masked in hooks, masters
    and moments cleared at changed weights, grown second moments seeded with the mean second moment of the weights
    kept active (gathered whole, the same on every rank).
    Local scores are summed onto owners in both.

    One topology update (after step 2 of 3): a weight grown at an update moves by the same ~2 lr at its first Adam
    step (beta1 = 0), so the next update's drop chooses among exact near-ties that fp32 noise decides; over several
    updates two correct runs part ways. ``test_zero2_keeps_masks_exact`` covers many updates by invariants instead.
    """
    config = json.loads(ZERO2.read_text())
    config["zero_optimization"]["stage"] = stage
    ds_json = tmp_path / "zero.json"
    ds_json.write_text(json.dumps(config))
    # G's rate decays over the last 2 steps: a rate set on a ZeRO engine's groups is the one its step uses.
    settings = _settings(
        **{"train.steps": 3, "sparse.update_every": 2, "sparse.optimizer_state": mode, "train.g_lr_decay_from": 0.34}
    )
    ddp, zero = tiny(tmp_path / "ddp", **settings), tiny(tmp_path / "zero", **settings)
    assert_all_succeeded(run_ranks(_train_deepspeed, ddp, None, "", 0))
    assert_all_succeeded(run_ranks(_train_deepspeed, zero, str(tmp_path), str(ds_json), 0))
    a, b = _final_state(tmp_path / "ddp"), _final_state(tmp_path / "zero")
    assert a["step"] == b["step"] == 3
    _assert_close_states(a, b, atol=5e-5)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert len(ranks[0]["updates"]) == 1 and ranks[0]["updates"] == ranks[1]["updates"]


@pytest.mark.parametrize("mode", ["dense", "masked"])
def test_zero2_keeps_masks_exact(tmp_path: Path, mode: str) -> None:
    """Four updates under ZeRO-2 with accumulation: every rank holds the same masks after each, and in the final
    checkpoint inactive weights and their EMA values are exactly zero, counts unchanged; in masked mode both Adam
    moments of inactive weights are zero too, in dense mode they are warm (Adam saw the dense gradients)."""
    cfg = tiny(tmp_path / "run", **_settings(**{"sparse.optimizer_state": mode}))
    assert_all_succeeded(run_ranks(_train_deepspeed, cfg, str(tmp_path), str(ZERO2), 0))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert len(ranks[0]["updates"]) == 4 and ranks[0]["updates"] == ranks[1]["updates"]
    state = _final_state(tmp_path / "run")
    config = config_from_dict(cfg)
    G, D = build_models(config.model, config.seed)
    names = {"G": [n for n, _ in G.named_parameters()], "D": [n for n, _ in D.named_parameters()]}  # Adam's order
    changed = warm = 0
    for key, entry in state["masks"]["layers"].items():
        net, layer = key.split(".", 1)
        weight = state[net][f"{layer}.weight"]
        mask = unpack_mask(entry["mask"], weight.shape)
        assert int(mask.sum()) == entry["count"], key
        assert not weight[~mask].any(), f"{key}: inactive weights are not zero"
        if net == "G":
            assert not state["ema"][f"{layer}.weight"][~mask].any(), f"{key}: inactive EMA weights are not zero"
        slot = state[f"opt_{net.lower()}"]["state"][names[net].index(f"{layer}.weight")]
        for moment in ("exp_avg", "exp_avg_sq"):
            if mode == "masked":
                assert not slot[moment][~mask].any(), f"{key}: {moment} of inactive weights is not zero"
            warm += int((slot[moment][~mask] != 0).sum())
        changed += int((unpack_mask(entry["union"], weight.shape) & ~mask).sum())
    assert changed > 0, "no weight ever left the topology: the test shows nothing"
    assert (warm > 0) == (mode == "dense"), f"{warm} non-zero moments of inactive weights in {mode} mode"


@pytest.mark.parametrize("mode", ["dense", "masked"])
def test_zero2_resume_is_exact(tmp_path: Path, assert_trees_equal, mode: str) -> None:
    """Stopped after the step-2 checkpoint and resumed under ZeRO-2: the same final state, bit for bit, as an
    uninterrupted ZeRO-2 run (moments are gathered into the checkpoint and scattered back into fresh engines)."""
    settings = _settings(**{"sparse.optimizer_state": mode})
    whole, split = tiny(tmp_path / "whole", **settings), tiny(tmp_path / "split", **settings)
    assert_all_succeeded(run_ranks(_train_deepspeed, whole, None, str(ZERO2), 0))
    assert_all_succeeded(run_ranks(_train_deepspeed, split, None, str(ZERO2), 3))
    assert _final_state(tmp_path / "split")["step"] == 2
    assert_all_succeeded(run_ranks(_train_deepspeed, split, None, str(ZERO2), 0))
    a, b = _final_state(tmp_path / "whole"), _final_state(tmp_path / "split")
    for key in ("G", "D", "ema", "masks", "opt_g", "opt_d", "step", "position"):
        assert_trees_equal(a[key], b[key], key)


def test_checkpoints_move_between_engines_and_world_sizes(tmp_path: Path) -> None:
    """A ZeRO-2 run on 2 ranks, stopped after step 2 and finished by one plain process, matches an uninterrupted
    2-rank DDP run within fp32 tolerance: its checkpoint holds whole tensors, not DeepSpeed partitions. (Static
    masks: with topology updates, near-tied choices would make two correct runs part ways; see above.)"""
    settings = _settings(**{"sparse.method": "static", "sparse.explore": "none"})
    whole, split = tiny(tmp_path / "whole", **settings), tiny(tmp_path / "split", **settings)
    assert_all_succeeded(run_ranks(_train_deepspeed, whole, None, "", 0))
    assert_all_succeeded(run_ranks(_train_deepspeed, split, None, str(ZERO2), 3))
    assert _final_state(tmp_path / "split")["step"] == 2
    assert_all_succeeded(run_ranks(_train_deepspeed, split, None, "", 0, world_size=1))
    a, b = _final_state(tmp_path / "whole"), _final_state(tmp_path / "split")
    assert a["step"] == b["step"] == 4 and a["position"] == b["position"]
    _assert_close_states(a, b, atol=5e-5)


def test_deepspeed_launcher_trains_the_sparse_default_on_two_ranks(tmp_path: Path) -> None:
    from multiprocess import free_port

    run_dir = tmp_path / "run"
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    launch = [sys.executable, "-m", "accelerate.commands.launch"]
    launch += ["--config_file", "launchers/deepspeed_zero2.yaml", "--main_process_port", str(free_port())]
    train_args = ["-m", "sgtrain", "--config", "digits.yaml", "--train.steps=4", "--sparse.update_every=2"]
    train_args += ["--train.log_every=1", "--model.g_ch=4", "--model.d_ch=4", f"--run_dir={run_dir}"]
    result = subprocess.run([*launch, *train_args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 2 processes (gloo, cpu, DeepSpeed ZeRO-2)" in result.stdout, result.stdout[-2000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 4 and all(r["world_size"] == 2 for r in records)
    assert records[1]["sparse/G_mask_change"] > 0  # the sparse default's G explored across both engines
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"zero_optimization": {"stage": 3}}, "ZeRO stage 3 shards the weights themselves"),
        ({"zero_optimization": {"stage": 0}}, "stages 1 and 2 are supported"),
        ({}, "stages 1 and 2 are supported"),
        ({**Z2, "bf16": {"enabled": True}}, "use sgtrain's train.mixed_precision: bf16"),
        ({**Z2, "fp16": {"enabled": "auto"}}, "fp16 is enabled"),
        ({**Z2, "optimizer": {"type": "Adam"}}, "remove the 'optimizer' block"),
    ],
)
def test_unsupported_deepspeed_configs_are_refused(tmp_path: Path, config: dict[str, Any], message: str) -> None:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=message):
        deepspeed_config_from_env({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(path)})


def test_deepspeed_config_from_env() -> None:
    assert deepspeed_config_from_env({}) is None
    env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(ZERO2)}
    assert deepspeed_config_from_env(env)["zero_optimization"]["stage"] == 2
    with pytest.raises(ConfigError, match="No such file"):
        deepspeed_config_from_env({**env, "ACCELERATE_DEEPSPEED_CONFIG_FILE": "/nonexistent/ds.json"})


def test_zero2_adapt_changes_ds_density_identically_on_every_rank(tmp_path: Path) -> None:
    """ADAPT under ZeRO-2 in masked mode: D grows twice and then explores at the strict cap (bounds that every ratio
    passes), with local scores summed onto owners and one threshold over the network; every rank holds the same
    masks after every change, D holds exactly its density's share, and inactive weights and moments are zero."""
    settings = {
        "train.steps": 8,
        "train.accumulation": 2,
        "train.adam_eps": 1e-4,
        "sparse.method": "adapt",
        "sparse.density_g": 0.3,
        "sparse.density_d": 0.3,
        "sparse.update_every": 3,
        "sparse.optimizer_state": "masked",
        "sparse.adapt.variant": "strict",
        "sparse.adapt.cap": 0.4,
        "sparse.adapt.lower": -2000.0,
        "sparse.adapt.upper": -1000.0,
        "sparse.adapt.sample_every": 1,
        "sparse.adapt.window": 2,
        "sparse.adapt.update_every": 2,
    }
    cfg = tiny(tmp_path / "run", **settings)
    assert_all_succeeded(run_ranks(_train_deepspeed, cfg, str(tmp_path), str(ZERO2), 0))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    # Updates after steps 2, 3, 4 and 6: D decides at 2, 4 and 6, G explores at 3 and 6.
    assert len(ranks[0]["updates"]) == 4 and ranks[0]["updates"] == ranks[1]["updates"]
    state = _final_state(tmp_path / "run")
    assert (
        state["masks"]["method_state"]["d_density"] == 0.4 and state["masks"]["method_state"]["decision"] == "explore"
    )
    config = config_from_dict(cfg)
    G, D = build_models(config.model, config.seed)
    names = {"G": [n for n, _ in G.named_parameters()], "D": [n for n, _ in D.named_parameters()]}
    active = total = 0
    for key, entry in state["masks"]["layers"].items():
        net, layer = key.split(".", 1)
        weight = state[net][f"{layer}.weight"]
        mask = unpack_mask(entry["mask"], weight.shape)
        assert int(mask.sum()) == entry["count"] and not weight[~mask].any(), key
        slot = state[f"opt_{net.lower()}"]["state"][names[net].index(f"{layer}.weight")]
        assert not slot["exp_avg"][~mask].any() and not slot["exp_avg_sq"][~mask].any(), key
        if net == "D":
            active, total = active + entry["count"], total + weight.numel()
    assert active == round(0.4 * total)
