"""Read the official CIFAR-10 python release (``cifar-10-python.tar.gz``) for ``make-shards --source cifar10:PATH``.

The release is a folder ``cifar-10-batches-py/`` of Python 2 pickles: ``data_batch_1`` .. ``data_batch_5`` (the
50,000 training images, 10,000 each) and ``test_batch`` (10,000), each a dict with ``b"data"`` (uint8
``[N, 3072]``: per image the 1024 red, then green, then blue values of a 32x32 picture, rows top to bottom) and
``b"labels"`` (N ints in 0..9); ``batches.meta`` holds the 10 ``b"label_names"``. PATH is the archive itself
(read in memory, nothing extracted), the extracted folder or the folder that holds it.

A pickle can call any importable function while it loads, so a doctored "batch" could run code. These files
are unpickled by :class:`_BatchUnpickler`, which resolves only the three globals that numpy arrays need and
refuses every other one before it is called, so a refused file has done nothing.
"""

from __future__ import annotations

import io
import pickle
import tarfile
import zlib
from pathlib import Path, PurePosixPath
from typing import IO, Any

import numpy as np

from sgtrain.config import ConfigError

try:  # numpy 2 moved the C core to numpy._core; numpy.core is a deprecated alias of it there
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct

CIFAR10_FOLDER = "cifar-10-batches-py"  # the one top-level folder of the official archive
CIFAR10_SPLITS = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
CIFAR10_META = "batches.meta"
CIFAR10_SIDE, CIFAR10_CLASSES = 32, 10
_PIXELS = 3 * CIFAR10_SIDE * CIFAR10_SIDE

# Everything a pickled uint8 ndarray references (checked with pickletools on the official files and on arrays
# pickled by this numpy at protocol 2). The rest of a batch (dict, list, int, str/bytes, tuple, bool, None) is
# built by opcodes, never looked up, so it needs no entry. Python 3 itself, pickling bytes at protocol 2, would
# add _codecs.encode; the official files never do (Python 2 strings have their own opcode), so it is refused.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,  # as the official files (numpy 1.x) spell it
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,  # as numpy 2 spells it, for batches re-saved with it
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _BatchUnpickler(pickle.Unpickler):
    """An unpickler for CIFAR-10 batch files: numpy arrays and plain containers, nothing callable besides."""

    def __init__(self, file: IO[bytes], where: str, name: str) -> None:
        # encoding="bytes": the files' Python 2 strings (the keys, the array bytes) stay bytes, as numpy expects.
        super().__init__(file, encoding="bytes")
        self._where, self._name = where, name

    def find_class(self, module: str, name: str) -> Any:
        # Overriding find_class also bypasses the Python 2 name mapping (fix_imports), so module is as written.
        found = _ALLOWED_GLOBALS.get((module, name))
        if found is None:
            raise ConfigError(
                f"{self._where}: {self._name} is not a plain CIFAR-10 batch (it asks to load {module}.{name}); "
                "refusing to unpickle it"
            )
        return found

    def persistent_load(self, pid: Any) -> Any:
        # The base class refuses persistent ids too, but with a message that does not name the file.
        raise ConfigError(f"{self._where}: {self._name} is not a plain CIFAR-10 batch (it holds a persistent id)")


def _unpickle(data: bytes, where: str, name: str) -> Any:
    try:
        return _BatchUnpickler(io.BytesIO(data), where, name).load()
    except ConfigError:
        raise
    except Exception as error:  # a damaged pickle raises many types (UnpicklingError, EOFError, ValueError, ...)
        raise ConfigError(f"{where}: {name} is not a readable pickle ({type(error).__name__}: {error})") from None


def cifar10_location(location: str) -> tuple[Path, str]:
    """``PATH`` -> ``(PATH, "train")``; ``PATH:train`` and ``PATH:test`` name the split."""
    head, colon, tail = location.rpartition(":")
    if colon and head and tail in CIFAR10_SPLITS:
        return Path(head).expanduser(), tail
    path = Path(location).expanduser()
    if colon and head and not path.exists() and Path(head).expanduser().exists():
        raise ConfigError(f"cifar10 source {location}: unknown split {tail!r}, use {' or '.join(CIFAR10_SPLITS)}")
    return path, "train"


def _read_files(path: Path, wanted: tuple[str, ...], where: str) -> dict[str, bytes]:
    """The bytes of the ``wanted`` files of the release at ``path`` (archive or folder) that are present."""
    if path.is_dir():
        folder = path / CIFAR10_FOLDER if (path / CIFAR10_FOLDER).is_dir() else path
        try:
            return {name: (folder / name).read_bytes() for name in wanted if (folder / name).is_file()}
        except OSError as error:
            raise ConfigError(f"{where}: cannot read {error.filename} ({error.strerror})") from None
    if not path.is_file():
        raise ConfigError(f"{where} does not exist")
    found: dict[str, bytes] = {}
    try:
        # Stream mode ("r|*", gzip or not): one pass over the archive in its own member order, which is not
        # the batch order; random access would decompress from the start again for every member.
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                parts = PurePosixPath(member.name).parts  # (a leading "./" is dropped)
                if member.isfile() and len(parts) == 2 and parts[0] == CIFAR10_FOLDER and parts[1] in wanted:
                    handle = tar.extractfile(member)  # in stream mode: valid until the next member
                    found[parts[1]] = handle.read() if handle else b""
    except (tarfile.TarError, OSError, EOFError, zlib.error) as error:
        raise ConfigError(f"{where} is not a readable tar archive ({type(error).__name__}: {error})") from None
    return found


def _batch(value: Any, where: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A batch's rows ``[N, 3072]`` uint8 and labels ``[N]`` int64, after checking its structure."""

    def refuse(detail: str) -> ConfigError:
        return ConfigError(f"{where}: {name} is not a CIFAR-10 batch ({detail})")

    if not isinstance(value, dict) or b"data" not in value or b"labels" not in value:
        raise refuse("expected a dict with b'data' and b'labels'")
    data = value[b"data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _PIXELS:
        shown = f"{data.dtype} of shape {list(data.shape)}" if isinstance(data, np.ndarray) else type(data).__name__
        raise refuse(f"data must be uint8 of shape [N, {_PIXELS}], got {shown}")
    if len(data) == 0:
        raise refuse("it holds no images")
    labels = np.asarray(value[b"labels"])
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise refuse(f"labels must be a list of ints, got {labels.dtype} of shape {list(labels.shape)}")
    if len(labels) != len(data):
        raise refuse(f"{len(data)} images but {len(labels)} labels")
    if labels.min() < 0 or labels.max() >= CIFAR10_CLASSES:
        raise refuse(f"labels must be in 0..{CIFAR10_CLASSES - 1}, got {labels.min()}..{labels.max()}")
    return data, labels.astype(np.int64)


def _class_names(value: Any, where: str) -> list[str]:
    names = value.get(b"label_names") if isinstance(value, dict) else None
    if not isinstance(names, list) or len(names) != CIFAR10_CLASSES:
        raise ConfigError(f"{where}: {CIFAR10_META} must hold a list of {CIFAR10_CLASSES} b'label_names'")
    try:
        decoded = [name.decode("ascii") if isinstance(name, bytes) else name for name in names]
    except UnicodeDecodeError:
        decoded = []
    # Distinct non-empty strings: classes.json maps name -> index, so a repeated name would lose a class.
    if len(decoded) != CIFAR10_CLASSES or not all(isinstance(name, str) and name for name in decoded):
        raise ConfigError(f"{where}: {CIFAR10_META} label_names must be non-empty ASCII strings, got {names!r}")
    if len(set(decoded)) != len(decoded):
        raise ConfigError(f"{where}: {CIFAR10_META} label_names repeat a name: {decoded}")
    return decoded


def read_cifar10(path: Path, split: str) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """``(class names, sample names, images [N, 32, 32, 3] uint8, labels [N] int64)`` of one split, in the
    release's order (the training batches 1..5 one after the other). Raises :class:`ConfigError` for a missing,
    damaged or doctored release; nothing from it is written or run."""
    where = f"cifar10 source {path}"
    if split not in CIFAR10_SPLITS:
        raise ConfigError(f"{where}: unknown split {split!r}, use {' or '.join(CIFAR10_SPLITS)}")
    wanted = (*CIFAR10_SPLITS[split], CIFAR10_META)
    files = _read_files(path, wanted, where)
    missing = [name for name in wanted if name not in files]
    if missing:
        raise ConfigError(
            f"{where} lacks {', '.join(missing)} (expected the official cifar-10-python.tar.gz, its "
            f"{CIFAR10_FOLDER}/ folder or the folder holding that)"
        )
    classes = _class_names(_unpickle(files.pop(CIFAR10_META), where, CIFAR10_META), where)
    rows, labels, names = [], [], []
    for name in CIFAR10_SPLITS[split]:
        batch_rows, batch_labels = _batch(_unpickle(files.pop(name), where, name), where, name)
        rows.append(batch_rows)
        labels.append(batch_labels)
        names += [f"{name}[{i}]" for i in range(len(batch_rows))]
    # Each row is the red plane, then green, then blue: [N, C, H, W] in memory; the writer wants [N, H, W, C].
    # One contiguous copy, so that each image handed to a worker is a plain 3 KB block, not a strided view.
    planes = np.concatenate(rows).reshape(-1, 3, CIFAR10_SIDE, CIFAR10_SIDE)
    return classes, names, np.ascontiguousarray(planes.transpose(0, 2, 3, 1)), np.concatenate(labels)
