"""Plain decoding, one token per step, through all layers, an exit layer or a skip set; and
what every strategy shares: the prefill, the outputs, and the loop over a batch's rows."""
import torch

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


def decode_step(model, rows, layers, sampling=(0.0, 0, 1.0), generator=None):
    """One token per row through `layers`: write each row's pending token to the cache, emit
    the next one into rows.tokens, advance the live rows. Greedy steps never sync with the
    host, so they replay from a CUDA graph."""
    step = model.step(rows.cache, rows.cache_seqlens, 1)
    h = model.run_layers(model.embed_tokens(rows.tokens[:, None]), layers, step, rows.cache)
    if sampling[0] == 0:
        rows.tokens.copy_(model.head_argmax(h[:, 0]))
    else:
        rows.tokens.copy_(sample(model.head(h[:, 0]), *sampling, generator))
    rows.cache_seqlens.add_(rows.active)


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
        """Move the live rows to the front when they fit a smaller bucket."""
        live = self.live
        n = self.state.bucket(len(live))
        if n < self.rows.n:
            self.state.move_rows(live)
            self.prompts = [self.prompts[i] for i in live]
            self.rows = self.state.rows(n)
            self.rows.active[len(live):] = False
            self.rows.cache_seqlens[len(live):] = 0


def decode_autoregressive(model, batch, sampling, generator, layers):
    """Early exit runs layers [0, E) throughout; layer skipping prefills with every layer and
    decodes with its skip set."""
    greedy = sampling[0] == 0
    while not all(batch.outputs.done):
        batch.compact()
        rows = batch.rows
        step = lambda: decode_step(model, rows, layers, sampling, generator)  # noqa: E731
        if greedy:
            batch.state.run(("step", rows.n, tuple(layers)), step, batch.replay)
        else:
            step()
        batch.emit([[t] for t in rows.tokens.tolist()])
    return {}
