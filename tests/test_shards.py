"""The shard writer on a generated ImageNet-style tree: every good image once, right size and label, exact manifest."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from sgtrain.config import ConfigError
from sgtrain.data.shards import make_shards

RES = 16
CLASSES = ["n01440764", "n01443537", "n01484850"]
JPEG_TOLERANCE = 6  # max |error| per channel of a flat colour through two q95 4:4:4 JPEG round trips


def _save(path: Path, image: Image.Image, **options) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **options)


def _rgb(mode: str, colour) -> tuple[int, int, int]:
    """What PIL's convert("RGB") makes of one pixel of ``colour`` in ``mode``: the expected sample colour."""
    return Image.new(mode, (1, 1), colour).convert("RGB").getpixel((0, 0))


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, list[tuple[str, int, tuple[int, int, int]]], list[str]]:
    """An ImageNet-layout folder; its good images ``(relative path, label, RGB colour)`` in sample order, and the
    relative paths of the undecodable ones."""
    root = tmp_path / "train"
    a, b, c = (root / name for name in CLASSES)
    # Flat colours of odd sizes identify each image after crop, resize and re-encoding. Names sort as listed.
    _save(a / "a.JPEG", Image.new("RGB", (37, 53), (200, 30, 30)), quality=95, subsampling=0)
    _save(a / "b.JPEG", Image.new("L", (13, 200), 90), quality=95)
    _save(a / "c.jpeg", Image.new("RGB", (64, 31), (20, 160, 40)), quality=95, subsampling=0)
    _save(a / "d.png", Image.new("RGBA", (100, 100), (40, 60, 220, 128)))
    _save(a / "sub" / "e.JPEG", Image.new("RGB", (5, 7), (250, 250, 10)), quality=95, subsampling=0)  # upsampled
    _save(b / "a.JPEG", Image.new("CMYK", (64, 31), (0, 200, 200, 30)), quality=95)
    _save(b / "b.bmp", Image.new("RGB", (100, 100), (10, 10, 10)))
    _save(b / "c.gif", Image.new("RGB", (33, 21), (255, 128, 0)).convert("P", palette=Image.Palette.ADAPTIVE))
    (b / "corrupt.JPEG").write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    _save(c / "a.png", Image.new("RGB", (40, 80), (128, 128, 128)))
    noise = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    whole = io.BytesIO()
    noise.save(whole, format="JPEG", quality=95)
    (c / "truncated.JPEG").write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])
    _save(c / "z.TIFF", Image.new("RGB", (90, 45), (60, 0, 120)))
    (c / "notes.txt").write_text("not an image")
    (root / "LICENSE.txt").write_text("not a class")
    good = [
        (f"{CLASSES[0]}/a.JPEG", 0, (200, 30, 30)),
        (f"{CLASSES[0]}/b.JPEG", 0, (90, 90, 90)),
        (f"{CLASSES[0]}/c.jpeg", 0, (20, 160, 40)),
        (f"{CLASSES[0]}/d.png", 0, (40, 60, 220)),
        (f"{CLASSES[0]}/sub/e.JPEG", 0, (250, 250, 10)),
        (f"{CLASSES[1]}/a.JPEG", 1, _rgb("CMYK", (0, 200, 200, 30))),
        (f"{CLASSES[1]}/b.bmp", 1, (10, 10, 10)),
        (f"{CLASSES[1]}/c.gif", 1, (255, 128, 0)),
        (f"{CLASSES[2]}/a.png", 2, (128, 128, 128)),
        (f"{CLASSES[2]}/z.TIFF", 2, (60, 0, 120)),
    ]
    return root, good, [f"{CLASSES[1]}/corrupt.JPEG", f"{CLASSES[2]}/truncated.JPEG"]


def _shard_files(out: Path) -> list[Path]:
    return sorted(out.glob("train-*.tar"))


def _decode(data: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(data))
    assert image.mode == "RGB" and image.size == (RES, RES)
    return np.asarray(image).astype(np.int64)


def test_image_folder_shards(tree, tmp_path, capsys):
    root, good, bad = tree
    out = tmp_path / "shards"
    manifest = make_shards(f"imagefolder:{root}", out, resolution=RES, shard_size=4, workers=1, progress=False)

    # Every good image exactly once, in source order, with its label and colour, at RES x RES RGB.
    samples = list(wds.WebDataset([str(p) for p in _shard_files(out)], shardshuffle=False))
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(len(good))]
    assert [int(s["cls"]) for s in samples] == [label for _, label, _ in good]
    for sample, (path, _, colour) in zip(samples, good, strict=True):
        pixels = _decode(sample["jpg"])
        assert np.abs(pixels - np.array(colour)).max() <= JPEG_TOLERANCE, path

    # The tar files themselves: two members per sample in key order, no time or owner.
    members = []
    for path in _shard_files(out):
        with tarfile.open(path) as tar:
            members += tar.getmembers()
    assert [m.name for m in members] == [f"{i:09d}.{ext}" for i in range(len(good)) for ext in ("jpg", "cls")]
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {(0, 0, 0, "", "", 0o644)}

    # The manifest matches the files.
    assert manifest == json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "sgtrain-shards/1" and manifest["source"] == f"imagefolder:{root}"
    assert manifest["resolution"] == RES and manifest["image_format"] == "jpg"
    assert manifest["num_samples"] == len(good) == 10 and manifest["num_classes"] == 3
    assert [s["name"] for s in manifest["shards"]] == [p.name for p in _shard_files(out)]
    assert [s["count"] for s in manifest["shards"]] == [4, 4, 2]
    assert [s["sha256"] for s in manifest["shards"]] == [
        hashlib.sha256(p.read_bytes()).hexdigest() for p in _shard_files(out)
    ]
    assert manifest["per_class"] == [5, 3, 2]
    assert [s["path"] for s in manifest["skipped"]] == bad
    assert json.loads((out / manifest["classes_file"]).read_text()) == {name: i for i, name in enumerate(CLASSES)}
    assert sorted(p.name for p in out.iterdir()) == [
        "classes.json",
        "manifest.json",
        "train-000000.tar",
        "train-000001.tar",
        "train-000002.tar",
    ]
    captured = capsys.readouterr()
    assert "10 samples in 3 shards, 3 classes, 2 skipped" in captured.out
    assert all(path in captured.err for path in bad)


def test_centre_crop_keeps_layout(tmp_path):
    # 96x48, left half red, right half blue: the centre square (x 24..72) is still half red, half blue.
    pixels = np.zeros((48, 96, 3), dtype=np.uint8)
    pixels[:, :48] = (255, 0, 0)
    pixels[:, 48:] = (0, 0, 255)
    _save(tmp_path / "src" / "only" / "x.png", Image.fromarray(pixels))
    out = tmp_path / "out"
    make_shards(f"imagefolder:{tmp_path / 'src'}", out, resolution=RES, workers=1, progress=False)
    (sample,) = wds.WebDataset(str(out / "train-000000.tar"), shardshuffle=False)
    result = _decode(sample["jpg"])
    edge = 3  # columns next to the colour edge are blended by the bicubic kernel
    assert np.abs(result[:, : RES // 2 - edge] - (255, 0, 0)).max() <= JPEG_TOLERANCE
    assert np.abs(result[:, RES // 2 + edge :] - (0, 0, 255)).max() <= JPEG_TOLERANCE


def test_bytes_do_not_depend_on_workers(tree, tmp_path):
    root = tree[0]
    outputs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        make_shards(f"imagefolder:{root}", out, resolution=RES, shard_size=4, workers=workers, progress=False)
        outputs.append({p.name: p.read_bytes() for p in out.iterdir()})
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize("layout", ["NHW", "NHW1", "NHWC", "NCHW"])
def test_npz_layouts(tmp_path, layout):
    rng = np.random.default_rng(0)
    grey = layout in ("NHW", "NHW1")
    x = rng.integers(0, 256, (6, 10, 12) if grey else (6, 10, 12, 3), dtype=np.uint8)
    y = np.array([2, 0, 1, 0, 1, 2])
    expected = []  # independent expectation: the centre 10x10, resized by PIL, as lossless PNG
    for image in x:
        square = Image.fromarray(image[:, 1:11]).convert("RGB")
        expected.append(np.asarray(square.resize((RES, RES), Image.Resampling.BICUBIC)))
    stored = {"NHW": x, "NHW1": x[..., None], "NHWC": x, "NCHW": x.transpose(0, 3, 1, 2) if not grey else x}[layout]
    np.savez(tmp_path / "data.npz", x=stored, y=y)
    out = tmp_path / "out"
    manifest = make_shards(
        f"npz:{tmp_path / 'data.npz'}", out, resolution=RES, image_format="png", workers=1, progress=False
    )
    assert manifest["num_classes"] == 3 and manifest["per_class"] == [2, 2, 2]
    assert json.loads((out / "classes.json").read_text()) == {"0": 0, "1": 1, "2": 2}
    samples = list(wds.WebDataset(str(out / "train-000000.tar"), shardshuffle=False))
    assert [int(s["cls"]) for s in samples] == y.tolist()
    for sample, pixels in zip(samples, expected, strict=True):
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(sample["png"]))), pixels)


def test_digits(tmp_path):
    out = tmp_path / "digits"
    manifest = make_shards("digits", out, resolution=32, shard_size=5000, image_format="png", progress=False)
    assert manifest["num_samples"] == 1797 and manifest["num_classes"] == 10
    assert sum(manifest["per_class"]) == 1797 and [s["count"] for s in manifest["shards"]] == [1797]
    first = next(iter(wds.WebDataset(str(out / "train-000000.tar"), shardshuffle=False)))
    assert Image.open(io.BytesIO(first["png"])).size == (32, 32) and first["cls"] == b"0"


def _npz(path: Path, **arrays) -> str:
    np.savez(path, **arrays)
    return f"npz:{path}"


@pytest.mark.parametrize(
    ("make_source", "message"),
    [
        (lambda d: f"imagefolder:{d / 'missing'}", "is not a directory"),
        (lambda d: f"npz:{d / 'missing.npz'}", "does not exist"),
        (lambda d: "cifar10", "unknown shard source"),
        (lambda d: f"hdf5:{d}", "unknown shard source"),
        (lambda d: f"imagefolder:{d}", "no class subfolders"),  # the (empty) tmp_path
        (lambda d: _npz(d / "gap.npz", x=np.zeros((2, 4, 4), np.uint8), y=np.array([0, 2])), "labels must be 0..C-1"),
        (lambda d: _npz(d / "neg.npz", x=np.zeros((2, 4, 4), np.uint8), y=np.array([-1, 0])), "labels must be 0..C-1"),
        (lambda d: _npz(d / "len.npz", x=np.zeros((3, 4, 4), np.uint8), y=np.array([0, 1])), "3 images but y holds 2"),
        (lambda d: _npz(d / "float.npz", x=np.zeros((2, 4, 4)), y=np.array([0, 1])), "x must be uint8"),
        (lambda d: _npz(d / "nox.npz", y=np.array([0, 1])), "must hold arrays x"),
    ],
)
def test_bad_sources(tmp_path, make_source, message):
    source = make_source(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=message):
        make_shards(source, out, resolution=RES, workers=1, progress=False)
    assert not out.exists()  # refused before writing anything


def test_class_without_images_is_refused(tmp_path):
    (tmp_path / "src" / "empty").mkdir(parents=True)
    _save(tmp_path / "src" / "full" / "x.png", Image.new("RGB", (4, 4)))
    with pytest.raises(ConfigError, match="without image files: empty"):
        make_shards(f"imagefolder:{tmp_path / 'src'}", tmp_path / "out", resolution=RES, progress=False)


def test_refuses_to_overwrite_and_bad_options(tree, tmp_path):
    source, out = f"imagefolder:{tree[0]}", tmp_path / "out"
    make_shards(source, out, resolution=RES, workers=1, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ConfigError, match="already holds shards"):
        make_shards(source, out, resolution=RES, workers=1, progress=False)
    (out / "manifest.json").unlink()  # a crashed run leaves shards without a manifest: still refused
    with pytest.raises(ConfigError, match="already holds shards"):
        make_shards(source, out, resolution=RES, workers=1, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {k: v for k, v in before.items() if k != "manifest.json"}
    for options, message in [
        ({"image_format": "webp"}, "image format"),
        ({"resolution": 0}, "resolution"),
        ({"quality": 0}, "quality"),
        ({"workers": 0}, "workers"),
    ]:
        with pytest.raises(ConfigError, match=message):
            make_shards(source, tmp_path / "other", **{"resolution": RES, **options}, progress=False)
    assert not (tmp_path / "other").exists()


def test_bundled_shards_hold_the_in_memory_images_and_are_written_once(tmp_path: Path) -> None:
    """The default run's shards: the same framed digits the in-memory path trains on, to 8 bits; a second call
    (another rank, the next run) reuses them."""
    from sgtrain.data.builtin import load_builtin
    from sgtrain.data.shards import bundled_shards
    from sgtrain.data.stream import read_shard, resolve_shards

    path = bundled_shards("digits", 32, cache=tmp_path)
    assert bundled_shards("digits", 32, cache=tmp_path) == path
    assert [p.name for p in (tmp_path / "shards").iterdir()] == [path.name]  # no scratch left behind
    shards = resolve_shards(str(path))
    assert len(shards.urls) == 29 and sum(shards.counts) == 1797 and shards.resolution == 32
    memory = load_builtin("digits", 32)
    images, labels = [], []
    for url in shards.urls:  # file order is dataset order
        for _, image, label in read_shard(url):
            images.append(np.asarray(Image.open(io.BytesIO(image)).convert("RGB"), dtype=np.float32))
            labels.append(int(label))
    got = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2) / 127.5 - 1.0
    assert (got - memory.images).abs().max() <= 0.5 / 127.5 + 1e-6  # rounded to the nearest of 256 levels
    assert labels == memory.labels.tolist()


def test_make_shards_command(tmp_path: Path) -> None:
    import subprocess
    import sys

    out = tmp_path / "out"
    command = [sys.executable, "-m", "sgtrain", "make-shards", "--source", "digits", "--out", str(out)]
    command += ["--resolution", "16", "--shard-size", "1000", "--format", "png"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "make-shards: 1797 samples in 2 shards, 10 classes, 0 skipped" in result.stdout
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and again.stderr.startswith("sgtrain: error: shard output")
