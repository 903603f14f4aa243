"""Per-exit evaluation: for every exit layer E (layers [0, E), then the shared head), the
perplexity on held-out tokens and the top-1 agreement with the full model (E = L), which
is what greedy self-speculation accepts."""
import math
import sys

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..ops._checks import check


@torch.no_grad()
def evaluate_exits(model, tokens, seq_len=256, batch_size=8, max_windows=None, progress=False):
    """Evaluate every exit on non-overlapping windows of `tokens` (a 1-D tensor of ids).
    progress: a tqdm bar over the windows on stderr.

    Returns {"tokens": n scored, "exits": [{"exit_layer": E, "loss", "perplexity",
    "agreement"} for E = 1..L]}.
    """
    for name, value in (("seq_len", seq_len), ("batch_size", batch_size)):
        check(isinstance(value, int) and value >= 1, name, "an integer >= 1", repr(value))
    check(max_windows is None or (isinstance(max_windows, int) and max_windows >= 1),
          "max_windows", "None or an integer >= 1", repr(max_windows))
    seq_len = min(seq_len, model.config.max_seq_len, len(tokens) - 1)
    if seq_len < 1:
        raise ValueError(f"tokens: expected at least 2 tokens, got {len(tokens)}")
    n_windows = (len(tokens) - 1) // seq_len
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    n_layers = model.config.n_layers
    loss_sum = torch.zeros(n_layers, dtype=torch.float64)
    agree = torch.zeros(n_layers, dtype=torch.long)
    was_training, scored = model.training, 0
    model.eval()
    try:
        with tqdm(total=n_windows, unit="window", file=sys.stderr, dynamic_ncols=True,
                  disable=not progress) as bar:
            for first in range(0, n_windows, batch_size):
                rows = range(first, min(first + batch_size, n_windows))
                batch = torch.stack([tokens[r * seq_len:r * seq_len + seq_len + 1] for r in rows])
                scored += _score(model, batch, loss_sum, agree)
                bar.update(len(rows))
    finally:
        model.train(was_training)
    exits = []
    for i in range(n_layers):
        loss = loss_sum[i].item() / scored
        exits.append({"exit_layer": i + 1, "loss": loss, "perplexity": math.exp(min(loss, 700)),
                      "agreement": agree[i].item() / scored})
    return {"tokens": scored, "exits": exits}


def _score(model, batch, loss_sum, agree):
    """Add each exit's summed loss and agreement with the last layer on one batch of windows
    (B, seq_len + 1); returns the number of tokens scored."""
    batch = batch.to(model.embed_tokens.weight.device)
    targets = batch[:, 1:].flatten()
    h = F.embedding(batch[:, :-1], model.embed_tokens.weight)
    predictions = []

    def score(i, run, h):
        h = run(h)
        logits = model.head(h).float().flatten(0, 1)
        loss_sum[i] += F.cross_entropy(logits, targets, reduction="sum").item()
        predictions.append(logits.argmax(-1))
        return h

    model.run_layers(h, range(model.config.n_layers), each=score)
    for i, p in enumerate(predictions):
        agree[i] += (p == predictions[-1]).sum().item()
    return targets.numel()


def format_table(result, title=None):
    """A markdown table of evaluate_exits' result."""
    lines = [f"### {title}", ""] if title else []
    lines += [f"{result['tokens']} tokens scored", "",
              "| exit layer | loss | perplexity | agreement with final |",
              "| ---: | ---: | ---: | ---: |"]
    lines += [f"| {e['exit_layer']} | {e['loss']:.4f} | {e['perplexity']:.2f} | "
              f"{100 * e['agreement']:.1f}% |" for e in result["exits"]]
    return "\n".join(lines)


def plot_exits(results, path, title=None):
    """A PNG (or the format path's suffix names) of perplexity and agreement per exit layer;
    results: {label: evaluate_exits()}; title: the figure's (default: what it shows and on how
    many tokens). Written atomically. Needs matplotlib (pip install matplotlib)."""
    try:
        import matplotlib
        import matplotlib.ticker
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
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    if title is None:
        scored = sorted({r["tokens"] for r in results.values()})
        title = (f"Early exits of {', '.join(results)}: each exit's perplexity and top-1 "
                 f"agreement with the last layer ({'/'.join(map(str, scored))} tokens)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    from ..files import atomic_path
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120)
    finally:
        plt.close(fig)
