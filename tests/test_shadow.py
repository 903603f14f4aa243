"""Shadow tokens (DEL, arXiv 2504.05598): a greedy round drafting from exit E, or a plain step,
also heads the hidden states after the layers below each shadow exit s, which it computes
anyway. At each position of the round, exit s's token is what early exit at s predicts for
the prefix the round ran there (on the C++ path and the Python paths alike, bit for bit);
bad shadow exits are refused before anything is written; decoding with shadows stays
token-for-token autoregressive with one host sync a round; and the adaptive policy learns
an exit's acceptance from shadows of plain steps, never drafting from it."""
import pytest
import torch
from test_cpu_steps import (buffers, copy_state, live_state, needs_cpu_kernels,  # noqa: F401
                            team_threads)
from test_cpu_steps import random_llama as cpu_llama
from test_self_speculative import VOCAB, autoregressive, random_llama, random_prompts, speculative

import layerskip_kernels as lsk
from layerskip_kernels.decoding import plan as plan_module
from layerskip_kernels.decoding import state as state_module
from layerskip_kernels.decoding.autoregressive import decode_step, prefill
from layerskip_kernels.decoding.policy import SHADOW_STINT, STINT, AdaptivePolicy
from layerskip_kernels.decoding.self_speculative import ExitDraft, SkipDraft, greedy_round
from layerskip_kernels.decoding.state import MAX_SHADOW, DecodeState

GREEDY = (0.0, 0, 1.0)
N_LAYERS = 5


def exit_tokens(model, prefix):
    """{s: the token early exit at s predicts after `prefix`} for s in [1, L], by a causal
    forward without a cache, keeping every layer's output."""
    states = []

    def each(i, run, h):
        states.append(run(h))
        return states[-1]
    with torch.inference_mode():
        model.run_layers(model.embed_tokens(torch.tensor([prefix])), range(model.config.n_layers),
                         each=each)
    return {i + 1: int(model.head(h[0, -1]).argmax()) for i, h in enumerate(states)}


def prefilled(model, prompts, max_drafts=4):
    state = DecodeState(model, len(prompts), 64, max_drafts, graphs=False)
    with torch.inference_mode():
        prefill(model, state.rows(len(prompts)), prompts, range(model.config.n_layers), GREEDY,
                None, state.cpu_steps)
    return state


PATHS = ["c++", "python", "torch"]  # one C++ call; greedy_round on the CPU kernels; on torch


def path_model(generator, path, n_kv_heads):
    model = cpu_llama(generator, n_layers=N_LAYERS, n_heads=4, n_kv_heads=n_kv_heads)
    if path == "torch":
        model.backend = "torch"
    return model


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("k", [1, 3, 4])
@pytest.mark.parametrize("exit_layer,shadow", [(1, (2, 3, 4)), (2, (1, 3, 4)), (4, (1, 3)),
                                               (3, (1,)), (2, (4,))])
def test_shadow_tokens_are_early_exit_predictions(generator, path, k, exit_layer, shadow):
    """Three rounds over a ragged batch (GQA): at every position i of a round, shadow exit
    s's token is early exit at s on the prefix the round ran there (the row's tokens, then
    the round's first i drafts), below and above the drafting exit."""
    model = path_model(generator, path, n_kv_heads=2)
    prompts = random_prompts(generator, (3, 11, 6), VOCAB - 4)
    state = prefilled(model, prompts)
    n = len(prompts)
    sequences = [p + [t] for p, t in zip(prompts, state.tokens[:n].tolist())]
    for _ in range(3):
        with torch.inference_mode():
            if path == "c++":
                assert state.cpu_steps.run(("round", n, k, ("exit", exit_layer), shadow)) == k
            else:
                greedy_round(ExitDraft(model, exit_layer), state.rows(n), k, shadow)
        for b, row in enumerate(state.emitted[:n].tolist()):
            drafts = row[:k]
            m = row[k + 1]
            for i in range(k + 1):
                expected = exit_tokens(model, sequences[b] + drafts[:i])
                if i <= m:  # the reference's full model: the accepted drafts, the next token
                    assert expected[N_LAYERS] == (drafts + [row[k]])[i] if i < m else row[k]
                for j, s in enumerate(shadow):
                    assert row[k + 2 + j * (k + 1) + i] == expected[s], (b, i, s)
            sequences[b] += drafts[:row[k + 1]] + [row[k]]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shadow", [(1, 2, 3, 4), (2,), (4,)])
def test_a_steps_shadow_tokens_are_early_exit_predictions(generator, path, shadow):
    """A plain step writes a k = 0 round's layout: its token, 0, then each shadow exit's."""
    model = path_model(generator, path, n_kv_heads=1)
    prompts = random_prompts(generator, (4, 9), VOCAB - 4)
    state = prefilled(model, prompts)
    sequences = [p + [t] for p, t in zip(prompts, state.tokens[:2].tolist())]
    for _ in range(2):
        with torch.inference_mode():
            if path == "c++":
                state.cpu_steps.run(("step", 2, tuple(range(N_LAYERS)), shadow))
            else:
                decode_step(model, state.rows(2), range(N_LAYERS), shadow=shadow)
        for b, row in enumerate(state.emitted[:2].tolist()):
            expected = exit_tokens(model, sequences[b])
            assert row[:2] == [expected[N_LAYERS], 0] and row[0] == state.tokens[b]
            assert row[2:2 + len(shadow)] == [expected[s] for s in shadow]
            sequences[b].append(row[0])


SHADOWED = {  # CpuSteps keys with shadow exits, and the Python step each stands for
    "exit round, shadows below and above": (
        ("round", 4, 3, ("exit", 2), (1, 3, 4)),
        lambda model, rows: greedy_round(ExitDraft(model, 2), rows, 3, (1, 3, 4))),
    "exit round k=1, one shadow above": (
        ("round", 3, 1, ("exit", 1), (3,)),
        lambda model, rows: greedy_round(ExitDraft(model, 1), rows, 1, (3,))),
    "exit round at the last layer, k=4, four shadows below": (
        ("round", 4, 4, ("exit", 5), (1, 2, 3, 4)),
        lambda model, rows: greedy_round(ExitDraft(model, 5), rows, 4, (1, 2, 3, 4))),
    "exit round, k=0": (
        ("round", 4, 0, ("exit", 2), (1, 3)),
        lambda model, rows: greedy_round(ExitDraft(model, 2), rows, 0, (1, 3))),
    "step": (("step", 4, (0, 1, 2, 3, 4), (1, 2, 4)),
             lambda model, rows: decode_step(model, rows, range(5), shadow=(1, 2, 4))),
}


@pytest.mark.parametrize("shape", [dict(head_dim=16, n_heads=4, n_kv_heads=4),
                                   dict(head_dim=32, n_heads=4, n_kv_heads=2)],
                         ids=["gqa1-d16", "gqa2-d32"])
@pytest.mark.parametrize("name", list(SHADOWED))
@pytest.mark.parametrize("threads", [1, 2])
def test_cpp_shadows_equal_the_python_steps_bit_for_bit(generator, name, shape, threads):
    key, python_step = SHADOWED[name]
    model = cpu_llama(generator, n_layers=N_LAYERS, **shape)
    fused = live_state(model, generator)
    eager = copy_state(model, fused)
    with team_threads(threads), torch.inference_mode():
        python_step(model, eager.rows(key[1]))
        fused.cpu_steps.run(key)
    for buffer, expected in buffers(eager).items():
        assert torch.equal(buffers(fused)[buffer], expected), buffer
    k = 0 if key[0] == "step" else key[2]
    width = k + 2 + len(key[-1]) * (k + 1)
    assert (fused.emitted[:key[1], :width] != -7).all()  # every shadow column written
    assert (fused.emitted[:, width:] == -7).all() and (fused.emitted[key[1]:] == -7).all()


# ------------------------------------------------------------------------------- refusals


REFUSED = [  # (drafter exit or "skip", k, shadow, what the error names)
    (2, 3, (0,), "shadow"), (2, 3, (5,), "shadow"), (2, 3, (2,), "shadow"),
    (2, 3, (3, 1), "shadow"), (2, 3, (3, 3), "shadow"), ("skip", 2, (1,), "shadow"),
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("drafter, k, shadow, why", REFUSED)
def test_refused_shadows_write_nothing(generator, path, drafter, k, shadow, why):
    """Out of the model (0, L), the drafting exit itself, unsorted or repeated exits, and any
    shadow of a layer-skip draft (its hidden states are not the full model's): refused by
    every path before a buffer changes."""
    model = path_model(generator, path, n_kv_heads=2)
    state = live_state(model, generator)
    before = {name: t.clone() for name, t in buffers(state).items()}
    make = (lambda: SkipDraft(model, [0, 3])) if drafter == "skip" else (
        lambda: ExitDraft(model, drafter))
    with pytest.raises(ValueError, match=why), torch.inference_mode():
        if path == "c++":  # DecodeState.run: the C++ call, or Python where it does not fuse
            state.run(("round", 4, k, make().key, shadow),
                      lambda: greedy_round(make(), state.rows(4), k, shadow))
        else:
            greedy_round(make(), state.rows(4), k, shadow)
    for name, t in buffers(state).items():
        assert torch.equal(t, before[name]), name


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("layers, shadow", [((0, 1, 2, 3, 4), (0,)), ((0, 1, 2, 3, 4), (5,)),
                                            ((0, 1, 2), (3,)), ((0, 1, 2, 3, 4), (2, 1))])
def test_refused_step_shadows_write_nothing(generator, path, layers, shadow):
    model = path_model(generator, path, n_kv_heads=2)
    state = live_state(model, generator)
    before = {name: t.clone() for name, t in buffers(state).items()}
    with pytest.raises(ValueError, match="shadow"), torch.inference_mode():
        if path == "c++":
            state.cpu_steps.run(("step", 4, layers, shadow))
        else:
            decode_step(model, state.rows(4), layers, shadow=shadow)
    for name, t in buffers(state).items():
        assert torch.equal(t, before[name]), name


@pytest.mark.parametrize("path", PATHS)
def test_more_shadows_than_emitted_holds_are_refused(generator, path):
    """A round of max_drafts drafts has room for MAX_SHADOW exits' tokens, no more."""
    model = cpu_llama(generator, n_layers=MAX_SHADOW + 2)
    if path == "torch":
        model.backend = "torch"
    state = live_state(model, generator)
    k, exit_layer = state.max_drafts, MAX_SHADOW + 1
    before = {name: t.clone() for name, t in buffers(state).items()}
    for shadow, refused in ((tuple(range(1, MAX_SHADOW + 1)), False),
                            (tuple(range(1, MAX_SHADOW + 2)), True)):
        twin = copy_state(model, state)
        key = ("round", 4, k, ("exit", exit_layer), shadow)
        with torch.inference_mode():
            call = (lambda: twin.cpu_steps.run(key)) if path == "c++" else (
                lambda: greedy_round(ExitDraft(model, exit_layer), twin.rows(4), k, shadow))
            if refused:
                with pytest.raises(ValueError, match="shadow"):
                    call()
                for name, t in buffers(twin).items():
                    assert torch.equal(t, before[name]), name
            else:
                call()  # the control: MAX_SHADOW fit


def test_the_cpp_round_refuses_shadows_with_a_confidence_stop(generator):
    model = cpu_llama(generator)
    state = live_state(model, generator, max_drafts=8)
    with pytest.raises(ValueError, match="shadow"), torch.inference_mode():
        state.cpu_steps.run(("round", 4, 8, ("exit", 2), (1,)), 0.5)


# -------------------------------------------------------------- decoding with shadows on


def shadowing(monkeypatch, every):
    """Make the adaptive policy's stints one round each, every `every`-th shadowing the
    candidate exits its option may shadow (1: every round)."""
    pick = AdaptivePolicy._pick

    def picked(self):
        option, _, _ = pick(self)
        self.picked = getattr(self, "picked", 0) + 1
        drafted = None if option is None else option[0]
        return option, 1, self.shadows[drafted] if self.picked % every == 0 else ()
    monkeypatch.setattr(AdaptivePolicy, "_pick", picked)


@pytest.fixture
def every_round_shadows(monkeypatch):
    shadowing(monkeypatch, 1)


@pytest.mark.parametrize("path", ["c++", "eager", "torch"])
def test_greedy_with_shadows_equals_autoregressive(generator, monkeypatch, every_round_shadows,
                                                   path):
    """exit_layer="auto" shadowing every round and step (a ragged batch, stop tokens inside
    accepted drafts): the tokens of autoregressive decoding, and every round shadowed."""
    model = random_llama(generator, n_layers=5)
    prompts = random_prompts(generator, (1, 3, 7, 12))
    free = autoregressive(model, prompts, 40).tokens
    stop = next(t for t in range(VOCAB) if sum(0 < row.index(t) < 39 for row in free
                                               if t in row) >= 2)
    expected = [row[:row.index(stop) + 1] if stop in row else row for row in free]
    if path == "eager":
        monkeypatch.setattr(state_module, "cpu_steps", lambda model, state: None)
    if path == "torch":
        model.backend = "torch"
    res = speculative(model, prompts, 40, exit_layer="auto", eos_token_id=stop)
    assert res.tokens == expected and any(len(row) < 40 for row in res.tokens)
    s = res.stats
    assert s["shadow_rounds"] == s["rounds"] and s["fallback_rounds"] >= 1
    assert s["path"].startswith("cpu" if path == "c++" else "eager")
    assert set(s["exit_acceptance"]) == {1, 2, 3, 4}  # candidate_exits(5): all observed


def default_model_auto(max_new_tokens):
    """The embedded default model and exit_layer="auto"'s result on two code prompts, its
    tokens checked against autoregressive decoding's."""
    model = lsk.load_model()
    prompts = [[0, 738, 599, 200, 738, 291], [0, 314, 410]]
    expected = lsk.generate(model, prompts, max_new_tokens=max_new_tokens).tokens
    res = lsk.generate(model, prompts, max_new_tokens=max_new_tokens,
                       strategy="self_speculative", exit_layer="auto")
    assert res.tokens == expected
    return model, res


@pytest.mark.parametrize("every_round", [True, False])
def test_default_model_with_shadows_equals_autoregressive(monkeypatch, every_round):
    """Every round shadowed, or the policy's own shadow stint (after the recommendation's
    first stint, the neighbouring exits, never seen: SHADOW_STINT rounds)."""
    if every_round:
        shadowing(monkeypatch, 1)
    model, res = default_model_auto(96)
    s = res.stats
    assert s["shadow_rounds"] == (s["rounds"] if every_round else SHADOW_STINT)
    c = model.config  # drafting from the recommended exit, its neighbours are shadowed
    assert {c.exit_layer - 1, c.exit_layer + 1} <= set(s["exit_acceptance"])


def test_replayed_rounds_with_shadows_are_captured_once(generator, monkeypatch):
    """With CUDA graphs (the CPU stand-in of test_decode_state): a round or step with shadow
    exits is a graph of its own key, captured once and replayed, and the tokens stay
    exact."""
    from test_decode_state import Capture
    from test_decode_state import random_llama as graph_llama
    capture = Capture(monkeypatch)
    model = graph_llama(generator)
    prompts = random_prompts(generator, (5, 17, 9), vocab=61)
    expected = autoregressive(model, prompts, 40).tokens
    shadowing(monkeypatch, 2)
    res = speculative(model, prompts, 40, exit_layer="auto")
    assert res.tokens == expected and res.stats["cuda_graphs"]
    shadowed = [key for key in capture.keys if len(key) == (5 if key[0] == "round" else 4)]
    assert shadowed and len(shadowed) < len(capture.keys)  # with and without shadows
    assert len(set(capture.keys)) == len(capture.keys)  # each captured once
    assert res.stats["shadow_rounds"] == res.stats["rounds"] // 2


# ---------------------------------------------------------------- the policy learns from them


class StepsOnly(AdaptivePolicy):
    """The adaptive policy, made to choose plain steps only (its instances kept)."""
    made = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        StepsOnly.made.append(self)

    def _pick(self):
        return None, STINT, self.shadows[None]


def damped(model, layers, scale=0.02):
    """Scale the residual writes of `layers` down (by `scale`): exits above the others agree
    with the full model almost always (more often the smaller the scale)."""
    with torch.no_grad():
        for i in layers:
            model.layers[i].self_attn.o_proj.weight.mul_(scale)
            model.layers[i].mlp.down_proj.weight.mul_(scale)
    return model


def test_the_policy_learns_an_exits_acceptance_from_plain_steps(generator, monkeypatch):
    """Plain steps only, every one shadowing the candidate exits: the policy's counts of
    each exit are exactly the agreements of early exit with the full model over the decoded
    positions (recomputed here without a cache), no exit is ever drafted from, and the
    estimates tell the damped exits (high) from the first (low)."""
    model = damped(random_llama(generator, n_layers=8), [6, 7])
    prompts = random_prompts(generator, (3, 9))
    monkeypatch.setattr(plan_module, "AdaptivePolicy", StepsOnly)
    StepsOnly.made.clear()
    res = speculative(model, prompts, 24, exit_layer="auto")
    assert res.tokens == autoregressive(model, prompts, 24).tokens
    policy, = StepsOnly.made
    s = res.stats
    assert s["choices"] == {"autoregressive": s["rounds"]} and s["drafted"] == 0
    assert s["shadow_rounds"] == s["rounds"] == 23
    hits = {e: 0 for e in policy.exits}
    for prompt, out in zip(prompts, res.tokens):
        for i in range(1, len(out)):  # the step that decoded out[i] (prefill gave out[0])
            predicted = exit_tokens(model, prompt + out[:i])
            for e in hits:
                hits[e] += predicted[e] == out[i]
    positions = s["rounds"] * len(prompts)
    assert dict(policy.hits) == hits
    assert dict(policy.misses) == {e: positions - h for e, h in hits.items()}
    acceptance = s["exit_acceptance"]
    assert set(acceptance) == set(policy.exits) == {2, 4, 6, 7}
    assert acceptance[7] > 0.8 and acceptance[2] < 0.5
