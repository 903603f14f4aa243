"""Layer dropout (LayerSkip, Elhoushi et al. 2024, section 4.1): layer l of a row is skipped
with probability p(l, t) = S(t) * D(l) * p_max, deeper layers more often, and (when
pretraining from scratch) more often as training goes on.

A dropped layer is the identity for that row. Each row draws its own decisions; a block runs
only on the rows that keep it (gathered, run, scattered back), so dropped rows cost nothing.
"""
import math

import torch

from ..ops._checks import fail

DEPTH_SCHEDULES = ("exp", "linear", "uniform")
TIME_SCHEDULES = ("constant", "exp")


def depth_schedule(n_layers, kind="exp"):
    """D(l) for l = 0..n_layers-1, a float64 tensor: 0 at the first layer, 1 at the last.

    "exp"      exp(l * ln2 / (L-1)) - 1  (the paper's)
    "linear"   l / (L-1)
    "uniform"  1 for every layer
    """
    if kind not in DEPTH_SCHEDULES:
        fail("depth schedule", f"one of {DEPTH_SCHEDULES}", kind)
    if n_layers < 1:
        fail("n_layers", ">= 1", n_layers)
    if kind == "uniform":
        return torch.ones(n_layers, dtype=torch.float64)
    if n_layers == 1:  # one layer is both first and last: never drop the whole model
        return torch.zeros(1, dtype=torch.float64)
    depth = torch.arange(n_layers, dtype=torch.float64) / (n_layers - 1)
    return torch.expm1(depth * math.log(2)) if kind == "exp" else depth


def time_schedule(step, total_steps, kind="constant"):
    """S(t): "constant" 1 (continual pretraining, finetuning); "exp" exp(t*ln2/(T-1)) - 1,
    from 0 at the first step to 1 at the last (pretraining from scratch)."""
    if kind not in TIME_SCHEDULES:
        fail("time schedule", f"one of {TIME_SCHEDULES}", kind)
    if kind == "constant" or total_steps <= 1:
        return 1.0
    return math.expm1(min(step, total_steps - 1) * math.log(2) / (total_steps - 1))


def dropout_rates(n_layers, p_max, step=0, total_steps=1, depth="exp", time="constant"):
    """p(l, t) = S(t) * D(l) * p_max for every layer l, a float64 tensor (n_layers,)."""
    if not 0 <= p_max <= 1:
        fail("p_max", "a probability in [0, 1]", p_max)
    return time_schedule(step, total_steps, time) * depth_schedule(n_layers, depth) * p_max


def run_layers_with_dropout(model, h, rates=None, generator=None, keep_hidden=None):
    """Run every layer of `model` on h (B, S, dim), no cache, positions 0..S-1.

    In training mode row b skips layer l with probability rates[l] (independently per row
    and layer, drawn from `generator`); in eval mode, or with rates None, nothing is dropped.
    Returns the final hidden state and a dict {l: hidden state after layer l} for the
    0-based layers in keep_hidden (the early-exit loss reads them).
    """
    n_layers = len(model.layers)
    drop = model.training and rates is not None and bool((torch.as_tensor(rates) > 0).any())
    if drop:
        if len(rates) != n_layers:
            fail("rates", f"{n_layers} per-layer probabilities", f"{len(rates)} values")
        # One draw for all decisions, on the CPU so a seed gives the same drops on any device.
        draws = torch.rand(n_layers, h.shape[0], generator=generator, dtype=torch.float64)
        keep = draws >= torch.as_tensor(rates, dtype=torch.float64)[:, None]
    hidden = {}

    def each(i, run, h):
        if not drop or bool(keep[i].all()):
            h = run(h)
        elif bool(keep[i].any()):
            rows = keep[i].nonzero().squeeze(1).to(h.device)
            h = h.index_copy(0, rows, run(h.index_select(0, rows)))
        if keep_hidden is not None and i in keep_hidden:
            hidden[i] = h
        return h

    return model.run_layers(h, range(n_layers), each=each), hidden
