"""One point of issue 19's recipe sweep (docs/recipe_sweep.md) that no config option expresses: the digits recipe,
dense, for 3,000 G steps with learning rates decayed linearly to 0 from step START to the end, set after every
iteration from a training-loop hook.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/recipe_lr_decay.py runs/recipe_sweep/lrdecay_both 1000 both
    .venv/bin/python -m sgtrain evaluate runs/recipe_sweep/lrdecay_both --metrics fid,is,pr,classes \\
        --num-samples 1000 --extractor classifier

WHICH is both, d or g: the networks whose rate decays.
"""

from __future__ import annotations

import sys

from sgtrain.config import load_config
from sgtrain.step import GanStep, StepResult
from sgtrain.train import Hooks, train

TOTAL = 3000


def main(run_dir: str, start: int, which: str) -> None:
    overrides = {
        "run_dir": run_dir,
        "data.shards": None,
        "sparse.method": "dense",
        "sparse.density_g": 1.0,
        "sparse.density_d": 1.0,
        "train.steps": TOTAL,
        "train.ema_start": 1000,
        "train.checkpoint_every": 500,
        "train.keep_checkpoints": 6,
    }
    cfg = load_config("digits.yaml", overrides)
    base = {"G": cfg.train.g_lr, "D": cfg.train.d_lr}

    def decay(step: int, gan: GanStep, result: StepResult) -> None:
        factor = 1.0 if step < start else max(0.0, (TOTAL - step) / (TOTAL - start))
        for net, trainable in (("G", gan.G), ("D", gan.D)):
            if which in ("both", net.lower()):
                for group in trainable.optimizer.param_groups:  # type: ignore[attr-defined] (a local network's)
                    group["lr"] = base[net] * factor

    train(cfg, hooks=Hooks(after_iteration=decay))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
