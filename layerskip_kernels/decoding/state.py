"""The fixed-size decode state and the CUDA graphs that replay steps over it.

A batch decodes in static, preallocated buffers: the KV cache, each row's pending token, its
cache length, whether it is still generating, the exit cache and a round's drafts. Steps read
and write them in place and never sync with the host, so a step captured once in a CUDA graph
replays for every later step of that shape (on a CPU, the step runs as one C++ call over the
same buffers: decoding/cpu.py).

Where steps can replay (`replayable`: a CUDA device), the model keeps one state for every
generate() call that fits it, eager calls (cuda_graphs=False) included: they run on the same
buffers, so they have the replays' geometry (batch bucket, cache length, hence the attention
kernels' split-KV counts) and replay against eager compares the same arithmetic. The state
is sized by capacity: batch and cache length rounded up to powers of two, drafts for any k up
to MIN_DRAFTS, and a call that does not fit gets a state at least as large as the old one, so
that a benchmark's or a user's alternating calls (k = 2, k = 4, "auto", layer skip) share it.
Its graphs are kept per key: (bucket, layers) for a step, (bucket, k, draft) for a round, each
followed by its shadow exits where it has some (a different graph: it runs more heads), at
most MAX_GRAPHS of them: the least recently used is evicted, and captured again when next
used (Graphs.evictions counts them; generate's stats["graph_evictions"] a call's). What
the graphs hold addresses of and the buffers do not own (the weights, the RoPE tables) is the
state's key (`state_key`): when it changes, a new state is built. One generate() call at a time
uses a kept state: calls from several threads on one model wait for each other (`held_state`).
Elsewhere (a CPU) every call builds its own state of the call's exact size.

Rows that finish stay in the batch, masked (their cache length stops moving), until the live
rows fit a smaller bucket; then they are moved to the front and the smaller bucket's steps run
on the first rows of the same buffers. Buckets are powers of two in a kept state (few
captures) and exact sizes on a CPU (no wasted rows).
"""
import contextlib
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch

from .cpu import cpu_steps

MIN_CACHE = 256  # cache lengths are powers of two from here, so calls of similar length share
MIN_DRAFTS = 8  # a kept state drafts up to this many (generate's "auto" cap) whatever k a call asks
MAX_SHADOW = 4  # shadow exits a round or step may head besides its own (emitted has their room)
# Graphs a kept state holds at most. Each holds its instantiated executable (device memory
# for its kernels' parameters, more for a longer round) and cost a capture; their
# intermediates share one pool (the state's), sized by the largest step, not by their count.
# 64: one bucket's worst case under the adaptive policy fits (candidate_exits, at most 4,
# times candidate_ks, at most 6, rounds and the plain step, each also with its shadow exits:
# 50 keys), and so do a benchmark's fixed configurations (autoregressive, early exit, k = 2
# and 4, layer skip, its draft: about 7 keys a bucket) at the 8 buckets of batch 1 to 128.
# Past it, the policy holds each choice for a stint of rounds (policy.py), so an evicted
# key costs a recapture once a stint at most, not once a round.
MAX_GRAPHS = 64
MAX_NOTES = 4  # capture-failure reasons a state keeps: the newest distinct ones


def replayable(device):
    """Whether steps on this device can be captured and replayed (CUDA graphs). generate()
    asks it whether a call replays, decode_state whether a state is kept; the CPU tests point
    it at the CPU, with a stand-in for the capture."""
    return device.type == "cuda"


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
    # (n, max_drafts + 2 + MAX_SHADOW * (max_drafts + 1)) int64, what the host reads of a round
    # of k drafts: the drafts (columns 0..k-1), the next token (k), the accepted count (k + 1),
    # then, with shadow exits, exit shadow[j]'s token at position i of the round in column
    # k + 2 + j * (k + 1) + i. A greedy step with shadow exits writes the same layout as a
    # round with k = 0: its token (0), 0 (1), shadow[j]'s token (2 + j); without, only tokens.
    emitted: torch.Tensor


class DecodeState:
    """Buffers for `batch` rows of up to max_seq_len positions and rounds of up to max_drafts
    drafts, allocated as given (decode_state chooses the sizes). graphs: the state is kept
    for later calls, so its steps may be captured (Graphs) and its buckets are powers of two."""

    def __init__(self, model, batch, max_seq_len, max_drafts, graphs):
        weight = model.embed_tokens.weight
        device = weight.device
        # The RoPE tables cover the cache before the key is taken: a step never regrows them,
        # and the state holds the tables its graphs read (a regrow elsewhere frees nothing
        # they use, and changes the key).
        self.rope = model.rope(max_seq_len)
        # Only kept states need a key (decode_state): its walk over the parameters would cost
        # a CPU call a fraction of a millisecond.
        self.key = state_key(model) if graphs else None
        self.batch, self.max_drafts = batch, max_drafts
        self.cache = model.new_cache(batch, max_seq_len)
        self.tokens = torch.zeros(batch, dtype=torch.int64, device=device)
        self.cache_seqlens = torch.zeros(batch, dtype=torch.int32, device=device)
        self.active = torch.zeros(batch, dtype=torch.bool, device=device)
        self.exit_cache = torch.zeros(batch, max_drafts + 1, model.config.dim, dtype=weight.dtype,
                                      device=device)
        self.drafts = torch.zeros(batch, max(max_drafts, 1), dtype=torch.int64, device=device)
        self.emitted = torch.zeros(batch, max_drafts + 2 + MAX_SHADOW * (max_drafts + 1),
                                   dtype=torch.int64, device=device)
        self.graphs = Graphs(graphs)
        self.cpu_steps = cpu_steps(model, self) if device.type == "cpu" else None

    def run(self, key, step, replay=True):
        """A greedy step or round (step(), named by key): one C++ call on a CPU where that
        applies (decoding/cpu.py), else a CUDA graph replay or an eager run (Graphs; replay
        False: eager, for a call with cuda_graphs=False)."""
        if self.cpu_steps is None or self.cpu_steps.run(key) is None:
            self.graphs.run(key, step, replay)

    def run_adaptive(self, key, confidence, step):
        """A greedy round that drafts while the draft is sure (at most key's k): one C++ call
        on a CPU where that applies, else step(), eagerly. Returns the drafts made."""
        made = self.cpu_steps.run(key, confidence) if self.cpu_steps is not None else None
        return step() if made is None else made

    @property
    def max_seq_len(self):
        return self.cache.max_seq_len

    def bucket(self, n):
        """The batch size that serves n live rows: a power of two in a kept state, else n."""
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

    def fits(self, model, batch, max_seq_len, max_drafts):
        """The same key, and room for the call: capacities, not identities."""
        return (self.key == state_key(model) and self.batch >= batch
                and self.max_seq_len >= max_seq_len and self.max_drafts >= max_drafts)


def state_key(model):
    """What a kept state and its graphs depend on beyond their own buffers, in one place:
    the addresses of every tensor a captured step reads (the weights and buffers of the
    model, the RoPE tables model.rope() hands out), their dtype and device, and the backend
    preference (which kernels a step launches)."""
    tensors = (*model.parameters(), *model.buffers(), *(model._rope or ()))
    w = model.embed_tokens.weight
    return (tuple(t.data_ptr() for t in tensors), w.dtype, w.device, model.kernels.preference)


def decode_state(model, batch, max_seq_len, max_drafts, graphs):
    """The state for a call of `batch` rows, max_seq_len positions and max_drafts drafts a
    round. Where steps replay (or graphs=True asks for a kept state, as tests do on a CPU):
    the model's kept state when it fits, else a new one kept on the model, at least as large
    as the old one and rounded (batch and cache length to powers of two, drafts to MIN_DRAFTS)
    so that later calls fit. Elsewhere: a state of this call's exact size."""
    if not (graphs or replayable(model.embed_tokens.weight.device)):
        return DecodeState(model, batch, max_seq_len, max_drafts, graphs=False)
    state = getattr(model, "_decode_state", None)
    if state is not None and state.fits(model, batch, max_seq_len, max_drafts):
        return state
    if state is not None:
        batch, max_seq_len = max(batch, state.batch), max(max_seq_len, state.max_seq_len)
        max_drafts = max(max_drafts, state.max_drafts)
    model._decode_state = state = None  # free the old buffers and graphs first
    model._decode_state = _rounded_state(model, batch, max_seq_len, max_drafts)
    return model._decode_state


def _rounded_state(model, batch, max_seq_len, max_drafts):
    length = min(model.config.max_seq_len, max(MIN_CACHE, 1 << (max_seq_len - 1).bit_length()))
    return DecodeState(model, 1 << (batch - 1).bit_length(), max(length, max_seq_len),
                       max(max_drafts, MIN_DRAFTS), graphs=True)


class _Holder:
    """Which thread is using a model's kept state (one call at a time)."""

    def __init__(self):
        self.lock, self.thread = threading.Lock(), None


_HOLDERS = weakref.WeakKeyDictionary()  # model -> _Holder
_HOLDERS_LOCK = threading.Lock()


@contextlib.contextmanager
def held_state(model, batch, max_seq_len, max_drafts, graphs):
    """decode_state() for the length of one generate() call. A kept state serves one call at
    a time: a call from another thread waits until the first is done (graph capture also
    needs the device to itself). A call nested in the same thread (a stream callback that
    generates with the model) gets a state of its own, not kept, of the same geometry."""
    if not (graphs or replayable(model.embed_tokens.weight.device)):
        yield decode_state(model, batch, max_seq_len, max_drafts, graphs)
        return
    with _HOLDERS_LOCK:
        holder = _HOLDERS.setdefault(model, _Holder())
    if holder.thread == threading.get_ident():
        yield _rounded_state(model, batch, max_seq_len, max_drafts)
        return
    with holder.lock:
        holder.thread = threading.get_ident()
        try:
            yield decode_state(model, batch, max_seq_len, max_drafts, graphs)
        finally:
            holder.thread = None


class Graphs:
    """CUDA graphs of steps, by key. The first call of a key runs the step eagerly (the real
    step, which also compiles Triton kernels and warms cuBLAS), then captures it; later calls
    replay. A step that cannot be captured keeps running eagerly, and `notes` says why (the
    newest MAX_NOTES distinct reasons). At most `capacity` keys are kept (default MAX_GRAPHS):
    a capture past it evicts the least recently used, which its next use captures again.
    capture_s, replays and evictions count over the state's life (generate reports a call's
    share)."""

    def __init__(self, enabled, capacity=None):
        capacity = MAX_GRAPHS if capacity is None else capacity
        if type(capacity) is not int or capacity < 1:
            raise ValueError(f"capacity: expected an int >= 1 (the key run now is kept), "
                             f"got {capacity!r}")
        self.enabled, self.capacity = enabled, capacity
        # key -> graph (None: the capture failed, the step runs eagerly), oldest use first
        self.captured = OrderedDict()
        self.notes, self.capture_s, self.replays, self.evictions = [], 0.0, 0, 0
        self.pool = None  # the graphs' memory pool, made by the first capture

    def run(self, key, step, replay=True):
        if replay and key in self.captured:
            self.captured.move_to_end(key)  # the most recently used: evicted last
            graph = self.captured[key]
            if graph is None:
                step()
                return
            graph.replay()
            self.replays += 1
            return
        step()
        if replay and self.enabled:
            self.captured[key] = self._capture(key, step)
            self._evict()

    def _evict(self):
        """Drop the least recently used keys past capacity. Only here, after a capture: that
        began with a device sync (torch.cuda.graph), so no graph dropped is still replaying,
        and the key just captured is the newest, never the one dropped."""
        while len(self.captured) > self.capacity:
            self.captured.popitem(last=False)
            self.evictions += 1

    def _note(self, reason):
        """Keep `reason` among the newest MAX_NOTES distinct ones (a kept state lives long)."""
        if reason in self.notes:
            self.notes.remove(reason)
        self.notes.append(reason)
        del self.notes[:-MAX_NOTES]

    def _capture(self, key, step):
        start = time.perf_counter()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                step()
        except RuntimeError as error:  # a step with a host sync: stay eager, say why
            torch.cuda.synchronize()
            self._note(f"{type(error).__name__}: {error}"[:300])
            return None
        finally:
            self.capture_s += time.perf_counter() - start
        return graph
