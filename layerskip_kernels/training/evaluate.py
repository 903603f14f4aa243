"""Per-exit evaluation: for every exit layer E (layers [0, E), then the shared head), the
perplexity on held-out tokens and the top-1 agreement with the full model (E = L), which
is what greedy self-speculation accepts."""
import math

import torch
import torch.nn.functional as F


@torch.no_grad()
def evaluate_exits(model, tokens, seq_len=256, batch_size=8, max_windows=None):
    """Evaluate every exit on non-overlapping windows of `tokens` (a 1-D tensor of ids).

    Returns {"tokens": n scored, "exits": [{"exit_layer": E, "loss", "perplexity",
    "agreement"} for E = 1..L]}.
    """
    was_training = model.training
    model.eval()
    seq_len = min(seq_len, model.config.max_seq_len, len(tokens) - 1)
    if seq_len < 1:
        raise ValueError(f"tokens: expected at least 2 tokens, got {len(tokens)}")
    n_windows = (len(tokens) - 1) // seq_len
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    device = model.embed_tokens.weight.device
    n_layers = model.config.n_layers
    loss_sum = torch.zeros(n_layers, dtype=torch.float64)
    agree = torch.zeros(n_layers, dtype=torch.long)
    scored = 0
    for first in range(0, n_windows, batch_size):
        rows = range(first, min(first + batch_size, n_windows))
        batch = torch.stack([tokens[r * seq_len:r * seq_len + seq_len + 1] for r in rows])
        batch = batch.to(device)
        targets = batch[:, 1:].flatten()
        h = F.embedding(batch[:, :-1], model.embed_tokens.weight)
        predictions = []

        def score(i, run, h):
            h = run(h)
            logits = model.head(h).float().flatten(0, 1)
            loss_sum[i] += F.cross_entropy(logits, targets, reduction="sum").item()
            predictions.append(logits.argmax(-1))
            return h

        model.run_layers(h, range(n_layers), each=score)
        for i, p in enumerate(predictions):
            agree[i] += (p == predictions[-1]).sum().item()
        scored += targets.numel()
    model.train(was_training)
    exits = []
    for i in range(n_layers):
        loss = loss_sum[i].item() / scored
        exits.append({"exit_layer": i + 1, "loss": loss, "perplexity": math.exp(min(loss, 700)),
                      "agreement": agree[i].item() / scored})
    return {"tokens": scored, "exits": exits}


def format_table(result, title=None):
    """A markdown table of evaluate_exits' result."""
    lines = [f"### {title}", ""] if title else []
    lines += [f"{result['tokens']} tokens scored", "",
              "| exit layer | loss | perplexity | agreement with final |",
              "| ---: | ---: | ---: | ---: |"]
    lines += [f"| {e['exit_layer']} | {e['loss']:.4f} | {e['perplexity']:.2f} | "
              f"{100 * e['agreement']:.1f}% |" for e in result["exits"]]
    return "\n".join(lines)


def plot_exits(results, path):
    """A PNG of perplexity and agreement per exit layer; results: {label: evaluate_exits()}.
    Needs matplotlib (pip install 'layerskip-kernels[plot]')."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise RuntimeError("plot: matplotlib is not installed (pip install matplotlib)") from error
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for label, result in results.items():
        layers = [e["exit_layer"] for e in result["exits"]]
        left.plot(layers, [e["perplexity"] for e in result["exits"]], marker="o", label=label)
        right.plot(layers, [100 * e["agreement"] for e in result["exits"]], marker="o",
                   label=label)
    left.set(xlabel="exit layer", ylabel="perplexity", yscale="log", title="perplexity per exit")
    right.set(xlabel="exit layer", ylabel="top-1 agreement with final layer (%)",
              ylim=(0, 101), title="agreement per exit")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
