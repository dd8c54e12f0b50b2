"""`sgtrain export`: the sparse generator file decodes to the EMA state dict exactly, samples identically, is small."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sgtrain import checkpoint
from sgtrain.__main__ import main
from sgtrain.codec import FORMAT, rice_bits, rice_decode, rice_encode
from sgtrain.config import ConfigError, load_config
from sgtrain.export import export_generator
from sgtrain.generators import load_exported, load_generator, read_exported
from sgtrain.sampling import class_grid, generate
from sgtrain.sparse.topology import random_mask, unpack_mask
from sgtrain.train import train

SPARSE = {
    "model.g_ch": 4,
    "model.d_ch": 4,
    "model.dim_z": 20,
    "model.shared_dim": 8,
    "train.batch_size": 8,
    "sparse.method": "stu",
    "sparse.targets": "conv_linear",  # G's linear layer masked too: the export codes masked linear layers as well
    "sparse.density_g": 0.2,
    "sparse.density_d": 0.5,
    "sparse.update_every": 2,
    "train.steps": 4,
    "train.ema_start": 1,
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train(load_config(None, {**SPARSE, "run_dir": str(tmp_path_factory.mktemp("run"))}))


@pytest.fixture(scope="module")
def exported(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("export") / "G.sgt"
    return out, export_generator(run_dir, out)


def _read(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The raw tensors and metadata of a safetensors file (to tamper with)."""
    with safe_open(str(path), framework="pt") as handle:
        names = handle.keys()
        return handle.metadata(), {name: handle.get_tensor(name) for name in names}


# ---------------------------------------------------------------------------------------------------------------------
# Exactness.


def test_the_file_decodes_to_the_checkpoints_ema_state_dict_exactly(run_dir: Path, exported: tuple[Path, dict]) -> None:
    out, summary = exported
    source, state = checkpoint.load_run_or_file(run_dir)
    metadata, decoded = read_exported(out)
    assert decoded.keys() == state["ema"].keys()
    for name, tensor in state["ema"].items():
        assert decoded[name].dtype == tensor.dtype and torch.equal(decoded[name], tensor), name

    assert metadata["format"] == FORMAT and int(metadata["step"]) == state["step"] == 4
    assert metadata["source_sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert json.loads(metadata["config"]) == state["config"]
    # Every G layer with a mask below density 1 is coded, with the mask's exact count (the EMA saw that mask).
    expected = {}
    for key, entry in state["masks"]["layers"].items():
        if key.startswith("G."):
            name = f"{key[2:]}.weight"
            mask = unpack_mask(entry["ema_mask"], state["ema"][name].shape)
            if not bool(mask.all()):
                expected[name] = int(mask.sum())
    layers = json.loads(metadata["layers"])
    assert {name: info["nnz"] for name, info in layers.items()} == expected and len(expected) >= 5
    assert all(summary["layers"][name]["coded"] for name in expected)
    assert summary["layers"]["linear.weight"] == {"numel": 1280, "nnz": 1280, "density": 1.0, "coded": False}
    assert summary["file_bytes"] == out.stat().st_size < 0.6 * summary["dense_bytes"]


def test_active_zeros_and_negative_zeros_survive_the_export(run_dir: Path, tmp_path: Path) -> None:
    """An active weight that is exactly 0 stays a position (nnz is the mask's); a -0.0 keeps its sign bit."""
    _, state = checkpoint.load_run_or_file(run_dir)
    weight = state["ema"]["blocks.0.conv1.weight"].reshape(-1)
    mask = unpack_mask(state["masks"]["layers"]["G.blocks.0.conv1"]["ema_mask"], weight.shape)
    active, inactive = int(mask.nonzero()[0]), int((~mask).nonzero()[0])
    weight[active], weight[inactive] = 0.0, -0.0
    path = checkpoint.save_checkpoint(tmp_path / "edited", 4, state, keep=1)
    summary = export_generator(path, tmp_path / "G.sgt")
    _, decoded = read_exported(tmp_path / "G.sgt")
    restored = decoded["blocks.0.conv1.weight"].reshape(-1)
    assert torch.equal(restored.view(torch.int32), weight.view(torch.int32))  # bit for bit, -0.0 included
    assert summary["layers"]["blocks.0.conv1.weight"]["nnz"] == int(mask.sum()) + 1


def test_samples_from_the_file_equal_the_run_s(run_dir: Path, exported: tuple[Path, dict]) -> None:
    from_run, from_file = load_generator(run_dir), load_exported(exported[0])
    assert not from_file.module.training and from_file.step == from_run.step and from_file.cfg == from_run.cfg
    for options in ({"truncation": None}, {"truncation": 0.5, "interpolate": True}):
        grids = [class_grid(g, classes=[0, 3, 9], per_class=4, seed=1, **options) for g in (from_run, from_file)]
        assert torch.equal(*grids)
    m = from_run.cfg.model
    options = {"dim_z": m.dim_z, "n_classes": m.n_classes, "seed": 2, "truncation": 1.0, "batch_size": 5}
    (a, ya), (b, yb) = (generate(g.module, [0, 7, 11, 12, 40, 41], **options) for g in (from_run, from_file))
    assert torch.equal(a, b) and torch.equal(ya, yb)


def test_cli_sample_from_the_file_writes_the_same_png(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sgt = tmp_path / "G.sgt"
    assert main(["export", str(run_dir), "--out", str(sgt)]) == 0
    line = capsys.readouterr().out
    assert line.count("\n") == 1 and f"{sgt}: " in line and "size goal met in" in line
    grids = {}
    for name, source in {"run": [str(run_dir)], "from": ["--from", str(sgt)], "eq": [f"--from={sgt}"]}.items():
        grids[name] = tmp_path / f"{name}.png"
        assert main(["sample", *source, "--out", str(grids[name]), "--classes", "1,2", "--truncation", "0.7"]) == 0
    assert grids["run"].read_bytes() == grids["from"].read_bytes() == grids["eq"].read_bytes()
    assert f"EMA generator of {sgt} (step 4)" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------------
# The position code.


def _roundtrip(mask: np.ndarray) -> tuple[int, int]:
    indices = np.flatnonzero(mask)
    k, quotients, remainders = rice_encode(indices)
    decoded = rice_decode(quotients, remainders, nnz=len(indices), k=k, numel=mask.size)
    assert decoded.dtype == np.int64 and np.array_equal(decoded, indices)
    bits = 8 * (len(quotients) + len(remainders))
    assert bits - 16 < rice_bits(indices)[k] <= bits and rice_bits(indices)[k] == rice_bits(indices).min()
    return k, bits


@pytest.mark.parametrize("density", [0.01, 0.03, 0.1, 0.25, 0.5, 0.75, 0.9])
@pytest.mark.parametrize("numel", [1, 7, 8, 1000, 40_000])
def test_rice_code_round_trips_random_masks(density: float, numel: int) -> None:
    generator = torch.Generator().manual_seed(numel + round(density * 100))
    _roundtrip(random_mask((numel,), round(density * numel), generator).numpy())


@pytest.mark.parametrize("numel", [1, 9, 1000])
def test_rice_code_edge_cases(numel: int) -> None:
    empty = np.zeros(numel, dtype=bool)
    assert _roundtrip(empty) == (0, 0)
    assert _roundtrip(np.ones(numel, dtype=bool)) == (0, 8 * math.ceil(numel / 8))  # one terminating 0 per weight
    for position in (0, numel - 1):
        one = empty.copy()
        one[position] = True
        _roundtrip(one)
    ends = empty.copy()
    ends[[0, -1]] = True
    _roundtrip(ends)


def test_rice_decode_rejects_inconsistent_streams() -> None:
    k, quotients, remainders = rice_encode(np.array([3, 10, 50, 51]))
    with pytest.raises(ValueError, match="quotient stream"):
        rice_decode(quotients, remainders, nnz=5, k=k, numel=100)  # more codes than the stream holds
    with pytest.raises(ValueError, match="remainder bytes"):
        rice_decode(quotients, remainders[:-1], nnz=4, k=k, numel=100)
    with pytest.raises(ValueError, match="beyond"):
        rice_decode(quotients, remainders, nnz=4, k=k, numel=51)
    with pytest.raises(ValueError, match="quotient stream"):
        rice_decode(np.append(quotients, np.uint8(0)), remainders, nnz=4, k=k, numel=100)  # trailing junk


# Position bits per non-zero on a 256x256x3x3 layer: the entropy bound H(p)/p is 2.00 / 3.61 / 4.69 / 5.73.
@pytest.mark.parametrize(("density", "k", "max_bits"), [(0.5, 0, 2.01), (0.2, 2, 3.72), (0.1, 3, 4.78), (0.05, 4, 5.8)])
def test_coded_layers_meet_the_size_goal(density: float, k: int, max_bits: float) -> None:
    shape = (256, 256, 3, 3)
    numel = math.prod(shape)
    mask = random_mask(shape, round(density * numel), torch.Generator().manual_seed(0)).reshape(-1).numpy()
    got_k, bits = _roundtrip(mask)
    nnz = int(mask.sum())
    assert got_k == k and bits / nnz <= max_bits
    # Values (float32) plus positions within 1.2 x density x the dense bytes: positions get 0.2 x 32 = 6.4 bits.
    assert 4 * nnz + bits / 8 <= 1.2 * density * 4 * numel


# ---------------------------------------------------------------------------------------------------------------------
# Bad files and overwriting.


def test_export_refuses_to_overwrite_without_force(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "G.sgt"
    out.write_bytes(b"keep me")
    assert main(["export", str(run_dir), "--out", str(out)]) == 2
    assert out.read_bytes() == b"keep me"
    assert main(["export", str(run_dir), "--out", str(out), "--force"]) == 0
    assert read_exported(out)[0]["format"] == FORMAT


def _tampered(exported: tuple[Path, dict], tmp_path: Path) -> dict[str, Path]:
    source = exported[0]
    data = source.read_bytes()
    files = {"garbage": b"not a safetensors file", "truncated": data[:-100], "cut header": data[:1000]}
    paths = {name: tmp_path / f"{name.replace(' ', '-')}.sgt" for name in files}
    for name, content in files.items():
        paths[name].write_bytes(content)
    metadata, tensors = _read(source)
    layers = json.loads(metadata["layers"])
    name = next(iter(layers))
    variants = {
        "other format": ({**metadata, "format": "something-else/1"}, tensors),
        "count": (
            {**metadata, "layers": json.dumps({**layers, name: {**layers[name], "nnz": layers[name]["nnz"] + 1}})},
            tensors,
        ),
        "stream": (metadata, {**tensors, f"{name}:rice_q": tensors[f"{name}:rice_q"][:-1].clone()}),
        "missing": (metadata, {key: t for key, t in tensors.items() if key != f"{name}:values"}),
        "shape": ({**metadata, "layers": json.dumps({**layers, name: {**layers[name], "shape": [4, 4]}})}, tensors),
        "transposed": (
            {
                **metadata,
                "layers": json.dumps({**layers, name: {**layers[name], "shape": layers[name]["shape"][::-1]}}),
            },
            tensors,
        ),
    }
    for variant, (meta, content) in variants.items():
        paths[variant] = tmp_path / f"{variant.replace(' ', '-')}.sgt"
        save_file(content, str(paths[variant]), metadata=meta)
    return paths


def test_bad_files_are_refused_with_one_clear_message(
    exported: tuple[Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    messages = {
        "garbage": "unreadable generator export",
        "truncated": "unreadable generator export",
        "cut header": "unreadable generator export",
        "other format": "not an sgtrain generator export",
        "count": "inconsistent generator export",
        "stream": "inconsistent generator export",
        "missing": "inconsistent generator export",
        "shape": "inconsistent generator export",
        "transposed": "its tensors do not fit the generator of its config",
    }
    paths = _tampered(exported, tmp_path)
    for name, path in paths.items():
        with pytest.raises(ConfigError, match=messages[name]):
            load_exported(path)
    capsys.readouterr()
    assert main(["sample", "--from", str(paths["count"]), "--out", str(tmp_path / "x.png")]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"sgtrain: error: {paths['count']}: inconsistent") and error.count("\n") == 1
    assert not (tmp_path / "x.png").exists()
