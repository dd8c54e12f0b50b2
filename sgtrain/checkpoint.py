"""Checkpoints: atomic writes, a checksum per file, the last K kept, data-only loading.

Layout in the run directory::

    checkpoints/step-00001000.pt       torch.save of a dict of tensors and plain values
    checkpoints/step-00001000.pt.json  {"step", "bytes", "sha256"}: written last, so its presence marks completion

A checkpoint is data, never code: loading uses ``torch.load(weights_only=True)``, which refuses any pickle that
would import or call something.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

_NAME = re.compile(r"^step-(\d{8})\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot or must not be loaded."""


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one, never a part."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def save_checkpoint(run_dir: str | Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write ``state`` as the checkpoint of ``step`` and delete all but the newest ``keep``. Rank 0 only."""
    directory = checkpoint_dir(run_dir)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"step-{step:08d}.pt"
    tmp = path.with_name(f".{path.name}.tmp")
    # A crash (or a full disk) before the final rename leaves only a temporary file, which the next save
    # overwrites: the previous checkpoints are never touched until the new one is complete, and one whose checksum
    # record was never written is skipped as incomplete.
    try:
        with open(tmp, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        meta = {"step": step, "bytes": path.stat().st_size, "sha256": file_sha256(path)}
        write_atomic(path.with_name(path.name + ".json"), json.dumps(meta).encode())
    except OSError as error:  # a full disk, a quota, a vanished mount: stop, with the last good checkpoint intact
        tmp.unlink(missing_ok=True)
        path.with_name(f".{path.name}.json.tmp").unlink(missing_ok=True)
        if not path.with_name(path.name + ".json").is_file():
            path.unlink(missing_ok=True)
        previous = list_checkpoints(run_dir)
        kept = f"the latest complete one, {previous[-1].name}, is intact" if previous else "there is no earlier one"
        raise CheckpointError(f"could not write checkpoint {path.name} in {directory} ({error}); {kept}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    for old in list_checkpoints(run_dir)[:-keep]:
        old.with_name(old.name + ".json").unlink(missing_ok=True)
        old.unlink(missing_ok=True)
    return path


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints (file and checksum record present), oldest first."""
    directory = checkpoint_dir(run_dir)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if _NAME.match(p.name) and p.with_name(p.name + ".json").is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def verify(path: Path) -> None:
    """Raise :class:`CheckpointError` unless ``path`` matches the size and sha256 recorded when it was written."""
    try:
        meta = json.loads(path.with_name(path.name + ".json").read_text())
        expected_bytes, expected_sha = int(meta["bytes"]), str(meta["sha256"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{path}: checksum record missing or unreadable ({error})") from None
    if not path.is_file():
        raise CheckpointError(f"{path}: file missing")
    size = path.stat().st_size
    if size != expected_bytes:
        raise CheckpointError(f"{path}: {size} bytes on disk, {expected_bytes} written (truncated?)")
    if file_sha256(path) != expected_sha:
        raise CheckpointError(f"{path}: sha256 differs from the one recorded at write time (corrupted)")


def load_checkpoint(path: str | Path, *, check: bool = True) -> dict[str, Any]:
    """Load a checkpoint as data. Refuses files whose pickle would run code."""
    path = Path(path)
    if check:
        verify(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"{path}: refused to load: the file holds pickled objects other than tensors and plain data, which "
            f"could run code ({first})"
        ) from None
    except (RuntimeError, EOFError, OSError) as error:
        raise CheckpointError(f"{path}: unreadable checkpoint ({str(error).splitlines()[0]})") from None


def load_latest(run_dir: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint of ``run_dir`` that verifies and loads, or None when there is none.

    A damaged newest checkpoint (truncated, altered) is reported and the one before it is used. A checkpoint
    that carries code is never skipped silently: that is an attack or a mistake the user must see.
    """
    complete = list_checkpoints(run_dir)
    newest = int(_NAME.match(complete[-1].name).group(1)) if complete else -1
    directory = checkpoint_dir(run_dir)
    for leftover in sorted(directory.glob("step-*.pt*")) if directory.is_dir() else []:
        name = leftover.name.removesuffix(".json")
        match = _NAME.match(name)
        if match and int(match.group(1)) > newest and leftover.with_name(name) not in complete:
            # A crash between the checkpoint and its checksum record, or a file removed by hand.
            half = "checksum record" if leftover.name.endswith(".json") else "checkpoint file"
            warnings.warn(f"skipping incomplete checkpoint {leftover}: its {half} has no partner", stacklevel=2)
    for path in reversed(complete):
        try:
            verify(path)
        except CheckpointError as error:
            warnings.warn(f"skipping damaged checkpoint: {error}", stacklevel=2)
            continue
        return path, load_checkpoint(path, check=False)
    return None


def keep_best(
    run_dir: str | Path, path: Path, step: int, value: float, metric: str, *, keep: int
) -> list[dict[str, Any]]:
    """Keep checkpoint ``path`` in ``run_dir/best/`` if its ``metric`` value is among the ``keep`` best so far.

    Kept checkpoints are hard links (copies where links are impossible), so the run's own rotation of
    ``checkpoints/`` never removes them; ``best/index.json`` lists them best first and is written atomically.
    """
    from sgtrain.config import EVAL_METRICS

    best = Path(run_dir) / "best"
    best.mkdir(parents=True, exist_ok=True)
    index_path = best / "index.json"
    entries = json.loads(index_path.read_text()) if index_path.is_file() else []
    entries = [e for e in entries if e["step"] != step] + [{"step": step, "metric": metric, metric: float(value)}]
    entries.sort(key=lambda e: e[metric] if EVAL_METRICS[metric] == "lower" else -e[metric])
    kept, dropped = entries[:keep], entries[keep:]
    if any(e["step"] == step for e in kept):
        for name in (path.name, path.name + ".json"):
            target = best / name
            if not target.exists():
                try:
                    os.link(path.with_name(name), target)
                except OSError:
                    shutil.copy2(path.with_name(name), target)
    write_atomic(index_path, json.dumps(kept, indent=1).encode())
    for entry in dropped:
        for name in (f"step-{entry['step']:08d}.pt", f"step-{entry['step']:08d}.pt.json"):
            (best / name).unlink(missing_ok=True)
    return kept


def load_run_or_file(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """The latest complete checkpoint of a run directory, or one checkpoint file: ``(path, state)``."""
    path = Path(path)
    if path.is_dir():
        latest = load_latest(path)
        if latest is None:
            raise CheckpointError(f"{path}: no complete checkpoint in this run directory")
        return latest
    if path.is_file():
        return path, load_checkpoint(path)
    raise CheckpointError(f"{path}: no such run directory or checkpoint file")


def read_pretrained(prune_from: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """The dense weights ``{"G": state_dict, "D": state_dict}`` that ``sparse.prune_from`` names, to prune
    (``MaskManager.initialize(dense_weights=...)``): a checkpoint file, or a run directory's latest complete one.

    Only what the file holds of G and D is returned; a network it lacks is missing from the dict, and the manager
    names it when loading fails.
    """
    from sgtrain.config import ConfigError

    source = Path(prune_from)
    if source.is_dir():
        found = list_checkpoints(source)
        if not found:
            raise ConfigError(f"sparse.prune_from: no checkpoint in {source}")
        source = found[-1]
    if not source.is_file():
        raise ConfigError(f"sparse.prune_from: {source} does not exist")
    state = load_checkpoint(source)
    return {net: state[net] for net in ("G", "D") if net in state}
