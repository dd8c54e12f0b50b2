"""The study: a grid of ordinary training runs that tests the paper's claims at a scale one CPU can run.

``python -m sgtrain study --grid study.yaml`` expands a grid file (``configs/study/``) into cells, one per (benchmark,
method, G density, D density, seed), and runs each as an ordinary run directory under the grid's ``out``:

- ``digits/<method>-g0.1-d0.3-s0``: a small BigGAN on the bundled digits, trained by :func:`sgtrain.train.train` and
  then evaluated by :func:`sgtrain.metrics.evaluate.evaluate_run` (classifier Fréchet distance, IS analogue, classes
  covered). ``sgtrain inspect``, ``report``, ``sample`` and ``evaluate`` all work on it.
- ``ring8/...`` and ``grid25/...``: the 2-D mixture-of-Gaussians benchmark (:mod:`sgtrain.study.gaussians`).

A cell is complete when its ``result.json`` exists; a rerun skips complete cells and resumes the others from their
checkpoints, so the grid survives a kill. Cells run in parallel worker processes (``--workers``) and can be split
over machines or Slurm array tasks (``--shard K/N``). When every cell has a result, the study writes its report
(``docs/study.md`` by default): tables of mean and spread over seeds, plots, and a verdict on each of the paper's
claims computed from the numbers, with the command, commit and wall time that produced them.

Modules, each importing only those above it: ``gaussians`` (the 2-D benchmark), ``grid`` (the grid file, its cells
and their fingerprints), ``stats`` (means and spreads over seeds), ``claims`` (one function per claim), ``report``
(the markdown report and its plots), ``runner`` (the cells over a process pool, then the report).
"""

from sgtrain.study.claims import claims
from sgtrain.study.grid import Grid, load_grid
from sgtrain.study.report import write_study_report
from sgtrain.study.runner import StudyFailed, parse_shard, run_study
from sgtrain.study.stats import Stat, aggregate, compare

__all__ = [
    "Grid",
    "Stat",
    "StudyFailed",
    "aggregate",
    "claims",
    "compare",
    "load_grid",
    "parse_shard",
    "run_study",
    "write_study_report",
]
