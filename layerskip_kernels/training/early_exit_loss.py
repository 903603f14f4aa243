"""Early-exit loss (LayerSkip, section 4.2): every enabled exit goes through the ONE shared
head (final RMSNorm + lm_head), and the loss is sum_l scale(l) * CE(head(h_l), y), with the
scales of the enabled exits normalised to sum 1.

Layers are 0-based here: exit l reads the hidden state after layer l (layers [0, l+1)),
so exit L-1 is the model's ordinary output, and it is always enabled.
"""
import torch
import torch.nn.functional as F

from ..ops._checks import fail

EXIT_SCALES = ("sum", "uniform", "linear")
EXIT_CURRICULA = ("none", "rotational", "gradual")


def exit_scales(n_layers, kind="sum", enabled=None, weights=None):
    """Per-exit weights (n_layers,), float64, zero where disabled, summing to 1.

    With d = l + 1 the exit's depth: "sum" sum_{i<=d} i = d(d+1)/2 (the paper's default,
    quadratic in depth), "linear" d, "uniform" 1. `weights` (n_layers non-negative numbers)
    replaces the kind's, e.g. to favour the exit a model will draft from.
    """
    if kind not in EXIT_SCALES:
        fail("exit scale", f"one of {EXIT_SCALES}", kind)
    depth = torch.arange(1, n_layers + 1, dtype=torch.float64)
    if weights is not None:
        if len(weights) != n_layers or min(weights) < 0 or weights[-1] <= 0:
            fail("exit weights", f"{n_layers} numbers >= 0, the last > 0", weights)
        scales = torch.tensor(weights, dtype=torch.float64)
    else:
        scales = {"sum": depth * (depth + 1) / 2, "linear": depth,
                  "uniform": torch.ones_like(depth)}[kind]
    if enabled is not None:
        scales = scales * torch.as_tensor(enabled, dtype=torch.float64)
    return scales / scales.sum()


def enabled_exits(n_layers, step, total_steps, curriculum="none", rotation=2):
    """Which exits train at `step` (a list of bools, one per layer); the last always does.

    "none"        every exit;
    "rotational"  exits l with l % rotation == step % rotation (one in every `rotation`
                  layers, the set rotating each step);
    "gradual"     from the top down: at step 0 only the last exit, one more exit below it at
                  each of L-1 even intervals, every exit from the middle of training on.
    """
    if curriculum not in EXIT_CURRICULA:
        fail("exit curriculum", f"one of {EXIT_CURRICULA}", curriculum)
    if curriculum == "none":
        enabled = [True] * n_layers
    elif curriculum == "rotational":
        if rotation < 1:
            fail("rotation", ">= 1", rotation)
        enabled = [l % rotation == step % rotation for l in range(n_layers)]
    else:
        half = max(total_steps / 2, 1)
        opened = int((n_layers - 1) * min(1.0, step / half))
        enabled = [l >= n_layers - 1 - opened for l in range(n_layers)]
    enabled[-1] = True
    return enabled


def early_exit_loss(model, hidden, targets, scales):
    """sum over exits l in `hidden` of scales[l] * CE(model.head(hidden[l]), targets).

    hidden: {l: (B, S, dim)} hidden states after layer l; targets: (B, S) token ids;
    scales: per-layer weights (exit_scales). Returns the total (a scalar with grad) and
    {l: that exit's CE, detached}. Exits are computed one at a time, so only one (B, S, vocab)
    logits tensor is alive at once outside autograd's saved tensors.
    """
    total, per_exit = 0.0, {}
    for l, h in sorted(hidden.items()):
        if scales[l] == 0:
            continue
        logits = model.head(h)
        ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        total = total + float(scales[l]) * ce
        per_exit[l] = ce.detach()
    if not per_exit:
        raise ValueError("hidden: expected at least one exit with a non-zero scale, got none")
    return total, per_exit
