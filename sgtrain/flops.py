"""FLOPs accounting for dense and sparse BigGANs: per layer, per network, per training iteration.

Convention (the sparse-training literature's, RigL, Evci et al. 2020, Appendix H): only the multiply-adds of the
weight layers (``nn.Conv2d``, ``nn.Linear``) and the two activation-by-activation matmuls of self-attention are
counted, one multiply-add = 2 FLOPs. Elementwise ops, normalisation, pooling, activations, softmax, embedding look-ups
and the upsampling are ignored: they are a small share of the total and do not scale with a layer's density, so
leaving them out is what makes dense and sparse counts comparable across papers. A sparse layer of density ``d`` costs
``d`` times its dense FLOPs (the hardware-independent, theoretical count that the papers report).

Usage::

    report = flops_report(G, D, resolution=32, n_classes=10, dim_z=128, batch_size=50, d_steps=4)
    print(format_flops(report["G"]["inference_dense"]))
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from sgtrain.models.layers import SelfAttention

ATTENTION_KEY = "(attention matmuls)"  # key of the attention matmuls in a layer-FLOPs mapping; always dense
_UNITS = ("FLOPs", "kFLOPs", "MFLOPs", "GFLOPs", "TFLOPs", "PFLOPs", "EFLOPs")


def _conv_flops(module: nn.Conv2d, output: torch.Tensor) -> int:
    # Every output element [b, c_out, h, w] is one dot product of length (C_in/groups) * kh * kw, plus the bias add.
    # Counting from the output shape covers stride, padding and dilation without re-deriving H_out and W_out.
    kh, kw = module.kernel_size
    macs_per_output = (module.in_channels // module.groups) * kh * kw
    return output.numel() * (2 * macs_per_output + (1 if module.bias is not None else 0))


def _linear_flops(module: nn.Linear, output: torch.Tensor) -> int:
    # output.numel() = (all leading dims) * out_features; each element is a dot product of length in_features.
    return output.numel() * (2 * module.in_features + (1 if module.bias is not None else 0))


def _attention_flops(module: SelfAttention, x: torch.Tensor) -> int:
    # The two bmm's of SelfAttention.forward, with keys and values max-pooled 2x2 (floor, as F.max_pool2d does):
    #   theta^T phi:   [HW, C_theta] @ [C_theta, HW/4]  -> 2 * HW * C_theta * HW/4
    #   g beta^T:      [C_g, HW/4]   @ [HW/4, HW]       -> 2 * C_g * HW/4 * HW
    # The softmax over the [HW, HW/4] logits and the gamma-scaled residual add are elementwise: not counted.
    b, _, h, w = x.shape
    hw, hw_pooled = h * w, (h // 2) * (w // 2)
    c_theta, c_g = module.theta.out_channels, module.g.out_channels
    return b * (2 * hw * c_theta * hw_pooled + 2 * c_g * hw_pooled * hw)


def layer_forward_flops(module: nn.Module, *inputs: torch.Tensor) -> dict[str, float]:
    """Forward FLOPs per sample of every ``nn.Conv2d`` and ``nn.Linear`` in ``module``, by qualified name.

    Runs ``module(*inputs)`` once under ``torch.no_grad`` in eval mode (so BN running statistics and spectral norm's
    ``u`` are left untouched) and restores every submodule's train/eval flag afterwards. Totals are divided by
    ``inputs[0].shape[0]``, the batch size. A multiply-add counts 2 FLOPs:

    - conv:   ``2 * (C_in/groups) * kh * kw * C_out * H_out * W_out`` (+ ``C_out * H_out * W_out`` with a bias)
    - linear: ``2 * in * out`` (+ ``out`` with a bias), per row of the input
    - ``"(attention matmuls)"`` (only when ``module`` holds a :class:`SelfAttention`): its two non-weight matmuls,
      ``theta^T phi`` and the attention-weighted sum of ``g``, summed over all attention blocks.

    Keys are the names of ``module.named_modules()`` (e.g. ``"blocks.0.conv1"``, ``"blocks.0.bn1.gain"``); a layer
    the forward does not reach reports 0, one called several times reports the sum of its calls. Not counted:
    elementwise ops, norms, pooling, activations, embeddings (RigL's convention, see the module docstring), and
    spectral norm's power iteration (a few matrix-vector products with the weight per layer per forward, ~6 FLOPs per
    weight whatever the batch size: a per-step cost, not a per-sample one, and ~1e-4 of a CIFAR-10 BigGAN forward
    over a batch of 50).
    """
    if not inputs:
        raise ValueError("layer_forward_flops needs at least one input tensor")
    batch = inputs[0].shape[0]
    if batch < 1:
        raise ValueError(f"inputs[0] has batch size {batch}; need at least one sample")

    totals: dict[str, int] = {}
    hooks: list[torch.utils.hooks.RemovableHandle] = []

    def count(name: str, flops: int) -> None:
        totals[name] = totals.get(name, 0) + flops

    for name, sub in module.named_modules():
        if isinstance(sub, nn.Conv2d):
            totals[name] = 0
            hooks.append(sub.register_forward_hook(lambda m, _i, out, name=name: count(name, _conv_flops(m, out))))
        elif isinstance(sub, nn.Linear):
            totals[name] = 0
            hooks.append(sub.register_forward_hook(lambda m, _i, out, name=name: count(name, _linear_flops(m, out))))
        elif isinstance(sub, SelfAttention):
            totals[ATTENTION_KEY] = 0
            hooks.append(
                sub.register_forward_hook(lambda m, inp, _o: count(ATTENTION_KEY, _attention_flops(m, inp[0])))
            )

    # Per-submodule flags, not just the root's: a caller may hold, e.g., a frozen BN in eval inside a training model.
    modes = {sub: sub.training for sub in module.modules()}
    try:
        module.eval()
        with torch.no_grad():
            module(*inputs)
    finally:
        for hook in hooks:
            hook.remove()
        for sub, training in modes.items():
            sub.training = training
    return {name: flops / batch for name, flops in totals.items()}


def network_flops(layer_flops: Mapping[str, float], densities: Mapping[str, float] | None = None) -> float:
    """``sum(flops[l] * density[l])`` over the layers of :func:`layer_forward_flops`; missing layers count dense.

    The attention matmuls multiply activations by activations, so no mask thins them: they are always counted dense.
    The bias adds of a layer are scaled with its weight density too (as in RigL's counting); they are at most
    ``1 / (2 * fan_in)`` of the layer's FLOPs. Unknown names in ``densities`` raise, because a typo or a parameter
    name (``"blocks.0.conv1.weight"`` instead of ``"blocks.0.conv1"``) would otherwise silently count dense.
    """
    densities = densities or {}
    unknown = sorted(set(densities) - set(layer_flops))
    if unknown:
        raise ValueError(
            f"densities name layers that are not counted: {unknown}; expected module names such as "
            f"{sorted(layer_flops)[:3]}"
        )
    if ATTENTION_KEY in densities:
        raise ValueError(f"{ATTENTION_KEY!r} is always dense (activation-by-activation); give it no density")
    bad = {name: d for name, d in densities.items() if not 0.0 <= d <= 1.0}
    if bad:
        raise ValueError(f"densities must lie in [0, 1], got {bad}")
    return float(sum(flops * densities.get(name, 1.0) for name, flops in layer_flops.items()))


def gan_iteration_flops(
    g_forward: float,
    d_forward: float,
    *,
    batch_size: int,
    d_steps: int,
    g_weight_grad: float | None = None,
    d_weight_grad: float | None = None,
) -> dict[str, float]:
    """FLOPs of one training iteration, one G step with its ``d_steps`` D steps, from per-sample forward FLOPs.

    With ``B = batch_size`` (images per D step over all ranks and accumulation rounds), ``F_G``, ``F_D`` the
    per-sample forward FLOPs, and a backward counted as the gradients with respect to activations (one forward's
    worth) plus those with respect to weights, ``W_G``, ``W_D`` (RigL's convention: one forward's worth too, the
    default; a sparse method that steps every weight on its dense gradient, ``sparse.optimizer_state: dense``, pays
    the dense forward's worth instead):

    - ``d_steps = d_steps * (F_G * B + (2 F_D + W_D) * 2B)``: G makes B fakes without backward, then D runs forward
      and backward on the B real and B fake images together.
    - ``g_step = (2 F_G + W_G) * B + (2 F_D + W_D) * B``: G forward and backward on B latents, and D forward and
      backward on the B fakes, since G's gradient flows back through D. D is frozen there, so its weight gradients
      are skipped in practice; the convention counts them, an upper bound.
    - ``total = d_steps + g_step``.
    """
    if batch_size < 1 or d_steps < 0:
        raise ValueError(f"need batch_size >= 1 and d_steps >= 0, got {batch_size} and {d_steps}")
    g_back = g_forward + (g_forward if g_weight_grad is None else g_weight_grad)
    d_back = d_forward + (d_forward if d_weight_grad is None else d_weight_grad)
    d_total = d_steps * (g_forward * batch_size + (d_forward + d_back) * 2 * batch_size)
    g_total = (g_forward + g_back) * batch_size + (d_forward + d_back) * batch_size
    return {"d_steps": float(d_total), "g_step": float(g_total), "total": float(d_total + g_total)}


def layers_iteration_flops(
    g_layers: Mapping[str, float],
    d_layers: Mapping[str, float],
    g_densities: Mapping[str, float] | None,
    d_densities: Mapping[str, float] | None,
    *,
    batch_size: int,
    d_steps: int,
    dense_weight_grads: bool = False,
) -> float:
    """:func:`gan_iteration_flops`'s total from per-layer forward FLOPs at the given layer densities (missing names
    dense). ``dense_weight_grads``: every weight's gradient is computed (``sparse.optimizer_state: dense``, where
    Adam steps inactive weights too), so the weight gradients cost the dense forward's worth."""
    weight_grads = {}
    if dense_weight_grads:
        weight_grads = {"g_weight_grad": network_flops(g_layers), "d_weight_grad": network_flops(d_layers)}
    g, d = network_flops(g_layers, g_densities), network_flops(d_layers, d_densities)
    return gan_iteration_flops(g, d, batch_size=batch_size, d_steps=d_steps, **weight_grads)["total"]


def balance_flops(
    g_layers: Mapping[str, float],
    d_layers: Mapping[str, float],
    g_densities: Mapping[str, float] | None,
    d_densities: Mapping[str, float] | None,
    batch_size: int,
) -> float:
    """FLOPs of one ADAPT balance-ratio sample: G forward on a batch and D forward on it and a real batch (no
    backward), at the given layer densities."""
    return batch_size * (network_flops(g_layers, g_densities) + 2 * network_flops(d_layers, d_densities))


def _network_report(layers: Mapping[str, float], densities: Mapping[str, float] | None) -> dict[str, Any]:
    return {
        "inference_dense": network_flops(layers),
        "inference_sparse": network_flops(layers, densities),
        "layers": dict(layers),
    }


def flops_report(
    generator: nn.Module,
    discriminator: nn.Module,
    *,
    resolution: int,
    n_classes: int,
    dim_z: int,
    batch_size: int,
    d_steps: int,
    g_densities: Mapping[str, float] | None = None,
    d_densities: Mapping[str, float] | None = None,
    dense_weight_grads: bool = False,
) -> dict[str, Any]:
    """Per-sample inference FLOPs of G and D, dense and at the given layer densities, and FLOPs per iteration.

    ``dense_weight_grads``: the sparse iteration computes every weight's gradient (``sparse.optimizer_state:
    dense``, where Adam steps inactive weights too), so its weight gradients cost the dense forward's worth.

    ``g_densities`` / ``d_densities`` map module names of :func:`layer_forward_flops` (``"blocks.0.conv1"``) to
    densities; missing names are dense. Returns a JSON-serialisable dict::

        {"G": {"inference_dense": F, "inference_sparse": F, "layers": {name: F}},
         "D": {...},
         "train_iteration": {"dense": F, "sparse": F, "sparse_fraction": sparse / dense}}

    where ``train_iteration`` is :func:`gan_iteration_flops`'s total at ``batch_size`` and ``d_steps``. The networks
    run one forward on a batch of 2 (so batch norm sees more than one sample) on the device of their parameters.
    """
    device = next(generator.parameters()).device
    # Fixed inputs rather than random ones: the count depends on shapes only, and this leaves the global RNG alone.
    z = torch.zeros(2, dim_z, device=device)
    y = torch.arange(2, device=device) % n_classes
    images = torch.zeros(2, 3, resolution, resolution, device=next(discriminator.parameters()).device)
    g = _network_report(layer_forward_flops(generator, z, y), g_densities)
    d = _network_report(layer_forward_flops(discriminator, images, y.to(images.device)), d_densities)

    sizes = {"batch_size": batch_size, "d_steps": d_steps}
    dense = layers_iteration_flops(g["layers"], d["layers"], None, None, **sizes)
    sparse = layers_iteration_flops(
        g["layers"], d["layers"], g_densities, d_densities, **sizes, dense_weight_grads=dense_weight_grads
    )
    train = {"dense": dense, "sparse": sparse, "sparse_fraction": sparse / dense}
    return {"G": g, "D": d, "train_iteration": train}


def format_flops(x: float) -> str:
    """``1.234e9 -> "1.23 GFLOPs"``, ``4.567e8 -> "456.7 MFLOPs"``: 2 decimals below 10 of the unit, 1 above."""
    value, unit = float(x), 0
    while abs(value) >= 1000 and unit < len(_UNITS) - 1:
        value, unit = value / 1000, unit + 1
    text = f"{value:.2f}" if abs(value) < 10 else f"{value:.1f}"
    # Rounding can carry into the next unit (999.96 MFLOPs -> "1000.0"); re-express it there.
    if abs(float(text)) >= 1000 and unit < len(_UNITS) - 1:
        value, unit = value / 1000, unit + 1
        text = f"{value:.2f}"
    return f"{text} {_UNITS[unit]}"


def dense_weight_gradients(sparse: Any) -> bool:
    """Whether a run of ``sparse`` (a ``SparseConfig``) needs every weight's gradient at every step: a sparse
    method in the authors' ``optimizer_state: dense``, where Adam steps the inactive weights too. (Masked mode needs
    dense gradients only at topology updates, which RigL's convention leaves out: once per ``update_every`` steps.)"""
    return sparse.method != "dense" and sparse.optimizer_state == "dense"


def config_flops(cfg: Any) -> dict[str, Any]:
    """:func:`flops_report` of a run config (``sgtrain.config.Config``) at its configured layer densities.

    For SNIP, GMP and prune_finetune the per-layer densities are only known during the run (they follow the data or a
    global threshold); the configured distribution's densities stand in for them here. So for ADAPT, whose D density
    moves with the balance ratio: this is the cost at the starting densities (a run's metrics.jsonl counts the
    densities it trained with, and the balance passes).
    """
    from sgtrain.models.build import build_models
    from sgtrain.sparse import MaskManager

    # The count depends on shapes only: build with the cheap init (orthogonal init of a 128 px BigGAN takes seconds).
    generator, discriminator = build_models(cfg.model, cfg.seed, weights_follow=True)
    masks = MaskManager(
        cfg.sparse, generator=generator, discriminator=discriminator, optimizers={}, total_steps=1, seed=0
    )
    densities = {net: {layer.name: layer.density for layer in masks.layers[net]} for net in ("G", "D")}
    m, t = cfg.model, cfg.train
    report = flops_report(
        generator,
        discriminator,
        resolution=m.resolution,
        n_classes=m.n_classes,
        dim_z=m.dim_z,
        batch_size=t.batch_size,
        d_steps=t.d_steps,
        g_densities=densities["G"],
        d_densities=densities["D"],
        dense_weight_grads=dense_weight_gradients(cfg.sparse),
    )
    report["config"] = {
        "method": cfg.sparse.method,
        "optimizer_state": cfg.sparse.optimizer_state,
        "density_g": cfg.sparse.density_g,
        "density_d": cfg.sparse.density_d,
    }
    report["config"].update({"batch_size": t.batch_size, "d_steps": t.d_steps, "steps": t.steps})
    return report


def format_config_flops(report: dict[str, Any]) -> str:
    """:func:`config_flops` as a few readable lines."""
    c = report["config"]
    lines = [
        f"sparse.method={c['method']}  G density {c['density_g']}  D density {c['density_d']}  "
        f"(batch {c['batch_size']}, {c['d_steps']} D steps per G step; optimizer_state {c['optimizer_state']}"
        + (": weight gradients dense)" if c["method"] != "dense" and c["optimizer_state"] == "dense" else ")"),
        f"{'':<30}{'dense':>16}{'sparse':>16}{'fraction':>10}",
    ]
    for net in ("G", "D"):
        dense, sparse = report[net]["inference_dense"], report[net]["inference_sparse"]
        label = f"{net} inference per image"
        lines.append(f"{label:<30}{format_flops(dense):>16}{format_flops(sparse):>16}{sparse / dense:>10.3f}")
    it = report["train_iteration"]
    lines.append(
        f"{'training per G iteration':<30}{format_flops(it['dense']):>16}{format_flops(it['sparse']):>16}"
        f"{it['sparse_fraction']:>10.3f}"
    )
    lines.append(
        f"{'whole run':<30}{format_flops(it['dense'] * c['steps']):>16}{format_flops(it['sparse'] * c['steps']):>16}"
    )
    if c["method"] == "adapt":
        lines.append("(ADAPT: at D's starting density; a run's train_flops follow the density it trains with)")
    return "\n".join(lines)
