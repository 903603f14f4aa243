"""Unified Layer Skipping (Liu et al., 2024): an input-independent set of layers to run."""


def kept_layers(n_layers, speedup):
    """Run about n_layers / speedup layers: the first and the last always, the others
    spread evenly between them, so the skipped layers are spread through the middle."""
    n_run = min(n_layers, max(2, round(n_layers / speedup)))
    if n_run == n_layers:
        return list(range(n_layers))
    return sorted({round(i * (n_layers - 1) / (n_run - 1)) for i in range(n_run)})
