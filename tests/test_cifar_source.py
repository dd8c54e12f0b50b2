"""The cifar10:PATH shard source on a tiny release in the official layout: exact pixels, labels and order, archive and
folder alike, and doctored pickles refused before they run anything."""

from __future__ import annotations

import io
import json
import os
import pickle
import pickletools
import re
import struct
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from sgtrain.config import ConfigError
from sgtrain.data.cifar import _reconstruct, read_cifar10
from sgtrain.data.shards import make_shards

LABEL_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
PER_BATCH = 4
TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
OFFICIAL_GLOBALS = {"numpy.core.multiarray _reconstruct", "numpy ndarray", "numpy dtype"}


class _Python2Pickler(pickle._Pickler):
    """Pickles as Python 2's cPickle wrote the official files: every string (bytes, or ASCII str) as a Python 2
    ``str`` (SHORT_BINSTRING / BINSTRING, which ``encoding="bytes"`` loads as bytes) and numpy's array
    reconstructor under its numpy 1.x name. (Python 3 would write bytes at protocol 2 as a call of
    ``_codecs.encode``, a global the real files never reference.)"""

    dispatch = pickle._Pickler.dispatch.copy()

    def __init__(self, file: io.BytesIO, reconstruct_module: str = "numpy.core.multiarray") -> None:
        super().__init__(file, protocol=2)
        self.reconstruct_module = reconstruct_module

    def _save_python2_str(self, obj: bytes | str) -> None:
        data = obj if isinstance(obj, bytes) else obj.encode("ascii")
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = _save_python2_str
    dispatch[str] = _save_python2_str

    def save_global(self, obj: Any, name: str | None = None) -> None:
        if obj is _reconstruct:
            self.write(pickle.GLOBAL + f"{self.reconstruct_module}\n_reconstruct\n".encode())
            self.memoize(obj)
            return
        super().save_global(obj, name)


def _python2_pickle(value: Any, reconstruct_module: str = "numpy.core.multiarray") -> bytes:
    buffer = io.BytesIO()
    _Python2Pickler(buffer, reconstruct_module).dump(value)
    return buffer.getvalue()


def _globals_of(data: bytes) -> set[str]:
    return {str(arg) for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}


def _batch(label: bytes, rows: np.ndarray, labels: list[int]) -> dict:
    names = [b"image_%04d.png" % i for i in range(len(rows))]
    return {b"batch_label": label, b"labels": labels, b"data": rows, b"filenames": names}


def _release_files(reconstruct_module: str = "numpy.core.multiarray") -> tuple[dict[str, bytes], dict[str, Any]]:
    """The files of a tiny release (4 images per batch) and the expected ``{split: (images HWC, labels)}``."""
    rng = np.random.default_rng(0)
    files, expected = {}, {}
    splits = {"train": TRAIN, "test": ["test_batch"]}
    for split, batches in splits.items():
        images, labels = [], []
        for index, name in enumerate(batches):
            rows = rng.integers(0, 256, (PER_BATCH, 3072), dtype=np.uint8)
            # Train labels cover 0..9, each batch different; the test batch repeats one class.
            batch_labels = (
                [(PER_BATCH * index + i) % 10 for i in range(PER_BATCH)] if split == "train" else [3, 1, 4, 1]
            )
            label = f"training batch {index + 1} of 5" if split == "train" else "testing batch 1 of 1"
            files[name] = _python2_pickle(_batch(label.encode(), rows, batch_labels), reconstruct_module)
            images.append(rows.reshape(PER_BATCH, 3, 32, 32).transpose(0, 2, 3, 1))
            labels += batch_labels
        expected[split] = (np.concatenate(images), labels)
    meta = {b"num_cases_per_batch": PER_BATCH, b"label_names": [n.encode() for n in LABEL_NAMES], b"num_vis": 3072}
    files["batches.meta"] = _python2_pickle(meta)
    files["readme.html"] = b"<html>not a pickle, never read</html>"
    return files, expected


def _folder(root: Path, files: dict[str, bytes]) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def _archive(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        top = tarfile.TarInfo("cifar-10-batches-py")
        top.type, top.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(top)
        # Members out of batch order, as in the official archive: the reader must not rely on it.
        for name in sorted(files, reverse=True):
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(files[name])
            tar.addfile(info, io.BytesIO(files[name]))
    return path


@pytest.fixture
def release(tmp_path: Path) -> dict[str, Any]:
    files, expected = _release_files()
    folder = _folder(tmp_path / "extracted", files)
    return {"archive": _archive(tmp_path / "cifar-10-python.tar.gz", files), "folder": folder, "expected": expected}


def _samples(out: Path) -> list[dict]:
    return list(wds.WebDataset([str(p) for p in sorted(out.glob("train-*.tar"))], shardshuffle=False))


def _shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name != "manifest.json"}


def test_fixture_pickles_look_like_the_official_files() -> None:
    # Only numpy's three globals and Python 2 strings: what the real data_batch_1 holds (the point of the fixture).
    files, _ = _release_files()
    for name in [*TRAIN, "test_batch"]:
        assert _globals_of(files[name]) == OFFICIAL_GLOBALS
        assert not {op.name for op, _, _ in pickletools.genops(files[name])} & {"BINUNICODE", "BINBYTES"}
    assert _globals_of(files["batches.meta"]) == set()


def test_train_split_exact(release: dict, tmp_path: Path) -> None:
    images, labels = release["expected"]["train"]
    out = tmp_path / "out"
    source = f"cifar10:{release['archive']}"
    manifest = make_shards(source, out, resolution=32, shard_size=8, image_format="png", workers=1, progress=False)
    assert manifest["source"] == source and manifest["num_samples"] == 5 * PER_BATCH == 20
    assert manifest["num_classes"] == 10 and manifest["per_class"] == [2] * 10
    assert [s["count"] for s in manifest["shards"]] == [8, 8, 4] and manifest["skipped"] == []
    assert json.loads((out / "classes.json").read_text()) == {name: i for i, name in enumerate(LABEL_NAMES)}
    samples = _samples(out)
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(20)]
    assert [int(s["cls"]) for s in samples] == labels  # batch 1's four, then batch 2's, ...
    for sample, pixels in zip(samples, images, strict=True):  # 32 px in, 32 px out, PNG: the exact pixels
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(sample["png"]))), pixels)


def test_test_split(release: dict, tmp_path: Path) -> None:
    images, labels = release["expected"]["test"]
    out = tmp_path / "out"
    manifest = make_shards(
        f"cifar10:{release['folder']}:test", out, resolution=32, image_format="png", workers=1, progress=False
    )
    assert manifest["num_samples"] == PER_BATCH and manifest["num_classes"] == 10
    assert manifest["per_class"] == [0, 2, 0, 1, 1, 0, 0, 0, 0, 0]  # classes from batches.meta, not renumbered
    samples = _samples(out)
    assert [int(s["cls"]) for s in samples] == labels == [3, 1, 4, 1]
    for sample, pixels in zip(samples, images, strict=True):
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(sample["png"]))), pixels)


def test_pixel_layout(tmp_path: Path) -> None:
    # Independent of the reader's reshape: a row is 1024 red, 1024 green, 1024 blue, each plane row by row.
    row = np.concatenate([np.full(1024, 10), np.full(1024, 20), np.full(1024, 30)]).astype(np.uint8)
    row[1] = 200  # red of (y 0, x 1)
    row[1024 + 32] = 210  # green of (y 1, x 0)
    row[2048 + 32 * 31 + 31] = 220  # blue of (y 31, x 31)
    files, _ = _release_files()
    files["test_batch"] = _python2_pickle(_batch(b"testing batch 1 of 1", row[None], [7]))
    path = tmp_path / "cifar-10-python.tar"
    with tarfile.open(path, "w") as tar:  # uncompressed, and a leading ./ in the names: read as well
        for name, data in files.items():
            info = tarfile.TarInfo(f"./cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    _, _, images, labels = read_cifar10(path, "test")
    assert labels.tolist() == [7] and images.shape == (1, 32, 32, 3) and images.flags.c_contiguous
    image = images[0]
    assert image[0, 1].tolist() == [200, 20, 30] and image[1, 0].tolist() == [10, 210, 30]
    assert image[31, 31].tolist() == [10, 20, 220] and image[5, 5].tolist() == [10, 20, 30]


def test_archive_and_folder_give_identical_shards(release: dict, tmp_path: Path) -> None:
    # JPEG at 16 px: the resize and the lossy path as well. The parent of the folder is accepted too.
    sources = [release["archive"], release["folder"], release["folder"].parent]
    outputs = []
    for index, path in enumerate(sources):
        out = tmp_path / f"out{index}"
        manifest = make_shards(f"cifar10:{path}", out, resolution=16, shard_size=6, workers=1, progress=False)
        outputs.append((_shard_bytes(out), {k: v for k, v in manifest.items() if k != "source"}))
    assert len(outputs[0][0]) == 5  # 4 shards and classes.json
    assert outputs[0] == outputs[1] == outputs[2]


def test_numpy2_spelling_is_accepted(tmp_path: Path) -> None:
    files, expected = _release_files(reconstruct_module="numpy._core.multiarray")
    assert "numpy._core.multiarray _reconstruct" in _globals_of(files["test_batch"])
    classes, names, images, labels = read_cifar10(_folder(tmp_path, files), "test")
    assert classes == LABEL_NAMES and names == [f"test_batch[{i}]" for i in range(PER_BATCH)]
    np.testing.assert_array_equal(images, expected["test"][0])
    assert labels.tolist() == expected["test"][1]


class _Payload:
    """Unpickles as ``function(*args)``: what a doctored batch would run."""

    def __init__(self, function: Any, *args: Any) -> None:
        self.function, self.args = function, args

    def __reduce__(self) -> tuple:
        return self.function, self.args


def _payloads(marker: Path) -> dict[str, tuple[_Payload, bool]]:
    """``{case: (payload, whether it writes marker when run)}``."""
    import builtins

    return {
        "os.system": (_Payload(os.system, f"touch '{marker}'"), True),
        "eval": (_Payload(builtins.eval, f"open({str(marker)!r}, 'w').close()"), True),
        "Popen": (_Payload(subprocess.Popen, ["touch", str(marker)]), False),
        "getattr": (_Payload(builtins.getattr, "text", "upper"), False),
    }


@pytest.mark.parametrize("case", ["os.system", "eval", "Popen", "getattr"])
@pytest.mark.parametrize("container", ["archive", "folder"])
def test_doctored_batch_is_refused_before_it_runs(tmp_path: Path, case: str, container: str) -> None:
    marker = tmp_path / "pwned"
    payload, writes_marker = _payloads(marker)[case]
    files, _ = _release_files()
    rows = np.zeros((PER_BATCH, 3072), np.uint8)
    # Hidden inside an otherwise well-formed batch, after two good ones.
    files["data_batch_3"] = _python2_pickle(_batch(b"training batch 3 of 5", rows, payload))
    # The name as the file spells it: protocol 2 writes Python 2 names (__builtin__.eval, commands.Popen).
    (asked,) = {name.replace(" ", ".") for name in _globals_of(files["data_batch_3"])} - {
        name.replace(" ", ".") for name in OFFICIAL_GLOBALS
    }
    path = _archive(tmp_path / "c.tar.gz", files) if container == "archive" else _folder(tmp_path / "x", files)
    out = tmp_path / "out"
    message = rf"data_batch_3 is not a plain CIFAR-10 batch \(it asks to load {re.escape(asked)}\); refusing"
    with pytest.raises(ConfigError, match=f"^cifar10 source {re.escape(str(path))}: {message} to unpickle it$"):
        make_shards(f"cifar10:{path}", out, resolution=32, workers=1, progress=False)
    assert not marker.exists() and not out.exists()
    if writes_marker:  # the payload is live: a plain pickle.loads would have run it
        pickle.loads(files["data_batch_3"], encoding="bytes")
        assert marker.exists()


def test_doctored_meta_and_python3_pickles_are_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    files, _ = _release_files()
    files["batches.meta"] = _python2_pickle(_payloads(marker)["os.system"][0])
    with pytest.raises(
        ConfigError, match=r"batches\.meta is not a plain CIFAR-10 batch \(it asks to load (posix|os)\.system\)"
    ):
        read_cifar10(_folder(tmp_path / "a", files), "test")
    assert not marker.exists()
    # A batch re-saved by Python 3 at protocol 2 encodes its bytes through _codecs.encode: not the release.
    files, _ = _release_files()
    files["test_batch"] = pickle.dumps(pickle.loads(files["test_batch"], encoding="bytes"), protocol=2)
    with pytest.raises(ConfigError, match=r"test_batch is not a plain CIFAR-10 batch \(it asks to load _codecs"):
        read_cifar10(_folder(tmp_path / "b", files), "test")


def _replace(name: str, value: Any) -> Any:
    return lambda files: files.update({name: value if isinstance(value, bytes) else _python2_pickle(value)})


def _rows(*shape: int, dtype: Any = np.uint8) -> np.ndarray:
    return np.zeros(shape, dtype)


@pytest.mark.parametrize(
    ("container", "change", "message"),
    [
        ("folder:test", lambda files: files.pop("test_batch"), r"lacks test_batch \(expected the official"),
        ("archive", lambda files: files.pop("data_batch_4"), r"lacks data_batch_4 \(expected the official"),
        ("archive", lambda files: files.pop("batches.meta"), "lacks batches.meta"),
        ("folder", _replace("data_batch_2", _batch(b"b", _rows(4, 3072, dtype=np.float32), [0] * 4)), "uint8 of"),
        ("folder", _replace("data_batch_2", _batch(b"b", _rows(4, 1024), [0] * 4)), r"shape \[N, 3072\]"),
        ("archive", _replace("data_batch_2", _batch(b"b", _rows(0, 3072), [])), "holds no images"),
        ("folder", _replace("data_batch_2", _batch(b"b", _rows(4, 3072), [0] * 3)), "4 images but 3 labels"),
        ("folder", _replace("data_batch_2", _batch(b"b", _rows(4, 3072), [0, 1, 10, 2])), r"in 0\.\.9, got 0\.\.10"),
        ("folder", _replace("data_batch_2", _batch(b"b", _rows(4, 3072), ["a"] * 4)), "labels must be a list of"),
        ("folder", _replace("data_batch_2", {b"data": _rows(4, 3072)}), "with b'data' and b'labels'"),
        ("folder", _replace("data_batch_2", b"\x80\x02}q\x00(U\x04data"), "data_batch_2 is not a readable pickle"),
        ("folder", _replace("batches.meta", {b"label_names": [b"cat"] * 9}), "list of 10 b'label_names'"),
        ("folder", _replace("batches.meta", {b"label_names": [b"cat"] * 10}), "repeat a name"),
    ],
)
def test_bad_release(tmp_path: Path, container: str, change: Any, message: str) -> None:
    files, _ = _release_files()
    change(files)
    kind, _, split = container.partition(":")
    path = _archive(tmp_path / "c.tar.gz", files) if kind == "archive" else _folder(tmp_path / "x", files)
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=message):
        make_shards(f"cifar10:{path}" + (f":{split}" if split else ""), out, resolution=32, workers=1, progress=False)
    assert not out.exists()  # refused before writing anything


def test_bad_paths(release: dict, tmp_path: Path) -> None:
    (tmp_path / "junk.tar.gz").write_bytes(b"\x1f\x8b not really gzip" * 10)
    for source, message in [
        (f"cifar10:{tmp_path / 'missing.tar.gz'}", "does not exist"),
        (f"cifar10:{tmp_path / 'junk.tar.gz'}", "is not a readable tar archive"),
        (f"cifar10:{release['archive']}:val", "unknown split 'val', use train or test"),
        (f"cifar10:{tmp_path / 'empty'}", "does not exist"),
    ]:
        with pytest.raises(ConfigError, match=message):
            make_shards(source, tmp_path / "out", resolution=32, workers=1, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="lacks data_batch_1, data_batch_2, data_batch_3, data_batch_4, data_batch_5"):
        make_shards(f"cifar10:{tmp_path / 'empty'}", tmp_path / "out", resolution=32, progress=False)
    assert not (tmp_path / "out").exists()


def _cli(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "sgtrain", "make-shards", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_cli(release: dict, tmp_path: Path) -> None:
    good = _cli("--source", f"cifar10:{release['archive']}:test", "--out", str(tmp_path / "good"), "--resolution", "32")
    assert good.returncode == 0, good.stderr[-2000:]
    assert "make-shards: 4 samples in 1 shards, 10 classes, 0 skipped" in good.stdout

    marker = tmp_path / "pwned"
    files, _ = _release_files()
    files["test_batch"] = _python2_pickle(_payloads(marker)["os.system"][0])
    archive = _archive(tmp_path / "bad.tar.gz", files)
    bad = _cli("--source", f"cifar10:{archive}:test", "--out", str(tmp_path / "bad"), "--resolution", "32")
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr == (
        f"sgtrain: error: cifar10 source {archive}: test_batch is not a plain CIFAR-10 batch "
        f"(it asks to load {os.system.__module__}.system); refusing to unpickle it\n"
    )
    assert not marker.exists() and not (tmp_path / "bad").exists()
