"""Streaming from tar shards: disjoint slots covering an epoch once, exact resume, corrupt samples, bad input.

Every image here is a solid grey level that encodes its sample's index (PNG, so exactly), so a test can tell which
samples a loader read from the pixels alone.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sgtrain.config import ConfigError
from sgtrain.data.stream import DataError, ShardLoader, resolve_shards

RES = 8


def _png(value: int, size: int = RES) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_shards(
    directory: Path,
    shards: int,
    per_shard: int,
    *,
    manifest: bool = True,
    corrupt: tuple[int, ...] = (),
    size: int = RES,
) -> int:
    """``shards`` tar files of ``per_shard`` samples; sample i is grey level i with class i % 10."""
    import webdataset as wds

    directory.mkdir(parents=True, exist_ok=True)
    entries = []
    for s in range(shards):
        name = f"train-{s:06d}.tar"
        with wds.TarWriter(str(directory / name)) as sink:
            for j in range(per_shard):
                i = s * per_shard + j
                image = b"not an image" if i in corrupt else _png(i, size)
                sink.write({"__key__": f"{i:09d}", "png": image, "cls": str(i % 10).encode()})
        entries.append({"name": name, "count": per_shard, "sha256": ""})
    if manifest:
        content = {"format": "sgtrain-shards/1", "resolution": size, "num_classes": 10, "shards": entries}
        (directory / "manifest.json").write_text(json.dumps(content))
    return shards * per_shard


def _indices(images: torch.Tensor) -> list[int]:
    """The sample index each image encodes (its grey level)."""
    values = ((images[:, 0, 0, 0] + 1.0) * 127.5).round().long()
    assert torch.equal(images, (values.float() / 127.5 - 1.0)[:, None, None, None].expand_as(images))
    return values.tolist()


def _loader(shards: str, **options) -> ShardLoader:
    settings = dict(seed=3, rank=0, world_size=1, workers=0, batch_size=3, resolution=RES, num_classes=10)
    settings.update(options)
    return ShardLoader(resolve_shards(shards), **settings)


def _read(loader: ShardLoader, batches: int) -> list[int]:
    out = []
    for _ in range(batches):
        images, labels = loader.next()
        indices = _indices(images)
        assert labels.tolist() == [i % 10 for i in indices]
        out.extend(indices)
    return out


def test_two_ranks_by_two_workers_read_disjoint_samples_covering_the_epoch_once(tmp_path: Path) -> None:
    total = write_shards(tmp_path, shards=8, per_shard=5)
    seen = []
    for rank in range(2):
        # Each of the 4 (rank, worker) slots owns 2 shards = 10 samples = 2 batches of 5: 4 batches per rank.
        loader = _loader(str(tmp_path), rank=rank, world_size=2, workers=2, batch_size=5)
        seen.append(_read(loader, 4))
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(total))
    # Shuffled: not the file order, and another seed gives another order.
    assert seen[0] != sorted(seen[0])
    other = _read(_loader(str(tmp_path), rank=0, world_size=2, workers=2, batch_size=5, seed=4), 4)
    assert other != seen[0] and sorted(other) == sorted(seen[0])


@pytest.mark.parametrize(
    ("workers", "manifest", "resampled"),
    [(0, True, False), (2, True, False), (2, False, False), (2, True, True)],
)
def test_a_resumed_stream_continues_with_exactly_the_samples_of_an_uninterrupted_one(
    tmp_path: Path, workers: int, manifest: bool, resampled: bool
) -> None:
    write_shards(tmp_path, shards=6, per_shard=7, manifest=manifest)
    options = {"workers": workers, "resampled": resampled}
    whole = _read(_loader(str(tmp_path), **options), 25)  # 75 samples: past the first epoch of every worker
    for stop in (1, 5, 11):
        first = _loader(str(tmp_path), **options)
        head = _read(first, stop)
        state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint carries it
        tail = _read(_loader(str(tmp_path), state=state, **options), 25 - stop)
        assert head + tail == whole, f"stopped after {stop} batches"


def test_every_epoch_is_a_new_order_of_the_same_samples(tmp_path: Path) -> None:
    total = write_shards(tmp_path, shards=3, per_shard=4)
    read = _read(_loader(str(tmp_path), batch_size=4), 6)
    first, second = read[:total], read[total:]
    assert sorted(first) == sorted(second) == list(range(total))
    assert first != second


def test_corrupt_samples_are_skipped_and_counted_then_stop_the_run(tmp_path: Path) -> None:
    write_shards(tmp_path, shards=2, per_shard=10, corrupt=(3, 14))
    loader = _loader(str(tmp_path), batch_size=6, max_bad_fraction=0.5)
    read = _read(loader, 3)
    assert sorted(read) == sorted(set(range(20)) - {3, 14})
    assert loader.state_dict()["bad"] == 2 and loader.state_dict()["good"] == 18

    many = tmp_path / "many"
    write_shards(many, shards=2, per_shard=20, corrupt=tuple(range(0, 40, 2)))  # half of them
    loader = _loader(str(many), batch_size=4, max_bad_fraction=0.1)
    with pytest.raises(DataError, match=r"could not be decoded, more than data\.max_bad_fraction=0\.1"):
        _read(loader, 10)


def test_bad_shard_specifications_fail_at_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="names no shards"):
        resolve_shards(str(tmp_path))  # an empty directory
    write_shards(tmp_path / "d", shards=2, per_shard=2)
    with pytest.raises(ConfigError, match="1 of 3 shards do not exist"):
        resolve_shards(str(tmp_path / "d" / "train-{000000..000002}.tar"))
    with pytest.raises(ConfigError, match="2 shards for 2 ranks x 2 workers"):
        _loader(str(tmp_path / "d"), world_size=2, workers=2)
    (tmp_path / "d" / "manifest.json").write_text("{}")
    with pytest.raises(ConfigError, match="is not an sgtrain shard manifest"):
        resolve_shards(str(tmp_path / "d"))


def test_wrong_size_or_class_stops_with_the_shard_named(tmp_path: Path) -> None:
    write_shards(tmp_path, shards=1, per_shard=4)
    with pytest.raises(DataError, match=r"train-000000.tar: sample \d+ is 8x8 px, the run trains at 16 px"):
        _read(_loader(str(tmp_path), resolution=16), 1)
    with pytest.raises(DataError, match=r"has class [23], but model.n_classes is 2"):
        _read(_loader(str(tmp_path), batch_size=4, num_classes=2), 1)


def test_brace_patterns_and_pipe_urls_read_the_same_samples(tmp_path: Path) -> None:
    write_shards(tmp_path, shards=3, per_shard=4, manifest=False)
    pattern = _read(_loader(str(tmp_path / "train-{000000..000002}.tar"), batch_size=4), 3)
    piped = _read(_loader(f"pipe:cat {tmp_path}/train-{{000000..000002}}.tar", batch_size=4), 3)
    assert pattern == piped and sorted(pattern) == list(range(12))


@pytest.mark.parametrize("workers", [0, 2])
def test_training_on_shards_resumes_exactly(tiny_config, tmp_path: Path, workers: int, assert_trees_equal) -> None:
    """A run on shards stopped after 3 steps and resumed to 6 equals 6 uninterrupted steps, bit for bit: the
    checkpoint carries each worker's position in its stream."""
    from sgtrain import checkpoint
    from sgtrain.train import train

    write_shards(tmp_path / "shards", shards=4, per_shard=9, size=32)
    common = {"data__shards": str(tmp_path / "shards"), "data__num_workers": workers, "train__d_steps": 2}
    train(tiny_config(tmp_path / "split", train__steps=3, **common))
    train(tiny_config(tmp_path / "split", train__steps=6, **common))
    train(tiny_config(tmp_path / "straight", train__steps=6, **common))
    a, b = (checkpoint.load_checkpoint(checkpoint.list_checkpoints(tmp_path / d)[-1]) for d in ("split", "straight"))
    for key in ("step", "position", "G", "D", "ema", "opt_g", "opt_d", "data"):
        assert_trees_equal(a[key], b[key], key)
    # 6 steps x 2 D steps x 8 images = 96 samples from 36: every worker went round its shards more than once.
    assert sum(a["data"]["ranks"][0]["offsets"]) == 96 and a["data"]["ranks"][0]["bad"] == 0


def test_shards_of_another_resolution_are_refused_at_start(tiny_config, tmp_path: Path) -> None:
    from sgtrain.train import train

    write_shards(tmp_path / "shards", shards=2, per_shard=2, size=16)
    with pytest.raises(ConfigError, match=r"data\.shards hold 16 px images"):
        train(tiny_config(data__shards=str(tmp_path / "shards"), train__steps=1))
    assert not (tmp_path / "run").exists()
