"""Config: defaults, YAML deltas, dotted overrides, and one clear message for every bad value."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sgtrain.config import Config, ConfigError, config_to_dict, config_to_yaml, load_config

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_the_digits_job() -> None:
    cfg = load_config()
    assert cfg == Config()
    assert cfg.data.dataset == "digits" and cfg.data.shards is None
    assert cfg.model.resolution == 32 and cfg.model.n_classes == 10


def test_shipped_digits_yaml_is_the_dense_defaults_made_sparse_and_streamed() -> None:
    digits, defaults = load_config("digits.yaml"), load_config()
    assert digits.model == defaults.model and digits.train == defaults.train
    assert defaults.sparse.method == "dense" and digits.sparse.method == "stu"
    # The same digits, streamed from shards written on first use instead of held in memory.
    assert defaults.data.shards is None and digits.data.shards == defaults.data.dataset == "digits"


@pytest.mark.parametrize("name", ["imagenet128.yaml", "imagenet128", "cifar10.yaml", "digits.yaml"])
def test_bare_name_resolves_to_shipped_configs(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # not the repository root: the package's own configs/ must be found
    cfg = load_config(name)
    assert cfg.run_dir.startswith("runs/")


def test_imagenet128_values() -> None:
    cfg = load_config("imagenet128.yaml")
    m = cfg.model
    assert (m.resolution, m.n_classes, m.g_ch, m.d_ch, m.dim_z, m.shared_dim, m.hier) == (
        128,
        1000,
        96,
        96,
        120,
        128,
        True,
    )
    assert m.g_attn == [64] and m.d_attn == [64]
    assert cfg.data.shards == "/path/to/imagenet128/train-{000000..000639}.tar"
    assert cfg.train.batch_size == 2048 and cfg.train.accumulation == 8


def test_g_lr_decays_linearly_after_its_fraction_of_the_run() -> None:
    decayed = load_config(None, {"train.steps": 10, "train.g_lr": 6e-4, "train.g_lr_decay_from": 0.4}).train
    # Steps 0-3 at the full rate; from step 4 (0.4 of 10) down by g_lr / 6 per step to g_lr / 6 at the last.
    assert [decayed.g_lr_at(step) * 1e4 for step in range(10)] == pytest.approx([6, 6, 6, 6, 6, 5, 4, 3, 2, 1])
    constant = load_config(None, {"train.steps": 10, "train.g_lr": 6e-4, "train.g_lr_decay_from": None}).train
    assert [constant.g_lr_at(step) for step in range(10)] == [6e-4] * 10


def test_dotted_overrides_apply_over_the_yaml() -> None:
    cfg = load_config(
        "cifar10.yaml",
        {"train.steps": 200, "model.g_ch": "32", "run_dir": "x", "data.shards": "null", "model.hier": "true"},
    )
    assert cfg.train.steps == 200 and cfg.model.g_ch == 32 and cfg.run_dir == "x"
    assert cfg.data.shards is None and cfg.model.hier is True
    assert cfg.model.d_ch == 64  # untouched keys keep the YAML's value
    assert load_config(None, {"train.betas": "[0.5, 0.9]"}).train.betas == [0.5, 0.9]
    assert load_config(None, {"train.g_lr": "1e-4"}).train.g_lr == 1e-4


def test_yaml_file_outside_configs(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("train:\n  steps: 7\nmodel:\n  g_ch: 16\n")
    cfg = load_config(path)
    assert cfg.train.steps == 7 and cfg.model.g_ch == 16


def test_round_trip_through_yaml(tmp_path: Path) -> None:
    cfg = load_config("imagenet128.yaml", {"train.steps": 5})
    path = tmp_path / "saved.yaml"
    path.write_text(config_to_yaml(cfg))
    assert load_config(path) == cfg
    assert yaml.safe_load(path.read_text()) == config_to_dict(cfg)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"train.stepz": 3}, "unknown config key train.stepz; did you mean train.steps?"),
        ({"modle.g_ch": 3}, "unknown config key modle; did you mean model?"),
        ({"model.gch": 3}, "unknown config key model.gch; did you mean model.g_ch?"),
        ({"zzz": 3}, "unknown config key zzz; valid keys: run_dir, seed, model, data, train, sparse"),
        ({"model": 3}, "model is a section"),
        ({"train.g_lr": -1}, "train.g_lr must be > 0, got -1.0"),
        ({"train.d_lr": 0}, "train.d_lr must be > 0, got 0.0"),
        ({"sparse.density_g": 0}, "sparse.density_g must be in (0, 1], got 0.0"),
        ({"sparse.density_d": 1.5}, "sparse.density_d must be in (0, 1], got 1.5"),
        ({"sparse.density_g": -0.2}, "sparse.density_g must be in (0, 1], got -0.2"),
        ({"sparse.method": "magic"}, "sparse.method must be one of"),
        ({"model.resolution": 48}, "model.resolution must be 32, 64 or 128, got 48"),
        ({"model.resolution": 256}, "model.resolution must be 32, 64 or 128, got 256"),
        ({"model.g_ch": 0}, "model.g_ch must be >= 1, got 0"),
        ({"model.init": "kaiming"}, "model.init must be ortho, N02 or xavier"),
        ({"model.g_attn": [64]}, "model.g_attn: no 32px block outputs [64]px; choose from [8, 16, 32]"),
        ({"model.d_attn": [32]}, "model.d_attn: no 32px block outputs [32]px; choose from [16, 8]"),
        ({"model.g_ch": "wide"}, "model.g_ch must be an integer, got 'wide'"),
        ({"model.hier": "maybe"}, "model.hier must be true or false, got 'maybe'"),
        ({"train.steps": 0}, "train.steps must be >= 1, got 0"),
        ({"train.steps": 2.5}, "train.steps must be an integer, got 2.5"),
        ({"train.batch_size": 10, "train.accumulation": 4}, "must be divisible by train.accumulation"),
        ({"train.betas": [0.0, 1.0]}, "train.betas must be two numbers in [0, 1)"),
        ({"train.betas": [0.0]}, "train.betas must be two numbers in [0, 1)"),
        ({"train.ema_decay": 1.0}, "train.ema_decay must be in [0, 1), got 1.0"),
        ({"train.g_lr_decay_from": 1.0}, "train.g_lr_decay_from must be in [0, 1) or null, got 1.0"),
        ({"train.mixed_precision": "fp8"}, "train.mixed_precision must be one of no, bf16"),
        ({"train.sample_classes": 11}, "train.sample_classes (11) exceeds model.n_classes (10)"),
        ({"data.num_workers": -1}, "data.num_workers must be >= 0, got -1"),
        ({"run_dir": ""}, "run_dir must not be empty"),
        (
            {"sparse.method": "stu", "sparse.grow_g": "magnitude"},
            "sparse.grow_g must be one of gradient, random, momentum",
        ),
        (
            {"sparse.method": "stu", "sparse.grow_d": "hebbian"},
            "sparse.grow_d must be one of gradient, random, momentum",
        ),
        ({"sparse.method": "stu", "sparse.distribution": "ERK2"}, "sparse.distribution must be uniform, ER or ERK"),
        ({"sparse.method": "stu", "sparse.update_every": 0}, "sparse.update_every must be >= 1, got 0"),
        ({"sparse.method": "stu", "sparse.update_end": 0}, "sparse.update_end must be in (0, 1], got 0.0"),
        ({"sparse.method": "stu", "sparse.drop_fraction": 1.0}, "sparse.drop_fraction must be in [0, 1), got 1.0"),
        ({"sparse.method": "stu", "sparse.drop_fraction": 0.0}, "sparse.drop_fraction_min (0.005) must not exceed"),
        ({"sparse.method": "stu", "sparse.drop_fraction_min": -0.1}, "sparse.drop_fraction_min must be in [0, 1)"),
        (
            {"sparse.method": "stu", "sparse.optimizer_state": "sparse"},
            "sparse.optimizer_state must be one of dense, masked, got 'sparse'",
        ),
        ({"train.ema_buffers": "mean"}, "train.ema_buffers must be average or copy, got 'mean'"),
        ({"sparse.method": "stu", "sparse.explore": "G+D"}, "sparse.explore must be G, D, GD or none"),
        ({"sparse.method": "stu", "sparse.targets": "all"}, "sparse.targets must be conv_linear or conv_only"),
        ({"sparse.method": "gmp", "sparse.gmp_start": 0.7}, "sparse.gmp_start < sparse.gmp_end must lie in [0, 1]"),
        ({"sparse.method": "prune_finetune"}, "sparse.method=prune_finetune needs sparse.prune_from"),
        ({"sparse.density_g": 0.5}, "sparse.method=dense trains every weight"),
    ],
)
def test_bad_values_fail_with_one_line(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(None, overrides)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config file 'nope\.yaml' not found"):
        load_config("nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(scalar)
    typo = tmp_path / "typo.yaml"
    typo.write_text("train:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match=r"did you mean train\.steps"):
        load_config(typo)


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sgtrain", *args], cwd=cwd, capture_output=True, text=True)


@pytest.mark.parametrize(
    "args",
    [
        ["--train.g_lr=-1"],
        ["--sparse.density_g=1.5"],
        ["--model.resolution=48"],
        ["--train.stepz=3"],
        ["train", "--config", "nope.yaml"],
        ["--sparse.method=prune_finetune"],
        ["--sparse.method=prune_finetune", "--sparse.prune_from=/nonexistent/dense-run"],
        ["--sparse.grow_g=magnitude"],
    ],
)
def test_cli_bad_input_exits_2_before_any_work(args: list[str], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = _cli(*args, f"--run_dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sgtrain: error: ")
    assert not run_dir.exists()  # nothing was written


@pytest.mark.parametrize(
    ("command", "stray"),
    [
        # A checkpoint after the run used to land in --truncation and fail deep in sampling, after loading the run.
        (["evaluate", "RUN", "RUN/checkpoints/step-00001200.pt", "--metrics", "fid", "--num-samples", "10"], 2),
        (["evaluate", "RUN", "--json", "--metrics=fid", "extra"], 4),
        (["sample", "RUN", "OUT.png", "--classes", "1,3", "extra"], 5),
        (["sample", "--from", "G.sgt", "--out", "OUT.png", "extra"], 5),
    ],
)
def test_a_stray_argument_is_refused_before_any_work(command: list[str], stray: int, tmp_path: Path) -> None:
    args = [a.replace("RUN", str(tmp_path / "run")).replace("OUT", str(tmp_path / "out")) for a in command]
    result = _cli(*args, cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"sgtrain: error: {command[0]}: unexpected argument ")
    assert repr(args[stray]) in lines[0] and "options go by flag" in lines[0]
    assert not list(tmp_path.iterdir())  # nothing was written


def test_cli_print_config_and_help(tmp_path: Path) -> None:
    result = _cli("print-config", "--config", "imagenet128.yaml", "--train.steps=5", cwd=tmp_path)
    assert result.returncode == 0
    printed = tmp_path / "printed.yaml"
    printed.write_text(result.stdout)
    assert load_config(printed) == load_config("imagenet128.yaml", {"train.steps": 5})
    bare = _cli("print-config", cwd=tmp_path)  # no --config: the embedded default job, digits.yaml
    assert bare.returncode == 0
    printed.write_text(bare.stdout)
    assert load_config(printed) == load_config("digits.yaml")
    helped = _cli("--help", cwd=tmp_path)
    assert helped.returncode == 0
    assert "train" in helped.stdout and "print-config" in helped.stdout
    unknown = _cli("frobnicate", cwd=tmp_path)
    assert unknown.returncode == 2 and "unknown command 'frobnicate'" in unknown.stderr


def test_base_key_layers_a_config_over_another(tmp_path: Path) -> None:
    dense = load_config("cifar10_dense.yaml")
    sparse = load_config("cifar10.yaml")
    assert dense.model == sparse.model and dense.train == sparse.train
    assert (dense.sparse.method, sparse.sparse.method) == ("dense", "stu")
    assert (sparse.sparse.density_g, sparse.sparse.density_d) == (0.2, 0.5)
    mine = tmp_path / "mine.yaml"
    mine.write_text("base: imagenet128.yaml\ntrain:\n  steps: 9\n")
    cfg = load_config(mine)
    assert cfg.train.steps == 9 and cfg.model.g_ch == 96 and cfg.train.accumulation == 8
    loop = tmp_path / "loop.yaml"
    loop.write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(loop)


def test_shipped_main_configs_train_stu_and_dense_baselines_have_a_suffix() -> None:
    assert load_config("digits.yaml").sparse.method == "stu"
    assert load_config("cifar10.yaml").sparse.method == "stu"
    imagenet = load_config("imagenet128.yaml").sparse
    assert (imagenet.method, imagenet.density_g, imagenet.density_d) == ("stu", 0.2, 0.3)
    for name in ("cifar10_dense.yaml", "imagenet128_dense.yaml"):
        assert load_config(name).sparse.method == "dense"
