"""The fixed-size decode state and the CUDA graphs that replay steps over it.

A batch decodes in static, preallocated buffers: the KV cache, each row's pending token, its
cache length, whether it is still generating, the exit cache and a round's drafts. Steps read
and write them in place and never sync with the host, so a step captured once in a CUDA graph
replays for every later step of that shape (on a CPU, the step runs as one C++ call over the
same buffers: decoding/cpu.py). The state (and its graphs) stays with the model
between generate() calls that fit it.

Rows that finish stay in the batch, masked (their cache length stops moving), until the live
rows fit a smaller bucket; then they are moved to the front and the smaller bucket's graphs
run on the first rows of the same buffers. Buckets are powers of two on a GPU (few captures)
and exact sizes on a CPU (no wasted rows).
"""
import time
from dataclasses import dataclass

import torch

from .cpu import cpu_steps

MIN_CACHE = 256  # cache lengths are powers of two from here, so calls of similar length share


@dataclass
class Rows:
    """The first n rows of a DecodeState: what one step reads and writes."""
    n: int
    cache: object  # the KVCache; run_layers uses its first n rows
    tokens: torch.Tensor  # (n,) int64: the token each row emitted last, not yet in the cache
    cache_seqlens: torch.Tensor  # (n,) int32
    active: torch.Tensor  # (n,) bool: rows still generating (the others do not advance)
    exit_cache: torch.Tensor  # (n, max_drafts + 1, dim): exit hidden states of a round
    drafts: torch.Tensor  # (n, max_drafts) int64
    emitted: torch.Tensor  # (n, max_drafts + 2) int64: drafts, next token, accepted count


class DecodeState:
    def __init__(self, model, batch, max_seq_len, max_drafts, graphs):
        weight = model.embed_tokens.weight
        device = weight.device
        # Only states with graphs are kept for later calls (decode_state): the others need no
        # key, whose walk over the parameters costs a CPU call a fraction of a millisecond.
        self.key = state_key(model, max_drafts, graphs) if graphs else None
        self.batch, self.max_drafts = batch, max_drafts
        self.cache = model.new_cache(batch, max_seq_len)
        self.tokens = torch.zeros(batch, dtype=torch.int64, device=device)
        self.cache_seqlens = torch.zeros(batch, dtype=torch.int32, device=device)
        self.active = torch.zeros(batch, dtype=torch.bool, device=device)
        self.exit_cache = torch.zeros(batch, max_drafts + 1, model.config.dim, dtype=weight.dtype,
                                      device=device)
        self.drafts = torch.zeros(batch, max(max_drafts, 1), dtype=torch.int64, device=device)
        self.emitted = torch.zeros(batch, max_drafts + 2, dtype=torch.int64, device=device)
        self.graphs = Graphs(graphs and device.type == "cuda")
        self.cpu_steps = cpu_steps(model, self) if device.type == "cpu" else None

    def run(self, key, step):
        """A greedy step or round (step(), named by key): one C++ call on a CPU where that
        applies (decoding/cpu.py), else a CUDA graph replay or an eager run (Graphs)."""
        if self.cpu_steps is None or self.cpu_steps.run(key) is None:
            self.graphs.run(key, step)

    def run_adaptive(self, key, confidence, step):
        """A greedy round that drafts while the draft is sure (at most key's k): one C++ call
        on a CPU where that applies, else step(), eagerly. Returns the drafts made."""
        made = self.cpu_steps.run(key, confidence) if self.cpu_steps is not None else None
        return step() if made is None else made

    @property
    def max_seq_len(self):
        return self.cache.max_seq_len

    def bucket(self, n):
        """The batch size that serves n live rows: n on a CPU, a power of two on a GPU."""
        if not self.graphs.enabled:
            return n
        return min(self.batch, 1 << (n - 1).bit_length())

    def rows(self, n):
        return Rows(n, self.cache, self.tokens[:n], self.cache_seqlens[:n], self.active[:n],
                    self.exit_cache[:n], self.drafts[:n], self.emitted[:n])

    def move_rows(self, keep):
        """Rows `keep` (batch row indices, a list) become rows 0..len(keep)-1."""
        index = torch.tensor(keep, dtype=torch.long, device=self.tokens.device)
        self.cache.move_rows(index)
        for t in (self.tokens, self.cache_seqlens, self.active):
            t[:len(keep)] = t[index]

    def fits(self, model, batch, max_seq_len, max_drafts, graphs):
        return (self.key == state_key(model, max_drafts, graphs) and self.batch >= batch
                and self.max_seq_len >= max_seq_len)


def state_key(model, max_drafts, graphs):
    """What a state and its graphs depend on: the weights' identity (graphs hold their
    addresses), dtype and device, and the buffers' shapes."""
    weights = tuple(p.data_ptr() for p in model.parameters())
    w = model.embed_tokens.weight
    return (weights, w.dtype, w.device, max_drafts, graphs, model.kernels.preference)


def decode_state(model, batch, max_seq_len, max_drafts, graphs):
    """With CUDA graphs, the model's decode state when it fits this call (buffers and captured
    graphs reused), else a new one kept on the model: batch and cache length rounded up to
    powers of two, so that later calls fit. Without, a state of this call's exact size."""
    if not graphs:
        return DecodeState(model, batch, max_seq_len, max_drafts, graphs=False)
    state = getattr(model, "_decode_state", None)
    if state is not None and state.fits(model, batch, max_seq_len, max_drafts, graphs):
        return state
    model._decode_state = None  # free the old buffers and graphs first
    length = min(model.config.max_seq_len, max(MIN_CACHE, 1 << (max_seq_len - 1).bit_length()))
    model._decode_state = DecodeState(model, 1 << (batch - 1).bit_length(),
                                      max(length, max_seq_len), max_drafts, graphs)
    return model._decode_state


class Graphs:
    """CUDA graphs of steps, by key. The first call of a key runs the step eagerly (the real
    step, which also compiles Triton kernels and warms cuBLAS), then captures it; later calls
    replay. A step that cannot be captured keeps running eagerly, and `notes` says why."""

    def __init__(self, enabled):
        self.enabled = enabled
        self.captured, self.notes, self.capture_s = {}, {}, 0.0
        self.pool = torch.cuda.graph_pool_handle() if enabled else None

    def run(self, key, step):
        graph = self.captured.get(key)
        if graph is not None:
            graph.replay()
            return
        step()
        if self.enabled and key not in self.notes:
            self.captured[key] = self._capture(key, step)

    def _capture(self, key, step):
        start = time.perf_counter()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                step()
        except RuntimeError as error:  # a step with a host sync: stay eager, say why
            torch.cuda.synchronize()
            self.notes[key] = f"{type(error).__name__}: {error}"[:300]
            return None
        finally:
            self.capture_s += time.perf_counter() - start
        return graph
