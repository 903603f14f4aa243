"""Plain decoding, one token per step, through all layers, an exit layer or a skip set; and
what every strategy shares: the prefill, the outputs, and the loop over a batch's rows."""
import torch

from ..ops._checks import check
from .sampling import sample


def prefill(model, rows, prompts, layers, sampling, generator, cpu_steps=None):
    """Run the ragged prompts (one right-padded batch) into rows.cache; set each row's cache
    length and first token (emitted by the caller); rows past the prompts stay inactive.
    cpu_steps: the state's fused CPU steps, when it has them (they prefill in chunks)."""
    device = rows.tokens.device
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.int32, device=device)
    tokens = torch.zeros(len(prompts), int(lengths.max()), dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        tokens[row, :len(prompt)] = torch.tensor(prompt, device=device)
    run = cpu_steps.prefill if cpu_steps is not None else model.prefill
    logits = run(tokens, lengths, rows.cache, layers)
    n = len(prompts)
    rows.tokens[:n] = sample(logits, *sampling, generator)
    rows.cache_seqlens.zero_()[:n] = lengths
    rows.active.zero_()[:n] = True


def check_shadow(shadow, layers, emitted, k=0, exit_layer=None):
    """Shadow exits of a greedy step through `layers` (ascending), or of a round of k drafts
    from exit_layer (layers: every layer), checked on the host before anything is written: a
    sorted tuple of distinct exits, each with layers below it and at or above it (an exit s
    heads the hidden state after the layers below s), not the round's own, whose tokens fit
    `emitted` (Rows.emitted)."""
    layers = list(layers)
    ok = (isinstance(shadow, tuple) and all(type(s) is int for s in shadow)
          and list(shadow) == sorted(set(shadow)) and exit_layer not in shadow
          and all(layers and layers[0] < s <= layers[-1] for s in shadow))
    check(ok, "shadow", "a sorted tuple of distinct exits in "
          + (f"[{layers[0] + 1}, {layers[-1]}]" if layers else "[] (no layers)")
          + (f" other than the exit layer {exit_layer}" if exit_layer is not None else ""),
          repr(shadow))
    room = (emitted.shape[1] - k - 2) // (k + 1)
    check(len(shadow) <= room, "shadow", f"at most {room} exits (room in emitted)", len(shadow))


def run_layers_split(model, h, layers, step, cache, shadow=(), seen=None):
    """model.run_layers(h, layers, step, cache) (layers ascending), split at each shadow exit s
    with layers both below and above it: seen[s] gets the hidden state after those below s.
    The output is the unsplit run's, bit for bit (the next layer adds a segment's output up
    as it would the pair a layer hands on)."""
    layers = list(layers)
    start = 0
    for s in shadow:
        cut = sum(layer < s for layer in layers)
        if start < cut < len(layers):
            h = model.run_layers(h, layers[start:cut], step, cache)
            seen[s].append(h)
            start = cut
    return model.run_layers(h, layers[start:], step, cache)


def decode_step(model, rows, layers, sampling=(0.0, 0, 1.0), generator=None, shadow=()):
    """One token per row through `layers`: write each row's pending token to the cache, emit
    the next one into rows.tokens, advance the live rows. Greedy steps never sync with the
    host, so they replay from a CUDA graph. shadow (greedy only): exits whose tokens (the head
    after the layers below each) go to rows.emitted with the step's, as Rows describes."""
    if shadow:
        check(sampling[0] == 0, "shadow", "() when sampling", repr(shadow))
        check_shadow(shadow, layers, rows.emitted)
    seen = {s: [] for s in shadow}
    step = model.step(rows.cache, rows.cache_seqlens, 1)
    h = run_layers_split(model, model.embed_tokens(rows.tokens[:, None]), layers, step,
                         rows.cache, shadow, seen)
    if sampling[0] == 0:
        rows.tokens.copy_(model.head_argmax(h[:, 0]))
    else:
        rows.tokens.copy_(sample(model.head(h[:, 0]), *sampling, generator))
    rows.cache_seqlens.add_(rows.active)
    if shadow:
        rows.emitted[:, 0] = rows.tokens
        rows.emitted[:, 1] = 0
        for j, s in enumerate(shadow):
            rows.emitted[:, 2 + j] = model.head_argmax(seen[s][0][:, 0])


class Outputs:
    """The new tokens of each row, and which rows are finished: a row ends after a stop
    token (kept), after the token that completes a stop string (`stop_strings`, a
    stop.StopStrings, if given) or at max_new_tokens. `stream(row, tokens)` sees tokens as
    they are kept."""

    def __init__(self, batch_size, stop_ids, max_new_tokens, stream=None, stop_strings=None):
        self.tokens = [[] for _ in range(batch_size)]
        self.done = [False] * batch_size
        self.stop_ids, self.max_new_tokens, self.stream = stop_ids, max_new_tokens, stream
        self.stop_strings = stop_strings

    def extend(self, row, new_tokens):
        if self.done[row]:
            return
        out, start = self.tokens[row], len(self.tokens[row])
        for token in new_tokens:
            out.append(token)
            if (token in self.stop_ids or len(out) >= self.max_new_tokens
                    or (self.stop_strings and self.stop_strings.hit(row, out))):
                self.done[row] = True
                break
        if self.stream:
            self.stream(row, out[start:])


class Batch:
    """Which prompt each row of a DecodeState serves, and the rows' life: finished rows are
    masked on the device, and moved out once the live ones fit a smaller bucket. replay: greedy
    steps replay from the state's CUDA graphs (False: they run eagerly on the same buffers)."""

    def __init__(self, state, prompts, outputs, replay=True):
        self.state, self.outputs, self.replay = state, outputs, replay
        self.prompts = list(range(len(prompts)))  # row i serves prompt self.prompts[i]
        self.rows = state.rows(state.bucket(len(prompts)))

    @property
    def live(self):
        return [i for i, p in enumerate(self.prompts) if not self.outputs.done[p]]

    def emit(self, per_row):
        """Give each row its new tokens (a list per row, from the one host sync of a step);
        mask the rows that finished."""
        finished = []
        for i, (prompt, tokens) in enumerate(zip(self.prompts, per_row)):
            if not self.outputs.done[prompt]:
                self.outputs.extend(prompt, tokens)
                finished += [i] if self.outputs.done[prompt] else []
        if finished:
            self.rows.active[finished] = False

    def compact(self):
        """Move the live rows to the front when they fit a smaller bucket. Returns the live
        rows (self.live after the move)."""
        live = self.live
        n = self.state.bucket(len(live))
        if n < self.rows.n:
            self.state.move_rows(live)
            self.prompts = [self.prompts[i] for i in live]
            self.rows = self.state.rows(n)
            self.rows.active[len(live):] = False
            self.rows.cache_seqlens[len(live):] = 0
            live = list(range(len(live)))
        return live


def decode_autoregressive(model, batch, sampling, generator, layers, steps=None):
    """Steps through `layers` until every row is done, or `steps` of them (self-speculation's
    plain steps, run as autoregressive decoding runs them). Early exit runs layers [0, E)
    throughout; layer skipping prefills with every layer and decodes with its skip set.
    Returns the steps run and the row steps (live rows summed over the steps)."""
    greedy, key_layers = sampling[0] == 0, tuple(layers)
    ran = row_steps = 0
    while not all(batch.outputs.done) and ran != steps:
        row_steps += len(batch.compact())
        rows = batch.rows
        step = lambda: decode_step(model, rows, layers, sampling, generator)  # noqa: E731
        if greedy:
            batch.state.run(("step", rows.n, key_layers), step, batch.replay)
        else:
            step()
        batch.emit([[t] for t in rows.tokens.tolist()])
        ran += 1
    return ran, row_steps
