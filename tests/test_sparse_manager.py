"""The mask manager driven exactly as the training loop drives it (docs/design.md, "The sparse core" and "Invariants").

A :class:`Harness` builds the tiny BigGAN pair, BigGAN's Adam (betas 0, 0.999), an EMA and a ``MaskManager``, and
runs real hinge-loss GAN steps on random data: a D step, then a G step with D frozen, with
``before_step``/``after_step`` around each optimizer step and ``ema.update``, ``after_ema``, ``maybe_update`` after
each G step. Each step returns what a test needs to check the manager against an independent computation: the
dense gradients read just before ``before_step``, and the masks and weights just before ``maybe_update``.
Expected counts are always recomputed here from ``layer_densities``/``active_counts`` of the masked shapes, never
read back from the manager.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from sgtrain import checkpoint
from sgtrain.config import Config, ConfigError, load_config
from sgtrain.ema import EMA
from sgtrain.models.build import build_models
from sgtrain.models.layers import ConditionalBatchNorm2d
from sgtrain.sparse.distribution import active_counts, layer_densities
from sgtrain.sparse.manager import GRAD_MOMENTUM, MaskManager, masked_parameters
from sgtrain.sparse.schedule import gmp_density
from sgtrain.sparse.topology import layer_seed, random_scores, unpack_mask
from sgtrain.step import GanStep, LocalNetwork
from sgtrain.train import train

TINY_MODEL = {"model.g_ch": 4, "model.d_ch": 4, "model.dim_z": 20, "model.shared_dim": 8}
NETS = ("G", "D")
BATCH = 4
DENSITY = {"G": 0.2, "D": 0.3}  # the paper's unbalanced 20% G / 30% D
LR = 2e-3  # larger than BigGAN's so a few steps move weights visibly

# The tiny models' masked layers, in module order (the manager's order); everything else stays dense.
G_CONVS = [f"blocks.{b}.{c}" for b in range(3) for c in ("conv1", "conv2", "conv_sc")] + ["output_conv"]
D_CONVS = [f"blocks.{b}.{c}" for b in range(2) for c in ("conv1", "conv2", "conv_sc")]
D_CONVS += [f"blocks.{b}.{c}" for b in (2, 3) for c in ("conv1", "conv2")]
MASKED = {"G": ["linear", *G_CONVS], "D": [*D_CONVS, "linear"]}
CONV_ONLY = {"G": G_CONVS, "D": D_CONVS}
MODES = ("dense", "masked")  # sparse.optimizer_state


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine OpenMP's spinning barriers make every
    step 50x slower; one thread keeps the file fast and its timings steady. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_config(seed: int = 0, **sparse: Any) -> Config:
    values: dict[str, Any] = dict(TINY_MODEL)
    values["seed"] = seed
    values["sparse.density_g"] = DENSITY["G"]
    values["sparse.density_d"] = DENSITY["D"]
    # The harness masks linear layers too (MASKED), a superset of the default conv-only targets.
    values["sparse.targets"] = "conv_linear"
    values.update({f"sparse.{key}": value for key, value in sparse.items()})
    return load_config(None, values)


@dataclass
class StepRecord:
    """What one harness step saw: by network, then by masked layer name."""

    step: int
    grads: dict[str, dict[str, torch.Tensor]]  # dense gradients, read just before before_step
    weights: dict[str, dict[str, torch.Tensor]]  # weights just before maybe_update
    masks: dict[str, dict[str, torch.Tensor]]  # masks just before maybe_update (the ones after_ema saw)
    ema: dict[str, torch.Tensor]  # EMA of G's masked weights just after after_ema
    metrics: dict[str, float]  # maybe_update's return
    moments: dict[str, dict[str, dict[str, torch.Tensor]]]  # Adam's exp_avg / exp_avg_sq just before maybe_update


class Harness:
    """Tiny G and D, Adam, EMA and a MaskManager, stepped exactly as ``sgtrain.train`` steps them."""

    def __init__(
        self,
        *,
        total_steps: int = 10,
        seed: int = 0,
        model_seed: int = 0,
        ema_decay: float = 0.9,
        start_from: Harness | None = None,
        **sparse: Any,
    ) -> None:
        self.cfg = make_config(model_seed, **sparse)
        self.G, self.D = build_models(self.cfg.model, self.cfg.seed)
        self.opt = {
            "G": torch.optim.Adam(self.G.parameters(), lr=LR, betas=(0.0, 0.999), eps=1e-6),
            "D": torch.optim.Adam(self.D.parameters(), lr=LR, betas=(0.0, 0.999), eps=1e-6),
        }
        self.masks = MaskManager(
            self.cfg.sparse,
            generator=self.G,
            discriminator=self.D,
            optimizers=self.opt,
            total_steps=total_steps,
            seed=seed,
        )
        if start_from is None:  # as the training setup does: a dense checkpoint's weights for prune_finetune
            pretrained = self.masks.wants_dense_weights
            self.masks.initialize(checkpoint.read_pretrained(self.cfg.sparse.prune_from) if pretrained else None)
        else:  # as a resume does: weights, then the manager's state
            self.G.load_state_dict(start_from.G.state_dict())
            self.D.load_state_dict(start_from.D.state_dict())
            self.masks.load_state_dict(start_from.masks.state_dict())
        self.ema = EMA(self.G, decay=ema_decay, start=0)
        self.step = 0

    def module(self, net: str) -> nn.Module:
        return self.G if net == "G" else self.D

    def mask_tree(self) -> dict[str, dict[str, torch.Tensor]]:
        return {net: {layer.name: layer.mask.clone() for layer in self.masks.layers[net]} for net in NETS}

    def union_tree(self) -> dict[str, dict[str, torch.Tensor]]:
        return {net: {layer.name: layer.union.clone() for layer in self.masks.layers[net]} for net in NETS}

    def weight_tree(self) -> dict[str, dict[str, torch.Tensor]]:
        return {net: {layer.name: layer.param.detach().clone() for layer in self.masks.layers[net]} for net in NETS}

    def _grads(self, net: str) -> dict[str, torch.Tensor]:
        return {
            layer.name: layer.param.grad.clone() for layer in self.masks.layers[net] if layer.param.grad is not None
        }

    def train_step(self) -> StepRecord:
        # The data depend on the step only (never on the manager's seed or the global RNG).
        gen = torch.Generator().manual_seed(1000 + self.step)
        real = torch.rand(BATCH, 3, 32, 32, generator=gen) * 2 - 1
        y_real = torch.randint(10, (BATCH,), generator=gen)
        z, y_fake = torch.randn(BATCH, 20, generator=gen), torch.randint(10, (BATCH,), generator=gen)
        z_g, y_g = torch.randn(BATCH, 20, generator=gen), torch.randint(10, (BATCH,), generator=gen)
        latents = iter([(z, y_fake), (z_g, y_g)])
        grads: dict[str, dict[str, torch.Tensor]] = {}
        seen: dict[str, Any] = {}

        def probe(event: str) -> None:
            if event in NETS:  # the network's gradients, before the masks see them
                grads[event] = self._grads(event)
                return
            # Before the topology update.
            ema_params = dict(self.ema.module.named_parameters())
            seen["ema"] = {layer.name: ema_params[f"{layer.name}.weight"].clone() for layer in self.masks.layers["G"]}
            seen["weights"], seen["masks"], seen["moments"] = self.weight_tree(), self.mask_tree(), self.moment_tree()

        # The training loop's own iteration: D step on real and fake, G step with D frozen, EMA, topology update.
        gan = GanStep(
            G=LocalNetwork(self.G, self.opt["G"]),
            D=LocalNetwork(self.D, self.opt["D"]),
            masks=self.masks,
            ema=self.ema,
            probe=probe,
        )
        result = gan(self.step, lambda: (real, y_real), lambda: next(latents))
        self.step += 1
        return StepRecord(
            self.step, grads, seen["weights"], seen["masks"], seen["ema"], result.topology, seen["moments"]
        )

    def moment_tree(self) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
        return {
            net: {
                layer.name: {key: self.opt[net].state[layer.param][key].clone() for key in ("exp_avg", "exp_avg_sq")}
                for layer in self.masks.layers[net]
            }
            for net in NETS
        }


# --------------------------------------------------------------------------------------------------------------------
# Independent expectations and checks.


def all_layers(h: Harness) -> list:
    return [layer for net in NETS for layer in h.masks.layers[net]]


def shapes_of(h: Harness, net: str) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in masked_parameters(h.module(net), h.cfg.sparse.targets)}


def expected_counts(h: Harness, net: str) -> dict[str, int]:
    """Per-layer active counts of ``net`` at its target density, from the pure distribution of the masked shapes."""
    s = h.cfg.sparse
    shapes = shapes_of(h, net)
    names = list(shapes)
    dense = {names[0], names[-1]} if s.dense_first_last else set()
    densities = layer_densities(shapes, DENSITY[net], kind=s.distribution, power=s.erk_power, dense=dense)
    return active_counts(shapes, densities)


def mask_counts(h: Harness, net: str) -> dict[str, int]:
    return {layer.name: int(layer.mask.sum()) for layer in h.masks.layers[net]}


def assert_counts(h: Harness, net: str, expected: dict[str, int], where: str = "") -> None:
    assert mask_counts(h, net) == expected, f"{net} {where}"
    assert {layer.name: layer.count for layer in h.masks.layers[net]} == expected, f"{net} {where}"


def assert_inactive_zero(h: Harness, where: str = "") -> None:
    """Invariant 2: inactive weights are exactly zero, and in masked mode so are their Adam moments."""
    for net in NETS:
        for layer in h.masks.layers[net]:
            off = ~layer.mask
            assert torch.all(layer.param.detach()[off] == 0), f"{net}.{layer.name} {where}: inactive weight != 0"
            if h.cfg.sparse.optimizer_state == "dense":
                continue  # Adam steps inactive weights on their dense gradients: warm moments, by design
            state = h.opt[net].state[layer.param]
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.all(state[key][off] == 0), f"{net}.{layer.name} {where}: inactive {key} != 0"


def changed_layers(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> list[str]:
    return [name for name in before if not torch.equal(before[name], after[name])]


def cosine_fraction(
    step: int, total: int, update_end: float, drop_fraction: float = 0.5, floor: float = 0.005
) -> float:
    """The authors' CosineAnnealingLR(T_max=update_end * total, eta_min=floor) at ``step``, in closed form."""
    return floor + (drop_fraction - floor) / 2 * (1 + math.cos(math.pi * step / (update_end * total)))


# --------------------------------------------------------------------------------------------------------------------
# 1. Initial masks: exact counts, what is masked.


@pytest.mark.parametrize("distribution", ["uniform", "ER", "ERK"])
@pytest.mark.parametrize("method", ["static", "stu"])
def test_initial_masks_hold_exact_counts(method: str, distribution: str) -> None:
    h = Harness(method=method, distribution=distribution)
    for net in NETS:
        expected = expected_counts(h, net)
        assert_counts(h, net, expected)
        total = sum(p.numel() for p in dict(masked_parameters(h.module(net), "conv_linear")).values())
        assert abs(sum(expected.values()) - DENSITY[net] * total) <= len(expected)
        assert sum(expected.values()) < total  # really sparse
        for layer in h.masks.layers[net]:
            # The weights are masked: zero exactly off the mask, untouched (non-zero after ortho init) on it.
            w = layer.param.detach()
            assert torch.equal(w != 0, layer.mask), f"{net}.{layer.name}"
            assert torch.equal(layer.union, layer.mask)
            assert torch.equal(layer.ema_mask, layer.mask)
        assert h.masks.density(net) == sum(expected.values()) / total


def test_masks_cover_conv_and_linear_weights_but_no_embedding_bias_or_norm() -> None:
    h = Harness(method="static")
    fresh_g, fresh_d = build_models(h.cfg.model, h.cfg.seed)
    for net, fresh in (("G", fresh_g), ("D", fresh_d)):
        module = h.module(net)
        assert [layer.name for layer in h.masks.layers[net]] == MASKED[net]
        assert [name for name, _ in masked_parameters(module, "conv_linear")] == MASKED[net]
        for layer in h.masks.layers[net]:
            assert layer.param is module.get_submodule(layer.name).weight
        # Every other parameter (embeddings, biases, BN, the conditional BN's gain/bias linears) is untouched.
        masked = {f"{name}.weight" for name in MASKED[net]}
        others = dict(fresh.named_parameters())
        for name, p in module.named_parameters():
            if name not in masked:
                assert torch.equal(p, others[name]), f"{net}.{name} changed"
    # The exclusions are real: the class-conditional BN's gain is a linear layer, and embeddings exist.
    cbn = h.G.blocks[0].bn1
    assert isinstance(cbn, ConditionalBatchNorm2d) and isinstance(cbn.gain, nn.Linear)
    assert isinstance(h.G.shared, nn.Embedding) and isinstance(h.D.embed, nn.Embedding)


def test_conv_only_targets_leave_linear_layers_dense() -> None:
    h = Harness(method="static", targets="conv_only")
    for net in NETS:
        assert [layer.name for layer in h.masks.layers[net]] == CONV_ONLY[net]
        assert_counts(h, net, expected_counts(h, net))
        linear = h.module(net).linear.weight
        assert bool(torch.all(linear != 0)), f"{net}.linear was masked"


@pytest.mark.parametrize("distribution", ["uniform", "ERK"])
def test_dense_first_last_keeps_each_nets_first_and_last_layer_dense(distribution: str) -> None:
    h = Harness(method="stu", distribution=distribution, dense_first_last=True, explore="GD", update_every=1)
    for net in NETS:
        layers = h.masks.layers[net]
        expected = expected_counts(h, net)
        assert_counts(h, net, expected)
        for layer in (layers[0], layers[-1]):
            assert bool(layer.mask.all()), f"{net}.{layer.name} is not dense"
        if distribution == "uniform":
            assert all(not layer.mask.all() for layer in layers[1:-1])
        else:  # the dense layers are paid out of the budget
            total = sum(layer.numel for layer in layers)
            assert abs(sum(expected.values()) - DENSITY[net] * total) <= len(layers)
    # They stay dense through topology updates.
    for _ in range(2):
        h.train_step()
    for net in NETS:
        assert_counts(h, net, expected_counts(h, net))
        assert bool(h.masks.layers[net][0].mask.all()) and bool(h.masks.layers[net][-1].mask.all())


# --------------------------------------------------------------------------------------------------------------------
# 2-3. Topology updates: counts, which nets change, zeros and optimizer state.


@pytest.mark.parametrize("mode", MODES)
def test_before_step_masks_gradients_in_masked_mode_and_after_step_masks_weights(mode: str) -> None:
    # before_step zeroes the gradients of inactive weights in masked mode and leaves them whole in dense mode (the
    # authors'); after_step re-masks the weights in both (Adam's dense step, or weight decay or drift in an
    # optimizer, would otherwise revive them). Both checked on deliberately dirtied tensors.
    h = Harness(method="static", optimizer_state=mode)
    h.train_step()
    for net in NETS:
        for layer in h.masks.layers[net]:
            layer.param.grad = torch.ones_like(layer.param)
        h.masks.before_step(net)
        with torch.no_grad():
            for layer in h.masks.layers[net]:
                expected = layer.mask.float() if mode == "masked" else torch.ones_like(layer.param)
                assert torch.equal(layer.param.grad, expected), f"{net}.{layer.name}"
                layer.param.fill_(0.5)
        h.masks.after_step(net)
        for layer in h.masks.layers[net]:
            assert torch.equal(layer.param.detach(), layer.mask * 0.5), f"{net}.{layer.name}"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("explore", ["G", "D", "GD"])
@pytest.mark.parametrize("grow", ["gradient", "random", "momentum"])
def test_updates_preserve_every_layers_count(grow: str, explore: str, mode: str) -> None:
    steps = 10
    h = Harness(
        method="stu",
        explore=explore,
        grow_g=grow,
        grow_d=grow,
        update_every=1,
        update_end=1.0,
        total_steps=2 * steps,
        optimizer_state=mode,
    )
    expected = {net: expected_counts(h, net) for net in NETS}
    initial = h.mask_tree()
    ever_changed = {net: False for net in NETS}
    for step in range(1, steps + 1):
        record = h.train_step()
        assert record.metrics, f"no topology update at step {step}"
        after = h.mask_tree()
        for net in NETS:
            assert_counts(h, net, expected[net], f"after update {step}")
            moved = changed_layers(record.masks[net], after[net])
            if net in explore:
                ever_changed[net] |= bool(moved)
                if step == 1:  # the first update (drop fraction ~0.5) must swap weights
                    assert moved, f"{net} did not change at the first update"
            else:
                assert changed_layers(initial[net], after[net]) == [], f"{net} explored with explore={explore}"
        assert_inactive_zero(h, f"step {step}")
    assert all(ever_changed[net] for net in explore)


def test_updates_stop_after_update_end() -> None:
    total, update_end = 12, 0.5  # updates at steps 2, 4, 6 (the last with drop fraction 0), none after
    h = Harness(
        method="stu", explore="GD", update_every=2, update_end=update_end, total_steps=total, drop_fraction_min=0.0
    )
    changed_at = []
    for _ in range(total):
        record = h.train_step()
        after = h.mask_tree()
        if any(changed_layers(record.masks[net], after[net]) for net in NETS):
            changed_at.append(record.step)
        assert bool(record.metrics) == (record.step in (2, 4, 6)), record.step
    assert changed_at == [2, 4]
    for net in NETS:
        assert_counts(h, net, expected_counts(h, net))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("grow", ["gradient", "random", "momentum"])
def test_inactive_weights_stay_zero_and_updates_start_grown_weights_at_zero_with_the_modes_moments(
    grow: str, mode: str
) -> None:
    """Inactive weights are zero after every step and grown ones start at zero. Moments: masked mode keeps those of
    inactive weights at zero and seeds grown ones; dense mode (the authors') never touches Adam's state."""
    h = Harness(
        method="stu", explore="GD", grow_g=grow, grow_d=grow, update_every=2, total_steps=10, optimizer_state=mode
    )
    for _ in range(7):
        record = h.train_step()
        assert_inactive_zero(h, f"step {record.step}")
        if not record.metrics:
            assert all(changed_layers(record.masks[net], h.mask_tree()[net]) == [] for net in NETS)
            continue
        for net in NETS:
            state = h.opt[net].state
            for layer in h.masks.layers[net]:
                old, new = record.masks[net][layer.name], layer.mask
                grown, dropped = new & ~old, old & ~new
                assert int(grown.sum()) == int(dropped.sum())
                assert not torch.any(grown & old)  # grown positions were inactive before the update
                w = layer.param.detach()
                assert torch.all(w[grown] == 0), f"{net}.{layer.name}: grown weight not zero"
                assert torch.all(w[dropped] == 0), f"{net}.{layer.name}: dropped weight not zero"
                # Weights kept across the update are untouched.
                kept = old & new
                assert torch.equal(w[kept], record.weights[net][layer.name][kept])
                before = record.moments[net][layer.name]
                if mode == "dense":
                    # The authors': Adam's state is never touched, so a grown weight keeps its warm moments.
                    for key in ("exp_avg", "exp_avg_sq"):
                        assert torch.equal(state[layer.param][key], before[key]), f"{net}.{layer.name} {key}"
                    continue
                assert torch.all(state[layer.param]["exp_avg"][grown | dropped] == 0), f"{net}.{layer.name}"
                v = state[layer.param]["exp_avg_sq"]
                assert torch.all(v[dropped] == 0), f"{net}.{layer.name}: dropped exp_avg_sq"
                assert torch.equal(v[kept], before["exp_avg_sq"][kept]), f"{net}.{layer.name}: kept exp_avg_sq"
                # Grown: seeded with the mean second moment of the weights kept active, whatever the growth mode.
                expected = before["exp_avg_sq"][kept].mean().expand(int(grown.sum()))
                torch.testing.assert_close(v[grown], expected, rtol=1e-6, atol=0, msg=f"{net}.{layer.name}")
                assert bool(grown.any()) <= bool(torch.all(v[grown] > 0)), f"{net}.{layer.name}: grown v is zero"
        # The dropped weights were live and non-zero before: the zeroing above is the update's doing.
        assert any(
            torch.any(record.weights[net][layer.name][record.masks[net][layer.name] & ~layer.mask] != 0)
            for net in NETS
            for layer in h.masks.layers[net]
        )


def test_masked_mode_without_seeding_zeroes_grown_moments() -> None:
    """The behaviour before the fix (``grown_moments = "zero"``, kept for the benchmark): every slot of a changed
    weight cleared, so a grown weight's second moment starts at zero."""
    h = Harness(method="stu", explore="G", update_every=2, total_steps=10, optimizer_state="masked")
    h.masks.grown_moments = "zero"
    for _ in range(2):
        record = h.train_step()
    assert record.metrics
    grew = 0
    for layer in h.masks.layers["G"]:
        grown = layer.mask & ~record.masks["G"][layer.name]
        grew += int(grown.sum())
        for key in ("exp_avg", "exp_avg_sq"):
            assert not h.opt["G"].state[layer.param][key][grown].any(), f"G.{layer.name} {key}"
    assert grew > 0, "nothing grew: the test shows nothing"


# --------------------------------------------------------------------------------------------------------------------
# 4-5. What the updates select.


def _assert_update_selects(
    h: Harness, record: StepRecord, fraction: float, scores: dict[tuple[str, str], torch.Tensor]
) -> None:
    """At an update: every sparse layer swapped exactly k weights, dropping its k smallest |w| and growing the k
    previously inactive positions of largest score (ties aside, which these real-valued scores do not have)."""
    for layer in all_layers(h):
        net, name = layer.net, layer.name
        old, new = record.masks[net][name], layer.mask
        if bool(old.all()):
            assert bool(new.all())
            continue  # ERK made the layer dense: nothing to grow
        count = int(old.sum())
        k = min(round(fraction * count), count, old.numel() - count)
        grown, dropped = new & ~old, old & ~new
        assert int(grown.sum()) == k and int(dropped.sum()) == k, f"{net}.{name}"
        if k == 0:
            continue
        score = scores[net, name]
        assert score.shape == layer.param.shape
        rest, kept = ~old & ~grown, old & ~dropped  # rest is empty where k was clamped to the inactive count
        if bool(rest.any()):
            assert score[grown].min() >= score[rest].max(), f"{net}.{name}: grew other than the top scores"
        magnitude = record.weights[net][name].abs()
        assert magnitude[dropped].max() <= magnitude[kept].min(), f"{net}.{name}: dropped large weights"


@pytest.mark.parametrize("grow", ["gradient", "momentum"])
def test_gradient_and_momentum_growth_use_the_dense_gradient(grow: str) -> None:
    total = 8
    h = Harness(method="stu", explore="GD", grow_g=grow, grow_d=grow, update_every=2, total_steps=total)
    momentum: dict[tuple[str, str], torch.Tensor] = {}
    updates = 0
    for _ in range(5):
        record = h.train_step()
        # Momentum growth: a running average (beta GRAD_MOMENTUM) of every step's dense gradient.
        for net in NETS:
            for name, grad in record.grads[net].items():
                m = momentum.setdefault((net, name), torch.zeros_like(grad))
                m.mul_(GRAD_MOMENTUM).add_(grad, alpha=1 - GRAD_MOMENTUM)
        if not record.metrics:
            continue
        updates += 1
        if grow == "gradient":  # the dense gradient of this very step, read before before_step masked it
            scores = {(net, name): g.abs() for net in NETS for name, g in record.grads[net].items()}
        else:
            scores = {key: m.abs() for key, m in momentum.items()}
        # Not vacuous: the positions to grow from carry real (unmasked) gradient.
        for net in NETS:
            for name, old in record.masks[net].items():
                assert bool(old.all()) or bool(torch.any(scores[net, name][~old] > 0)), f"{net}.{name}"
        _assert_update_selects(h, record, cosine_fraction(record.step, total, h.cfg.sparse.update_end), scores)
    assert updates == 2


def test_random_growth_is_a_pure_function_of_seed_update_and_layer() -> None:
    total, every = 8, 2
    sparse = {"method": "stu", "explore": "GD", "grow_g": "random", "grow_d": "random", "update_every": every}
    a = Harness(seed=0, total_steps=total, **sparse)
    b = Harness(seed=0, total_steps=total, **sparse)
    initial = a.mask_tree()
    index = {(layer.net, layer.name): i for i, layer in enumerate(all_layers(a))}  # G's layers, then D's
    updates = 0
    for step in range(1, 7):
        record = a.train_step()
        torch.manual_seed(1234 + step)  # the global RNG must play no part in the masks
        b.train_step()
        for net in NETS:
            assert changed_layers(a.mask_tree()[net], b.mask_tree()[net]) == [], f"step {step}: {net} differs"
        if not record.metrics:
            continue
        updates += 1
        # The grow scores are uniform numbers from a generator seeded by (seed, update index, layer index).
        scores = {}
        for (net, name), i in index.items():
            generator = torch.Generator().manual_seed(layer_seed(0, step // every, i))
            scores[net, name] = random_scores(record.masks[net][name].shape, generator)
        _assert_update_selects(a, record, cosine_fraction(step, total, a.cfg.sparse.update_end), scores)
    assert updates == 3
    assert all(changed_layers(initial[net], a.mask_tree()[net]) for net in NETS)

    # Another seed from the very same state (masks and weights) grows elsewhere: drops agree, grows do not.
    start = Harness(seed=0, total_steps=total, **sparse)
    same = Harness(seed=0, total_steps=total, start_from=start, **sparse)
    other = Harness(seed=1, total_steps=total, start_from=start, **sparse)
    before = start.mask_tree()
    for h in (same, other):
        for _ in range(2):  # one update, at step 2
            h.train_step()
    for net in NETS:
        for layer_same, layer_other in zip(same.masks.layers[net], other.masks.layers[net], strict=True):
            old = before[net][layer_same.name]
            assert torch.equal(old & ~layer_same.mask, old & ~layer_other.mask)  # same magnitudes, same drops
        assert changed_layers(same.mask_tree()[net], other.mask_tree()[net]), f"{net}: seed did not matter"


# --------------------------------------------------------------------------------------------------------------------
# 6-7. Sparse EMA and in-time over-parameterisation.


def test_sparse_ema_follows_gs_mask_and_grown_weights_take_gs_value() -> None:
    decay = 0.9
    h = Harness(method="stu", explore="G", grow_g="gradient", update_every=2, total_steps=10, ema_decay=decay)
    previous: StepRecord | None = None
    checked_grown = 0
    for _ in range(5):
        record = h.train_step()
        for name, mask in record.masks["G"].items():
            ema, live = record.ema[name], record.weights["G"][name]
            assert torch.all(ema[~mask] == 0), f"EMA of {name} non-zero off G's mask"
            if previous is None:
                continue
            old_mask = previous.masks["G"][name]
            # Positions grown by the update after the previous step take G's live value, not a lerp from 0.
            grown = mask & ~old_mask
            assert torch.equal(ema[grown], live[grown]), name
            checked_grown += int((live[grown] != 0).sum())
            # Positions active on both sides are averaged as usual.
            kept = mask & old_mask
            expected = torch.lerp(previous.ema[name], live, 1.0 - decay)
            assert torch.equal(ema[kept], expected[kept]), name
        previous = record
    assert checked_grown > 0  # grown weights had moved off zero, so a lerp from 0 would have differed


def test_itop_union_only_grows_and_contains_the_mask() -> None:
    h = Harness(method="stu", explore="GD", update_every=1, update_end=1.0, total_steps=12)
    unions = h.union_tree()
    totals = {net: sum(layer.numel for layer in h.masks.layers[net]) for net in NETS}
    for _ in range(6):
        record = h.train_step()
        now = h.union_tree()
        for net in NETS:
            for layer in h.masks.layers[net]:
                assert not torch.any(unions[net][layer.name] & ~now[net][layer.name]), "the union shrank"
                assert not torch.any(layer.mask & ~layer.union), "the mask left the union"
                assert torch.equal(layer.union, unions[net][layer.name] | layer.mask)
            rate = sum(int(u.sum()) for u in now[net].values()) / totals[net]
            assert h.masks.itop_rate(net) == pytest.approx(rate, abs=1e-12)
            assert record.metrics[f"sparse/{net}_itop_rate"] == pytest.approx(rate, abs=1e-12)
        unions = now
    for net in NETS:
        assert h.masks.itop_rate(net) > h.masks.density(net) + 0.01

    static = Harness(method="static")
    for _ in range(2):
        static.train_step()
    for net in NETS:
        assert static.masks.itop_rate(net) == pytest.approx(static.masks.density(net), abs=1e-12)


# --------------------------------------------------------------------------------------------------------------------
# 8-10. Baselines: SNIP, GMP, prune-and-finetune.


def test_snip_keeps_the_largest_w_times_g_of_the_first_batch_globally() -> None:
    h = Harness(method="snip")
    initial = h.weight_tree()
    for net in NETS:  # dense until the first step
        assert all(bool(layer.mask.all()) and layer.count == layer.numel for layer in h.masks.layers[net])
    first = h.train_step()
    for net in NETS:
        layers = h.masks.layers[net]
        total = sum(layer.numel for layer in layers)
        keep = round(DENSITY[net] * total)
        assert sum(int(layer.mask.sum()) for layer in layers) == keep
        assert sum(layer.count for layer in layers) == keep
        score = torch.cat([(initial[net][n] * first.grads[net][n]).abs().reshape(-1) for n in MASKED[net]])
        kept = torch.cat([layer.mask.reshape(-1) for layer in layers])
        assert score[kept].min() >= score[~kept].max(), f"{net}: SNIP did not keep the top |w*g|"
        # Not a per-layer cut: the per-layer densities differ.
        assert len({round(layer.count / layer.numel, 3) for layer in layers}) > 1
    assert_inactive_zero(h, "after the SNIP step")
    pruned = h.mask_tree()
    for _ in range(2):
        h.train_step()
        assert_inactive_zero(h)
    for net in NETS:
        assert changed_layers(pruned[net], h.mask_tree()[net]) == []


@pytest.mark.parametrize("distribution", ["uniform", "ERK"])
def test_gmp_prunes_from_dense_along_the_cubic_schedule(distribution: str) -> None:
    total = 16
    start, end = 4, 10  # gmp_start * total, gmp_end * total
    h = Harness(
        method="gmp",
        distribution=distribution,
        gmp_start=start / total,
        gmp_end=end / total,
        update_every=2,
        total_steps=total,
    )
    numel = {net: sum(layer.numel for layer in h.masks.layers[net]) for net in NETS}
    final = {net: expected_counts(h, net) for net in NETS}
    for _ in range(total - 2):
        record = h.train_step()
        step, after = record.step, h.mask_tree()
        assert_inactive_zero(h, f"step {step}")
        for net in NETS:
            layers = h.masks.layers[net]
            for layer in layers:
                old = record.masks[net][layer.name]
                assert not torch.any(layer.mask & ~old), "a GMP mask grew"
                pruned = old & ~layer.mask
                if bool(pruned.any()):  # magnitude pruning within the layer
                    w = record.weights[net][layer.name].abs()
                    assert w[pruned].max() <= w[layer.mask].min(), f"{net}.{layer.name} step {step}"
            count = sum(int(layer.mask.sum()) for layer in layers)
            if step <= start:
                assert count == numel[net], f"{net} pruned before gmp_start (step {step})"
            elif step <= end and step % 2 == 0:
                density = gmp_density(
                    step, initial_density=1.0, final_density=DENSITY[net], start_step=start, end_step=end
                )
                assert abs(count - density * numel[net]) <= len(layers), f"{net} step {step}"
                assert count < sum(int(m.sum()) for m in record.masks[net].values())
            else:
                assert changed_layers(record.masks[net], after[net]) == [], f"{net} pruned off-schedule at {step}"
            if step >= end:
                assert mask_counts(h, net) == final[net]
                assert abs(count - DENSITY[net] * numel[net]) <= len(layers)


@pytest.fixture
def dense_checkpoint(tmp_path: Path) -> tuple[Path, dict[str, dict[str, torch.Tensor]]]:
    """A dense G and D (other init seed than the harness) saved as a run directory's checkpoint."""
    tiny = load_config(None, {**TINY_MODEL, "seed": 5})
    G, D = build_models(tiny.model, tiny.seed)
    state = {"G": G.state_dict(), "D": D.state_dict()}
    checkpoint.save_checkpoint(tmp_path / "dense", 7, state, keep=1)
    return tmp_path / "dense", {net: {k: v.clone() for k, v in state[net].items()} for net in NETS}


def test_prune_finetune_global_keeps_the_largest_magnitudes_of_the_checkpoint(dense_checkpoint) -> None:
    run_dir, dense = dense_checkpoint
    h = Harness(method="prune_finetune", prune_from=str(run_dir), prune_scope="global")
    for net in NETS:
        layers = h.masks.layers[net]
        keep = round(DENSITY[net] * sum(layer.numel for layer in layers))
        assert sum(int(layer.mask.sum()) for layer in layers) == keep == sum(layer.count for layer in layers)
        magnitude = torch.cat([dense[net][f"{name}.weight"].abs().reshape(-1) for name in MASKED[net]])
        kept = torch.cat([layer.mask.reshape(-1) for layer in layers])
        assert magnitude[kept].min() >= magnitude[~kept].max()
        # The model now holds the checkpoint's weights, masked; every other tensor is the checkpoint's as is.
        masks = {f"{layer.name}.weight": layer.mask for layer in layers}
        for key, value in h.module(net).state_dict().items():
            expected = dense[net][key] * masks[key] if key in masks else dense[net][key]
            assert torch.equal(value, expected), f"{net}.{key}"
    # The topology is then fixed: fine-tuning keeps it.
    pruned = h.mask_tree()
    for _ in range(2):
        h.train_step()
        assert_inactive_zero(h)
    assert all(changed_layers(pruned[net], h.mask_tree()[net]) == [] for net in NETS)

    # The checkpoint file itself works as well as its run directory.
    by_file = Harness(
        method="prune_finetune", prune_from=str(checkpoint.list_checkpoints(run_dir)[-1]), prune_scope="global"
    )
    assert all(changed_layers(pruned[net], by_file.mask_tree()[net]) == [] for net in NETS)


def test_prune_finetune_layer_scope_keeps_the_distributions_counts(dense_checkpoint) -> None:
    run_dir, dense = dense_checkpoint
    h = Harness(method="prune_finetune", prune_from=str(run_dir), prune_scope="layer")
    for net in NETS:
        assert_counts(h, net, expected_counts(h, net))
        for layer in h.masks.layers[net]:
            magnitude = dense[net][f"{layer.name}.weight"].abs()
            if not bool(layer.mask.all()):
                assert magnitude[layer.mask].min() >= magnitude[~layer.mask].max(), f"{net}.{layer.name}"


def test_prune_finetune_without_a_checkpoint_is_a_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "step-00000001.pt"
    with pytest.raises(ConfigError, match=r"sparse\.prune_from: .*nowhere.* does not exist"):
        Harness(method="prune_finetune", prune_from=str(missing))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"sparse\.prune_from: no checkpoint in .*empty"):
        Harness(method="prune_finetune", prune_from=str(tmp_path / "empty"))
    # A checkpoint of another model is refused too, naming the network.
    wide = load_config(None, {"model.g_ch": 8})
    G, D = build_models(wide.model, wide.seed)
    checkpoint.save_checkpoint(tmp_path / "other", 1, {"G": G.state_dict(), "D": D.state_dict()}, keep=1)
    with pytest.raises(ConfigError, match=r"does not hold this model's G"):
        Harness(method="prune_finetune", prune_from=str(tmp_path / "other"))


def test_prune_finetune_needs_the_dense_weights_from_the_setup(dense_checkpoint) -> None:
    # The manager never reads checkpoints: the training setup reads sparse.prune_from and hands the weights over.
    run_dir, _ = dense_checkpoint
    cfg = make_config(method="prune_finetune", prune_from=str(run_dir))
    G, D = build_models(cfg.model, cfg.seed)
    masks = MaskManager(cfg.sparse, generator=G, discriminator=D, optimizers={}, total_steps=4, seed=0)
    assert masks.wants_dense_weights
    with pytest.raises(ConfigError, match=r"prunes a dense checkpoint.*read_pretrained"):
        masks.initialize()
    static = make_config(method="static")
    G, D = build_models(static.model, static.seed)
    masks = MaskManager(static.sparse, generator=G, discriminator=D, optimizers={}, total_steps=4, seed=0)
    assert not masks.wants_dense_weights
    with pytest.raises(ValueError, match="does not start from dense weights"):
        masks.initialize(checkpoint.read_pretrained(run_dir))


class _Exempt(nn.Module):
    sparse_exempt = True  # its linear layer stays dense, as the class-conditional BN's projections do

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (1 + self.proj(x))


def test_any_generator_and_discriminator_work_and_sparse_exempt_modules_stay_dense() -> None:
    """No BigGAN: plain MLPs with an exempt submodule, stepped through STU updates of both networks."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        G = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8), _Exempt(), nn.Linear(8, 2))
        D = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 1))
    sparse = {"method": "stu", "targets": "conv_linear", "explore": "GD", "update_every": 1, "distribution": "uniform"}
    cfg = load_config(
        None, {"sparse.density_g": 0.5, "sparse.density_d": 0.5, **{f"sparse.{k}": v for k, v in sparse.items()}}
    )
    opt = {"G": torch.optim.Adam(G.parameters(), lr=1e-2), "D": torch.optim.Adam(D.parameters(), lr=1e-2)}
    masks = MaskManager(cfg.sparse, generator=G, discriminator=D, optimizers=opt, total_steps=4, seed=0)
    assert [layer.name for layer in masks.layers["G"]] == ["0", "2", "4"]  # not "3.proj"
    assert [layer.name for layer in masks.layers["D"]] == ["0", "2"]
    masks.initialize()
    exempt = G[3].proj.weight.detach().clone()
    gen = torch.Generator().manual_seed(0)
    for step in range(1, 4):
        for net, sign in (("D", 1.0), ("G", -1.0)):
            opt[net].zero_grad(set_to_none=True)
            (sign * D(G(torch.randn(8, 4, generator=gen))).mean()).backward()
            masks.before_step(net)
            opt[net].step()
            masks.after_step(net)
        before = {net: [layer.mask for layer in masks.layers[net]] for net in NETS}
        assert masks.maybe_update(step), f"no update at step {step}"
        for net in NETS:
            for layer, old in zip(masks.layers[net], before[net], strict=True):
                assert int(layer.mask.sum()) == int(old.sum()) == layer.count
                assert torch.all(layer.param.detach()[~layer.mask] == 0)
            assert any(not torch.equal(a, layer.mask) for a, layer in zip(before[net], masks.layers[net], strict=True))
    assert bool(torch.all(G[3].proj.weight != 0)) and not torch.equal(G[3].proj.weight, exempt)  # trained, dense


# --------------------------------------------------------------------------------------------------------------------
# 11. The manager's checkpoint entry.


def test_state_dict_round_trip_is_exact_and_bit_packed() -> None:
    sparse = {"method": "stu", "explore": "GD", "grow_g": "momentum", "grow_d": "random", "update_every": 2}
    h = Harness(total_steps=10, **sparse)
    for _ in range(5):
        h.train_step()
    state = h.masks.state_dict()
    # Through bytes and the checkpoints' data-only loader.
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    assert state["method"] == "stu" and state["step"] == 5
    for layer in all_layers(h):
        entry = state["layers"][f"{layer.net}.{layer.name}"]
        for key in ("mask", "union", "ema_mask"):
            assert entry[key].dtype == torch.uint8 and entry[key].shape == (math.ceil(layer.numel / 8),), key

    fresh = Harness(seed=3, total_steps=10, **sparse)
    fresh.masks.load_state_dict(state)
    assert fresh.masks.step == 5 and fresh.masks.snip_pending == h.masks.snip_pending
    for a, b in zip(all_layers(h), all_layers(fresh), strict=True):
        assert (a.net, a.name, a.count) == (b.net, b.name, b.count)
        for key in ("mask", "union", "ema_mask"):
            assert torch.equal(getattr(a, key), getattr(b, key)), f"{a.net}.{a.name}.{key}"
            assert getattr(b, key).dtype == torch.bool
        assert (a.score is None) == (b.score is None)
        if a.score is not None:
            assert torch.equal(a.score, b.score)
    assert any(layer.score is not None for layer in fresh.masks.layers["G"])  # momentum scores travelled
    # The two managers are now interchangeable for reporting.
    for net in NETS:
        assert fresh.masks.itop_rate(net) == h.masks.itop_rate(net)
        assert fresh.masks.density(net) == h.masks.density(net)

    with pytest.raises(ConfigError, match="method=stu, not static"):
        Harness(method="static").masks.load_state_dict(state)
    with pytest.raises(ConfigError, match="other layers"):
        Harness(method="stu", targets="conv_only").masks.load_state_dict(state)


@pytest.mark.parametrize("grow", ["gradient", "momentum"])
def test_checkpoints_carry_grow_scores_only_where_they_will_be_read(grow: str) -> None:
    # Gradient scores are consumed by the update they were read for; momentum keeps a dense running score, but
    # only for the layers an update can change (not those ERK made dense).
    h = Harness(method="stu", explore="GD", grow_g=grow, grow_d=grow, update_every=2, total_steps=10)
    dense = [f"{layer.net}.{layer.name}" for layer in all_layers(h) if bool(layer.mask.all())]
    assert "G.linear" in dense and "D.linear" in dense  # ERK made these dense
    for _ in range(3):
        h.train_step()
    state = h.masks.state_dict()
    scored = [key for key, entry in state["layers"].items() if "score" in entry]
    if grow == "gradient":
        assert scored == []
    else:
        assert scored == [f"{layer.net}.{layer.name}" for layer in all_layers(h) if not bool(layer.mask.all())]


# --------------------------------------------------------------------------------------------------------------------
# 12. End to end through sgtrain.train: a run split by a kill equals the uninterrupted run.


class _Killed(Exception):
    pass


def _final_state(run_dir: Path) -> dict[str, Any]:
    return checkpoint.load_checkpoint(checkpoint.list_checkpoints(run_dir)[-1])


def _split_equals_straight(
    make: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, steps: int, assert_trees_equal: Any
) -> dict:
    """Train ``steps`` straight, and again killed right after the halfway checkpoint then resumed."""
    half = steps // 2
    train(make(tmp_path / "straight"))

    real_save = checkpoint.save_checkpoint

    def save_then_die(run_dir, step, state, keep):
        path = real_save(run_dir, step, state, keep)
        if step == half:
            raise _Killed
        return path

    split = make(tmp_path / "split")
    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_die)
    with pytest.raises(_Killed):
        train(split)
    monkeypatch.setattr(checkpoint, "save_checkpoint", real_save)
    assert [p.name for p in checkpoint.list_checkpoints(split.run_dir)] == [f"step-{half:08d}.pt"]
    halfway = _final_state(Path(split.run_dir))
    train(split)

    a, b = _final_state(tmp_path / "split"), _final_state(tmp_path / "straight")
    assert a["step"] == b["step"] == steps
    for key in ("position", "G", "D", "ema", "opt_g", "opt_d", "masks", "rng"):
        assert_trees_equal(a[key], b[key], key)
    # Not vacuous: the topology changed after the resume.
    before = halfway["masks"]["layers"]
    changed = [k for k, e in a["masks"]["layers"].items() if not torch.equal(e["mask"], before[k]["mask"])]
    assert changed, "no topology update after the resume"
    # And the saved weights respect the saved masks: G, D and the (sparse) EMA are zero off them.
    for key, entry in a["masks"]["layers"].items():
        net, name = key.split(".", 1)
        weight = a[net][f"{name}.weight"]
        off = ~unpack_mask(entry["mask"], weight.shape)
        assert int((~off).sum()) == entry["count"]
        assert torch.all(weight[off] == 0), key
        if net == "G":
            assert torch.all(a["ema"][f"{name}.weight"][off] == 0), key
    return a


@pytest.mark.parametrize(("grow_g", "mode"), [("gradient", "dense"), ("momentum", "dense"), ("gradient", "masked")])
def test_tiny_stu_run_killed_and_resumed_equals_uninterrupted(
    tiny_config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, grow_g: str, mode: str, assert_trees_equal
) -> None:
    def make(run_dir: Path) -> Config:
        return tiny_config(
            run_dir,
            train__steps=8,
            train__checkpoint_every=4,
            train__ema_start=2,
            sparse__method="stu",
            sparse__density_g=0.2,
            sparse__density_d=0.3,
            sparse__explore="GD",
            sparse__grow_g=grow_g,
            sparse__update_every=2,
            sparse__update_end=1.0,  # updates at 2, 4, 6 (and a no-op at 8): one after the resume at 4
            sparse__optimizer_state=mode,
        )

    _split_equals_straight(make, tmp_path, monkeypatch, 8, assert_trees_equal)


def test_default_config_sparse_run_resumed_halfway_ends_with_the_same_masks_and_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, assert_trees_equal
) -> None:
    # The acceptance point: the default config at G 20% / D 30%, resumed halfway.
    def make(run_dir: Path) -> Config:
        return load_config(
            None,
            {
                "run_dir": str(run_dir),
                "train.steps": 10,
                "train.checkpoint_every": 5,
                "train.sample_every": 1000,
                "train.log_every": 1,
                "sparse.method": "stu",
                "sparse.density_g": 0.2,
                "sparse.density_d": 0.3,
                "sparse.update_every": 2,
            },
        )

    final = _split_equals_straight(make, tmp_path, monkeypatch, 10, assert_trees_equal)
    made = make(tmp_path / "x")
    G, D = build_models(made.model, made.seed)
    for net, module in (("G", G), ("D", D)):
        masked = masked_parameters(module, make(tmp_path / "x").sparse.targets)  # the default: conv weights only
        total = sum(p.numel() for _, p in masked)
        active = sum(int(final["masks"]["layers"][f"{net}.{name}"]["count"]) for name, _ in masked)
        assert abs(active - DENSITY[net] * total) <= len(masked)
        nonzero = sum(int((final[net][f"{name}.weight"] != 0).sum()) for name, _ in masked)
        assert nonzero <= active


def test_ema_follows_gs_new_mask_right_after_an_update(tiny_config) -> None:
    """A checkpoint or sample grid taken at an update step sees the EMA masked with G's new topology."""
    cfg = tiny_config(
        train__steps=4,
        train__checkpoint_every=2,
        train__ema_start=0,
        sparse__method="stu",
        sparse__density_g=0.3,
        sparse__density_d=0.5,
        sparse__update_every=2,
        sparse__update_end=1.0,
    )
    train(cfg)
    state = checkpoint.load_checkpoint(checkpoint.list_checkpoints(cfg.run_dir)[0])  # step 2: an update step
    assert state["step"] == 2
    changed = 0
    for key, entry in state["masks"]["layers"].items():
        net, name = key.split(".", 1)
        if net != "G":
            continue
        mask = unpack_mask(entry["mask"], state["ema"][f"{name}.weight"].shape)
        assert torch.all(state["ema"][f"{name}.weight"][~mask] == 0), key
        changed += int((mask != unpack_mask(entry["ema_mask"], mask.shape)).sum())
    assert changed > 0  # the update did change G's topology after the EMA step
