"""decoding/cpu.py: a greedy decode step or self-speculative round as one C++ call
(csrc/cpu/decoder.h) must leave every buffer of the decode state exactly as the Python step
does (the same kernels, so bit for bit), refuse what would write out of bounds before writing
anything, and make generate() give the Python path's tokens."""
import contextlib
import os

import pytest
import torch
from random_weights import random_weights

import layerskip_kernels as lsk
from layerskip_kernels.decoding import cpu, state as state_module
from layerskip_kernels.decoding.autoregressive import decode_step
from layerskip_kernels.decoding.self_speculative import (ExitDraft, SkipDraft, greedy_round,
                                                          sampled_round)
from layerskip_kernels.decoding.state import DecodeState

VOCAB = 97


@pytest.fixture(autouse=True)
def needs_cpu_kernels():
    if cpu._cpu is None:
        if os.environ.get("CI"):
            pytest.fail("layerskip_kernels._cpu is not built in CI")
        pytest.skip(cpu.cpu_unavailable_reason())


def random_llama(generator, head_dim=16, n_heads=4, n_kv_heads=2, n_layers=4, dim=48):
    config = lsk.LlamaConfig(vocab_size=VOCAB, dim=dim, n_layers=n_layers, n_heads=n_heads,
                             n_kv_heads=n_kv_heads, head_dim=head_dim, hidden_dim=64,
                             max_seq_len=128)
    return random_weights(lsk.Llama(config), generator, 0.3)


def live_state(model, generator, lengths=(3, 20, 9, 14), max_drafts=4, seq_len=48):
    """Random KV for `lengths` positions, random pending tokens, poisoned round buffers, the
    second row finished (masked): what a round meets mid-generation."""
    state = DecodeState(model, len(lengths), seq_len, max_drafts, graphs=False)
    for t in (state.cache.k, state.cache.v, state.exit_cache):
        t.copy_(torch.randn(t.shape, generator=generator))
    state.drafts.fill_(-7)
    state.emitted.fill_(-7)
    state.cache_seqlens.copy_(torch.tensor(lengths, dtype=torch.int32))
    state.tokens.copy_(torch.randint(0, VOCAB, (len(lengths),), generator=generator))
    state.active.fill_(True)
    state.active[1] = False
    return state


def buffers(state):
    return {"k": state.cache.k, "v": state.cache.v, "tokens": state.tokens,
            "cache_seqlens": state.cache_seqlens, "active": state.active,
            "exit_cache": state.exit_cache, "drafts": state.drafts, "emitted": state.emitted}


@contextlib.contextmanager
def team_threads(threads):
    """Within it, the C++ kernels run on a team of `threads` (restored after)."""
    previous = cpu._cpu.num_threads()
    cpu._cpu.set_num_threads(threads)
    try:
        yield
    finally:
        cpu._cpu.set_num_threads(previous)


def copy_state(model, state):
    twin = DecodeState(model, state.batch, state.max_seq_len, state.max_drafts, graphs=False)
    for name, t in buffers(twin).items():
        t.copy_(buffers(state)[name])
    return twin


STEPS = {  # key for CpuSteps.run, and the Python step it stands for
    "decode": (("step", 4, (0, 1, 2, 3)),
               lambda model, rows: decode_step(model, rows, range(4))),
    "decode on a skip set, 3 rows": (("step", 3, (0, 2)),
                                     lambda model, rows: decode_step(model, rows, [0, 2])),
    "exit round": (("round", 4, 3, ("exit", 1)),
                   lambda model, rows: greedy_round(ExitDraft(model, 1), rows, 3)),
    "exit round at the last layer, k=4": (("round", 4, 4, ("exit", 4)),
                                          lambda model, rows: greedy_round(ExitDraft(model, 4),
                                                                           rows, 4)),
    "skip round, 2 rows": (("round", 2, 2, ("skip", (0, 3))),
                           lambda model, rows: greedy_round(SkipDraft(model, [0, 3]), rows, 2)),
}


@pytest.mark.parametrize("shape", [dict(head_dim=16, n_heads=4, n_kv_heads=4),
                                   dict(head_dim=32, n_heads=4, n_kv_heads=2),
                                   dict(head_dim=64, n_heads=4, n_kv_heads=1, dim=64),
                                   dict(head_dim=128, n_heads=8, n_kv_heads=1, dim=64)],
                         ids=["gqa1-d16", "gqa2-d32", "gqa4-d64", "gqa8-d128"])
@pytest.mark.parametrize("name", list(STEPS))
@pytest.mark.parametrize("threads", [1, 2])
def test_one_call_leaves_the_state_as_the_python_step(generator, name, shape, threads):
    key, python_step = STEPS[name]
    model = random_llama(generator, **shape)
    fused = live_state(model, generator)
    eager = copy_state(model, fused)
    with team_threads(threads), torch.inference_mode():
        python_step(model, eager.rows(key[1]))
        assert fused.cpu_steps.run(key) == (0 if key[0] == "step" else key[2])
    for buffer, expected in buffers(eager).items():
        assert torch.equal(buffers(fused)[buffer], expected), buffer
    assert not torch.equal(fused.emitted, torch.full_like(fused.emitted, -7)) or key[0] == "step"


@pytest.fixture(params=["avx512", "avx2", "generic"])
def isa(request):
    if request.param not in cpu._cpu.available_isas():
        pytest.skip(f"this CPU cannot run {request.param}")
    previous = cpu._cpu.isa()
    cpu._cpu.set_isa(request.param)
    yield request.param
    cpu._cpu.set_isa(previous)


@pytest.mark.parametrize("confidence", [0.05, 0.3, 0.6, 0.99])
@pytest.mark.parametrize("draft", ["exit", "skip"])
def test_an_adaptive_round_stops_where_the_python_round_does(generator, draft, confidence, isa):
    """k = "auto": drafting stops after the first draft that no row is sure of (softmax max
    below confidence, computed in C++ without the logits); the state as the Python round's."""
    model = random_llama(generator)
    fused = live_state(model, generator, max_drafts=8)
    eager = copy_state(model, fused)
    drafter = ExitDraft(model, 2) if draft == "exit" else SkipDraft(model, [0, 3])
    with torch.inference_mode():
        made = fused.cpu_steps.run(("round", 4, 8, drafter.key), confidence)
        expected = sampled_round(drafter, eager.rows(4), 8, (0.0, 0, 1.0), None, confidence)
    assert made == expected
    for buffer, value in buffers(eager).items():
        assert torch.equal(buffers(fused)[buffer], value), buffer


def test_rounds_stop_early_at_some_confidence(generator):
    model = random_llama(generator)
    made = set()
    for confidence in (0.05, 0.5, 0.95):
        state = live_state(model, generator, max_drafts=8)
        with torch.inference_mode():
            made.add(state.cpu_steps.run(("round", 4, 8, ("exit", 2)), confidence))
    assert len(made) > 1 and min(made) < 8  # the rule did stop some rounds


def test_rows_past_n_are_untouched(generator):
    model = random_llama(generator)
    state = live_state(model, generator)
    before = {name: t.clone() for name, t in buffers(state).items()}
    with torch.inference_mode():
        state.cpu_steps.run(("round", 2, 3, ("exit", 2)))
    for name in ("tokens", "cache_seqlens", "drafts", "emitted", "exit_cache"):
        assert torch.equal(buffers(state)[name][2:], before[name][2:]), name
    assert torch.equal(state.cache.k[:, 2:], before["k"][:, 2:])


@pytest.mark.parametrize("key, why", [
    (("round", 4, 4, ("exit", 2)), "cache full"),  # row 1 holds 44 of 48 positions
    (("round", 5, 2, ("exit", 2)), "n must be"),
    (("round", 4, 5, ("exit", 2)), "max_drafts"),
    (("round", 4, 2, ("exit", 5)), "exit_layer"),
    (("round", 4, 2, ("skip", (0, 9))), "out of range"),
    (("step", 4, (0, -1)), "out of range"),
])
def test_refused_calls_write_nothing(generator, key, why):
    model = random_llama(generator)
    state = live_state(model, generator, lengths=(3, 44, 9, 14))
    before = {name: t.clone() for name, t in buffers(state).items()}
    with pytest.raises(ValueError, match=why), torch.inference_mode():
        state.cpu_steps.run(key)
    for name, t in buffers(state).items():
        assert torch.equal(t, before[name]), name


def test_a_token_outside_the_vocabulary_is_refused(generator):
    model = random_llama(generator)
    state = live_state(model, generator)
    state.tokens[2] = VOCAB
    with pytest.raises(ValueError, match="vocabulary"), torch.inference_mode():
        state.cpu_steps.run(("step", 4, (0, 1)))


def test_rounds_longer_than_the_kernel_takes_run_in_python(generator):
    model = random_llama(generator)
    state = live_state(model, generator, lengths=(3, 5), max_drafts=16, seq_len=64)
    with torch.inference_mode():
        assert state.cpu_steps.run(("round", 2, 16, ("exit", 1))) is None


def test_the_fused_path_applies_only_where_the_python_step_runs_the_cpu_kernels(generator):
    model = random_llama(generator)
    assert DecodeState(model, 2, 32, 2, graphs=False).cpu_steps is not None
    model.backend = "torch"  # the reference path stays the reference
    assert DecodeState(model, 2, 32, 2, graphs=False).cpu_steps is None
    model.backend = "auto"
    handle = model.layers[1].register_forward_hook(lambda *args: None)
    assert DecodeState(model, 2, 32, 2, graphs=False).cpu_steps is None
    handle.remove()
    assert DecodeState(model.double(), 2, 32, 2, graphs=False).cpu_steps is None


def test_chunked_prefill_matches_the_causal_pass(generator):
    """Prompts longer than a chunk (16 positions) and ragged: the same last logits and cache
    as model.prefill, to float32 rounding, and exactly those of the layer op run chunk by
    chunk from Python (the same kernel)."""
    model = random_llama(generator)
    prompts = [torch.randint(0, VOCAB, (n,), generator=generator) for n in (40, 5, 17)]
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.int32)
    padded = torch.zeros(3, 40, dtype=torch.long)
    for row, p in enumerate(prompts):
        padded[row, :len(p)] = p
    state = DecodeState(model, 3, 64, 2, graphs=False)
    with torch.inference_mode():
        reference_cache = model.new_cache(3, 64)
        expected = model.prefill(padded, lengths, reference_cache)
        got = state.cpu_steps.prefill(padded, lengths, state.cache, range(4))
        chunk_cache = model.new_cache(3, 64)
        hidden = [model.run_layers(model.embed_tokens(padded[:, i:i + 16]), range(4),
                                   model.step(chunk_cache, torch.full((3,), i, dtype=torch.int32),
                                              len(padded[0, i:i + 16])), chunk_cache)
                  for i in range(0, 40, 16)]
        chunked = model.head(torch.cat(hidden, 1)[torch.arange(3), lengths.long() - 1])
    assert torch.equal(got, chunked)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    for row, n in enumerate(lengths.tolist()):
        for got, expected in ((state.cache.k, reference_cache.k),
                              (state.cache.v, reference_cache.v)):
            torch.testing.assert_close(got[:, row, :n], expected[:, row, :n], rtol=1e-4,
                                       atol=1e-4)


@pytest.mark.parametrize("tokens, lengths, why", [
    ([[1, 2, 3], [4, 5, 6]], [3, 0], "lengths"),
    ([[1, 2, 3], [4, 5, 6]], [3, 4], "lengths"),
    ([[1, 2, 3], [4, VOCAB, 6]], [3, 3], "vocabulary"),
    ([[1] * 49], [49], "max_seqlen"),
], ids=["empty prompt", "length past the tokens", "token outside the vocabulary", "too long"])
def test_refused_prefills_write_nothing(generator, tokens, lengths, why):
    model = random_llama(generator)
    state = DecodeState(model, 2, 48, 2, graphs=False)
    for t in (state.cache.k, state.cache.v):
        t.copy_(torch.randn(t.shape, generator=generator))
    before = state.cache.k.clone(), state.cache.v.clone()
    with pytest.raises(ValueError, match=why):
        state.cpu_steps.prefill(torch.tensor(tokens), torch.tensor(lengths), state.cache,
                                range(4))
    assert torch.equal(state.cache.k, before[0]) and torch.equal(state.cache.v, before[1])


GENERATE = {
    "autoregressive": {},
    "early_exit": dict(strategy="early_exit", exit_layer=2),
    "layer_skip": dict(strategy="layer_skip", speedup=2.0),
    "self_speculative": dict(strategy="self_speculative", exit_layer=1, num_speculations=3),
    "self_speculative layer_skip draft": dict(strategy="self_speculative", draft="layer_skip",
                                              speedup=2.0, num_speculations=2),
    "self_speculative k=auto": dict(strategy="self_speculative", exit_layer=2,
                                    num_speculations="auto"),
}


@pytest.mark.parametrize("name", list(GENERATE))
def test_generate_gives_the_python_paths_tokens(generator, monkeypatch, name):
    """A ragged batch (a prompt longer than a prefill chunk) whose first row stops early on a
    stop token (masking, compaction), against the Python steps and the torch reference."""
    model = random_llama(generator)
    prompts = [torch.randint(0, VOCAB, (n,), generator=generator).tolist() for n in (3, 21, 8)]
    settings = dict(max_new_tokens=30, **GENERATE[name])
    stop = lsk.generate(model, prompts, eos_token_id=[], **settings).tokens[0][9]
    fused = lsk.generate(model, prompts, eos_token_id=stop, **settings)
    assert fused.stats["path"].startswith("cpu: one C++ call")
    assert len(fused.tokens[0]) <= 10 and max(len(t) for t in fused.tokens) > 10
    with monkeypatch.context() as patch:
        patch.setattr(state_module, "cpu_steps", lambda model, state: None)
        eager = lsk.generate(model, prompts, eos_token_id=stop, **settings)
    assert eager.stats["path"].startswith("eager")
    assert fused.tokens == eager.tokens
    model.backend = "torch"
    assert lsk.generate(model, prompts, eos_token_id=stop, **settings).tokens == fused.tokens


@pytest.fixture
def two_threads():
    previous = torch.get_num_threads(), cpu._cpu.num_threads()
    lsk.set_num_threads(2)
    yield
    torch.set_num_threads(previous[0])
    cpu._cpu.set_num_threads(previous[1])


def test_torch_runs_on_one_thread_while_the_team_decodes(generator, monkeypatch, two_threads):
    """A greedy generate() on the C++ steps leaves torch one thread (its spinning OpenMP
    helpers would take the team's cores) and gives the threads back, also when the call
    raises; sampling and models the C++ steps do not run keep torch's threads."""
    model = random_llama(generator)
    seen = []
    run = cpu.CpuSteps.run
    monkeypatch.setattr(cpu.CpuSteps, "run", lambda self, *args: (
        seen.append(torch.get_num_threads()), run(self, *args))[1])
    prompts = [[1, 2, 3], [4, 5]]
    lsk.generate(model, prompts, max_new_tokens=5, strategy="self_speculative", exit_layer=1,
                 num_speculations=2)
    assert seen and set(seen) == {1} and torch.get_num_threads() == 2

    def stream(row, tokens):
        assert torch.get_num_threads() == 1
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        lsk.generate(model, prompts, max_new_tokens=5, stream=stream)
    assert torch.get_num_threads() == 2

    threads = []
    lsk.generate(model, prompts, max_new_tokens=2, temperature=1.0, seed=0,
                 stream=lambda row, tokens: threads.append(torch.get_num_threads()))
    model.backend = "torch"
    lsk.generate(model, prompts, max_new_tokens=2,
                 stream=lambda row, tokens: threads.append(torch.get_num_threads()))
    assert threads and set(threads) == {2}
