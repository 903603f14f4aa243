"""The decode engine: steps free of host syncs (torch.compile(fullgraph=True) on the CPU), the
custom ops (torch.library.opcheck), the fixed-size decode state (masked rows, compaction,
reuse), the prefill path, fused weights, and CUDA-graph replay on a GPU."""
import copy

import pytest
import torch
from random_weights import random_weights

import layerskip_kernels as lsk
from layerskip_kernels.decoding.autoregressive import decode_step
from layerskip_kernels.decoding.self_speculative import ExitDraft, SkipDraft, greedy_round
from layerskip_kernels.decoding.state import DecodeState, decode_state
from layerskip_kernels.model.checkpoint import hf_state_dict
from layerskip_kernels.ops import library

VOCAB = 61


def random_llama(generator, head_dim=16, n_layers=3, max_seq_len=64, n_kv_heads=2):
    config = lsk.LlamaConfig(vocab_size=VOCAB, dim=32, n_layers=n_layers, n_heads=4,
                             n_kv_heads=n_kv_heads, head_dim=head_dim, hidden_dim=48,
                             max_seq_len=max_seq_len)
    return random_weights(lsk.Llama(config), generator, 0.3)


def live_state(model, generator, lengths=(3, 9, 5), max_drafts=3):
    """A decode state whose rows hold random KV for `lengths` positions, all rows live."""
    state = DecodeState(model, len(lengths), 48, max_drafts, graphs=False)
    for t in (state.cache.k, state.cache.v):
        t.copy_(torch.randn(t.shape, generator=generator))
    rows = state.rows(len(lengths))
    rows.cache_seqlens.copy_(torch.tensor(lengths, dtype=torch.int32))
    rows.tokens.copy_(torch.randint(0, VOCAB, (len(lengths),), generator=generator))
    rows.active.fill_(True)
    return state, rows


def snapshot(state):
    return [t.clone() for t in (state.cache.k, state.cache.v, state.tokens, state.cache_seqlens,
                                state.emitted)]


STEPS = {
    "decode": lambda model, rows: decode_step(model, rows, range(model.config.n_layers)),
    "exit round": lambda model, rows: greedy_round(ExitDraft(model, 1), rows, 3),
    "skip round": lambda model, rows: greedy_round(SkipDraft(model, [0, 2]), rows, 2),
}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", list(STEPS))
def test_steps_compile_with_fullgraph(generator, kernel_device, name, backend):
    """A step with a host sync or data-dependent Python control flow breaks the graph, and
    fullgraph=True turns that into an error: what compiles here captures in a CUDA graph."""
    model = random_llama(generator, head_dim=64 if backend == "triton" else 16)
    model = model.to(kernel_device if backend == "triton" else "cpu")
    model.backend = backend
    state, rows = live_state(model, generator)
    eager_state = copy.deepcopy(state)
    with torch.inference_mode():
        STEPS[name](model, eager_state.rows(rows.n))
        step = torch.compile(lambda: STEPS[name](model, rows), fullgraph=True, backend="eager")
        step()
    for got, want in zip(snapshot(state), snapshot(eager_state)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (state.cache_seqlens.cpu() > torch.tensor([3, 9, 5])).all()


def test_inactive_rows_do_not_advance(generator):
    model = random_llama(generator)
    state, rows = live_state(model, generator)
    rows.active[1] = False
    with torch.inference_mode():
        STEPS["exit round"](model, rows)
        decode_step(model, rows, range(3))
    assert rows.cache_seqlens[1] == 9 and (rows.cache_seqlens[[0, 2]] > torch.tensor([3, 5])).all()


def test_move_rows_keeps_each_rows_cache(generator):
    model = random_llama(generator)
    state, rows = live_state(model, generator, lengths=(3, 9, 5, 7))
    before = snapshot(state)
    state.move_rows([3, 1])
    assert torch.equal(state.cache.k[:, :2], before[0][:, [3, 1]])
    assert torch.equal(state.cache.v[:, :2], before[1][:, [3, 1]])
    assert state.cache_seqlens[:2].tolist() == [7, 9]


def test_decode_state_is_reused_only_when_it_fits(generator):
    """With CUDA graphs a state (and its captures) stays on the model for the next call that
    fits it, whatever k it asks (drafts are a capacity); a call that does not fit gets a state
    at least as large as the old one; on the CPU every call gets its own exact-size state."""
    model = random_llama(generator, max_seq_len=1024)
    first = decode_state(model, 3, 40, 4, graphs=True)
    assert (first.batch, first.max_seq_len, first.max_drafts) == (4, 256, 8)  # rounded up
    assert decode_state(model, 4, 250, 2, graphs=True) is first  # fewer drafts: the same state
    assert decode_state(model, 2, 100, 8, graphs=True) is first
    second = decode_state(model, 5, 100, 9, graphs=True)
    assert second is not first
    assert (second.batch, second.max_seq_len, second.max_drafts) == (8, 256, 9)
    assert decode_state(model, 8, 256, 2, graphs=True) is second
    with torch.no_grad():
        model.layers[0].mlp.down_proj.weight = torch.nn.Parameter(
            model.layers[0].mlp.down_proj.weight.clone())  # new weights: graphs would be stale
    assert decode_state(model, 2, 100, 2, graphs=True) is not second
    exact = decode_state(model, 3, 40, 4, graphs=False)
    assert (exact.batch, exact.max_seq_len, exact.max_drafts) == (3, 40, 4)


def test_prefill_equals_the_cached_forward(generator):
    """The prompt path (RoPE, causal SDPA, one cache write) and the decode path agree."""
    model = random_llama(generator)
    prompts = [torch.randint(0, VOCAB, (n,), generator=generator) for n in (7, 2, 11)]
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.int32)
    padded = torch.zeros(3, 11, dtype=torch.long)
    for row, p in enumerate(prompts):
        padded[row, :len(p)] = p
    with torch.inference_mode():
        cache, other = model.new_cache(3, 20), model.new_cache(3, 20)
        last = model.prefill(padded, lengths, cache)
        full = model(padded, other, torch.zeros(3, dtype=torch.int32))
        torch.testing.assert_close(last, full[torch.arange(3), lengths.long() - 1])
        for row, n in enumerate(lengths.tolist()):
            torch.testing.assert_close(cache.k[:, row, :n], other.k[:, row, :n])
            torch.testing.assert_close(cache.v[:, row, :n], other.v[:, row, :n])


def test_fused_weights_split_back_to_hugging_face_names(generator, tmp_path):
    model = random_llama(generator)
    state = hf_state_dict(model)
    assert "layers.0.self_attn.q_proj.weight" in state and "layers.2.mlp.up_proj.weight" in state
    assert not any("qkv" in name or "gate_up" in name for name in state)
    again = lsk.Llama(model.config)
    again.load_state_dict(state)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


# ---------------------------------------------------------------- custom ops


def opcheck_cases(generator):
    randn = lambda *shape: torch.randn(*shape, generator=generator)  # noqa: E731
    q, k_cache, v_cache = randn(2, 3, 4, 16), randn(2, 12, 2, 16), randn(2, 12, 2, 16)
    k_new, v_new = randn(2, 3, 2, 16), randn(2, 3, 2, 16)
    seqlens = torch.tensor([2, 7], dtype=torch.int32)
    cos, sin = randn(12, 8), randn(12, 8)
    x, w = randn(3, 5, 32), randn(32)
    drafts = torch.randint(0, 9, (2, 3), generator=generator)
    return {
        "attention_with_kvcache": (library.attention_with_kvcache,
                                   (q, k_cache, v_cache, k_new, v_new, seqlens, cos, sin, None,
                                    "torch")),
        "rms_norm": (library.rms_norm, (x, w, 1e-5, "torch")),
        "rms_norm_residual": (library.rms_norm_residual, (x, w, 1e-5, randn(3, 5, 32), "torch")),
        "draft_head_argmax": (library.draft_head_argmax, (randn(2, 32), w, 1e-5, randn(9, 32),
                                                          "torch")),
        "greedy_accept": (library.greedy_accept, (drafts, randn(2, 4, 9), seqlens,
                                                  torch.tensor([True, False]), "torch")),
        "silu_mul": (library.silu_mul, (randn(3, 2, 10), "torch")),
    }


@pytest.mark.parametrize("name", ["attention_with_kvcache", "rms_norm", "rms_norm_residual",
                                  "draft_head_argmax", "greedy_accept", "silu_mul"])
def test_custom_op_registration(generator, name):
    """Schema (mutated arguments declared), fake implementation and dispatch agree."""
    op, args = opcheck_cases(generator)[name]
    torch.library.opcheck(op, args)


# ---------------------------------------------------------------- issue 11 regressions


@pytest.mark.parametrize("strategy,extra", [
    ("autoregressive", {}), ("self_speculative", {"exit_layer": 2, "num_speculations": 3})])
def test_triton_backend_on_the_default_model_with_long_prompts(kernel_device, strategy, extra):
    """The embedded default model (head_dim 32) with 30-60-token prompts on backend "triton"
    (the CPU interpreter, or compiled on a GPU): prompts take the prefill path, kernels what
    they support, and the tokens are the torch backend's."""
    model = lsk.load_model(device=kernel_device)
    tok = lsk.load_tokenizer()
    text = "import os\nimport sys\n\n\ndef main(argv):\n    parser = argparse.ArgumentParser("
    prompts = [tok.encode(text * 2)[:41], tok.encode(text * 2)[:30], tok.encode(text * 3)[:60]]
    assert [len(p) for p in prompts] == [41, 30, 60]
    want = lsk.generate(model, prompts, max_new_tokens=6, strategy=strategy, **extra).tokens
    model.backend = "triton"
    assert lsk.generate(model, prompts, max_new_tokens=6, strategy=strategy,
                        **extra).tokens == want


# ---------------------------------------------------------------- GPU: graphs, prefill


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize("strategy,extra", [
    ("autoregressive", {}),
    ("self_speculative", {"exit_layer": 1, "num_speculations": 2}),
    ("self_speculative", {"exit_layer": 2, "num_speculations": 5}),
    ("self_speculative", {"draft": "layer_skip", "speedup": 1.5, "num_speculations": 3}),
])
def test_cuda_graph_replay_gives_eager_tokens(generator, backend, strategy, extra):
    """Greedy, a ragged batch of 4 whose rows finish at different times: captured steps and
    rounds replay to the tokens of eager steps; captures are reused by the next call. float32,
    so that no near-tie argmax can depend on which GEMM algorithm a capture picked (the
    fp16 kernels inside graphs are tested in test_attention_with_kvcache)."""
    model = random_llama(generator, head_dim=64, n_layers=4, max_seq_len=256).to("cuda")
    model.backend = backend
    prompts = [[1, 2, 3], [4] * 17, [5, 6], list(range(7, 40))]
    kw = dict(max_new_tokens=24, strategy=strategy, eos_token_id=[], **extra)
    eager = lsk.generate(model, prompts, cuda_graphs=False, **kw)
    replayed = lsk.generate(model, prompts, **kw)
    assert eager.stats["cuda_graphs"] is False
    assert replayed.stats["cuda_graphs"] is True, replayed.stats["path"]
    assert replayed.tokens == eager.tokens
    assert lsk.generate(model, prompts, **kw).stats["capture_s"] == 0  # all kept
    stopped = [row[5] for row in eager.tokens]  # rows finish at different steps
    again = lsk.generate(model, prompts, **{**kw, "eos_token_id": stopped[:2]})
    want = lsk.generate(model, prompts, cuda_graphs=False, **{**kw, "eos_token_id": stopped[:2]})
    assert again.tokens == want.tokens


@pytest.mark.gpu
def test_long_prompt_prefill_on_the_gpu_matches_the_cpu():
    """A 1040-token prompt through the GPU prefill path (SDPA) and the kernels' decode, on the
    decisive model against its float32 CPU run. The prompt is the model's own greedy text
    from [6, 7], whose next tokens have no near-ties (checked here: random prompts flatten
    the logits until fp16 could flip an argmax)."""
    from test_generate import DECISIVE_MARGIN, decisive_llama, greedy_margins
    model = decisive_llama()
    model.config.max_seq_len = 1100
    prompt = [6, 7] + lsk.generate(model, [[6, 7]], max_new_tokens=1038, eos_token_id=[]).tokens[0]
    prompts = [prompt, prompt[:37]]
    want = lsk.generate(model, prompts, max_new_tokens=8, eos_token_id=[]).tokens
    with torch.inference_mode():
        assert min(greedy_margins(model, prompts, want)) > DECISIVE_MARGIN
    model = model.to("cuda", torch.float16)
    for backend in ("triton", "cuda"):
        if backend == "cuda" and not lsk.cuda_available():
            continue
        model.backend = backend
        got = lsk.generate(model, prompts, max_new_tokens=8, eos_token_id=[])
        assert got.tokens == want, backend
