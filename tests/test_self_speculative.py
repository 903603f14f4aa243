"""Self-speculative decoding (decoding/self_speculative.py through `generate`): greedy output
equals autoregressive output token for token, eos and max_new_tokens per row, exact round
statistics, no stale cache slot is ever read, lossless sampling, `accept`, argument checks."""
import pytest
import torch
from random_weights import random_weights

import layerskip_kernels as lsk
from layerskip_kernels.decoding import self_speculative
from layerskip_kernels.decoding.sampling import logits_to_probs
from layerskip_kernels.decoding.self_speculative import accept

VOCAB = 101  # odd on purpose
GREEDY = (0.0, 0, 1.0)  # (temperature, top_k, top_p) as `accept` takes them


def random_llama(generator, n_layers=4, n_kv_heads=2, vocab=VOCAB, dim=64, hidden_dim=96,
                 std=0.2, max_seq_len=256):
    """Weights N(0, std), norms 1 + N(0, 0.1): logits spread by ~std * sqrt(dim), so greedy
    argmax has no near-ties that fp32 reassociation (batched verify) could flip."""
    config = lsk.LlamaConfig(vocab_size=vocab, dim=dim, n_layers=n_layers, n_heads=4,
                             n_kv_heads=n_kv_heads, hidden_dim=hidden_dim,
                             max_seq_len=max_seq_len)
    return random_weights(lsk.Llama(config), generator, std)


def random_prompts(generator, lengths, vocab=VOCAB):
    return [torch.randint(0, vocab, (n,), generator=generator).tolist() for n in lengths]


def autoregressive(model, prompts, n, **kw):
    return lsk.generate(model, prompts, n, eos_token_id=kw.pop("eos_token_id", []), **kw)


def speculative(model, prompts, n, **kw):
    kw.setdefault("eos_token_id", [])
    return lsk.generate(model, prompts, n, strategy="self_speculative", **kw)


# ------------------------------------------------------------------------- greedy exactness


@pytest.mark.parametrize("k", [1, 2, 5])
@pytest.mark.parametrize("exit_at", ["first", "middle", "last"])
@pytest.mark.parametrize("n_layers,n_kv_heads,lengths", [
    (4, 2, (1, 3, 7, 12)), (5, 1, (12, 1)), (6, 2, (7,))])
def test_greedy_equals_autoregressive(generator, n_layers, n_kv_heads, lengths, exit_at, k):
    model = random_llama(generator, n_layers, n_kv_heads)
    E = {"first": 1, "middle": n_layers // 2, "last": n_layers - 1}[exit_at]
    prompts = random_prompts(generator, lengths)
    expected = autoregressive(model, prompts, 29).tokens
    res = speculative(model, prompts, 29, exit_layer=E, num_speculations=k)
    assert res.tokens == expected
    assert res.stats["drafted"] > res.stats["accepted"]  # rejections (rollbacks) happened
    assert len({t for row in expected for t in row}) > 10  # not one repeated token


@pytest.mark.parametrize("speedup", [1.5, 2])
@pytest.mark.parametrize("k", [1, 3])
def test_greedy_layer_skip_draft_equals_autoregressive(generator, speedup, k):
    model = random_llama(generator, n_layers=6)
    prompts = random_prompts(generator, (1, 3, 7, 12))
    expected = autoregressive(model, prompts, 25).tokens
    res = speculative(model, prompts, 25, draft="layer_skip", speedup=speedup,
                      num_speculations=k)
    assert res.tokens == expected
    assert res.stats["accepted"] < res.stats["drafted"]
    assert res.stats["exit_layer"] is None


def test_layer_skip_draft_with_every_layer_accepts_every_draft(generator):
    """speedup 1 keeps every layer: the draft is the full model, so no draft is rejected."""
    model = random_llama(generator, n_layers=4)
    prompts = random_prompts(generator, (3, 12))
    res = speculative(model, prompts, 21, draft="layer_skip", speedup=1, num_speculations=4)
    assert res.tokens == autoregressive(model, prompts, 21).tokens
    assert res.stats["accepted"] == res.stats["drafted"] > 0
    assert res.stats["acceptance_rate"] == 1.0


@pytest.mark.parametrize("draft,kw", [("early_exit", {"exit_layer": 3}),
                                      ("layer_skip", {"speedup": 2})])
def test_auto_num_speculations_equals_autoregressive(generator, draft, kw):
    model = random_llama(generator, n_layers=5)
    prompts = random_prompts(generator, (1, 3, 7, 12))
    res = speculative(model, prompts, 33, draft=draft, num_speculations="auto", **kw)
    assert res.tokens == autoregressive(model, prompts, 33).tokens
    s = res.stats
    assert s["num_speculations"] == "auto"
    assert s["row_rounds"] <= s["drafted"] <= 8 * s["row_rounds"]  # 1 <= k <= 8 per round


@pytest.mark.parametrize("E,k", [(1, 1), (2, 3), (3, 8), (4, 5), (4, 2)])
def test_stories_greedy_equals_autoregressive(stories_path, E, k):
    model = lsk.load_model(stories_path)
    prompts = [[1], [1, 403, 407, 261, 378, 410, 261, 262]]  # BOS; BOS + a few tokens
    expected = autoregressive(model, prompts, 100).tokens
    res = speculative(model, prompts, 100, exit_layer=E, num_speculations=k)
    assert res.tokens == expected
    assert 0 < res.stats["accepted"] < res.stats["drafted"]


# ------------------------------------------------------------------ eos and max_new_tokens


def test_eos_stops_each_row_where_autoregressive_does(generator):
    model = random_llama(generator, n_layers=5)
    prompts = random_prompts(generator, (1, 3, 7, 12))
    free = autoregressive(model, prompts, 30).tokens
    # Stop ids: row 0's first token (it ends at once), and one token that first occurs at a
    # different place in two other rows and not at all in the remaining one.
    first_at = [{t: row.index(t) for t in reversed(row)} for row in free]
    eos = next(t for t in range(VOCAB) if t != free[0][0]
               and 0 < first_at[1].get(t, 99) < first_at[2].get(t, 99) < 29
               and t not in free[3])
    stop_ids = [free[0][0], eos]
    expected = [row[:next((i + 1 for i, t in enumerate(row) if t in stop_ids), len(row))]
                for row in free]
    assert expected[0] == [free[0][0]] and len(expected[1]) < len(expected[2]) < 30
    assert len(expected[3]) == 30  # a row without a stop token runs to max_new_tokens
    assert autoregressive(model, prompts, 30, eos_token_id=stop_ids).tokens == expected
    for E, k in [(1, 3), (4, 5), (2, 1)]:
        res = speculative(model, prompts, 30, exit_layer=E, num_speculations=k,
                          eos_token_id=stop_ids)
        assert res.tokens == expected
        assert res.stats["new_tokens"] == sum(map(len, expected))
    one = speculative(model, prompts[1:2], 30, exit_layer=4, num_speculations=5, eos_token_id=eos)
    assert one.tokens == expected[1:2] and one.tokens[0][-1] == eos


@pytest.mark.parametrize("k,max_new_tokens", [(k, n) for k in (2, 5) for n in (1, 2, 3, 7, 8, 13)])
def test_max_new_tokens_is_exact_for_each_row(generator, max_new_tokens, k):
    model = random_llama(generator, n_layers=4)
    prompts = random_prompts(generator, (1, 3, 7, 12))
    expected = autoregressive(model, prompts, 13).tokens
    res = speculative(model, prompts, max_new_tokens, exit_layer=3, num_speculations=k)
    assert [len(t) for t in res.tokens] == [max_new_tokens] * len(prompts)
    assert res.tokens == [row[:max_new_tokens] for row in expected]
    if max_new_tokens == 1:  # the prefill's token is all: no round runs
        assert res.stats["rounds"] == res.stats["drafted"] == 0


def test_rows_finishing_first_stay_inside_the_cache(generator):
    """A row that overshoots max_new_tokens while another row is still decoding."""
    model = random_llama(generator, n_layers=4)
    for _ in range(6):  # ragged prompts; with these seeds several batches hit the overrun
        prompts = random_prompts(generator, (1, 3, 7, 12))
        res = speculative(model, prompts, 7, exit_layer=3, num_speculations=5)
        assert res.tokens == autoregressive(model, prompts, 7).tokens


# --------------------------------------------------------------------------- exact stats


def simulated_stats(model, prompts, E, k, n, stop_ids=()):
    """The stats greedy self-speculation must report, derived independently: rows are
    independent, every round starts from the true prefix, and a round accepts the longest
    run of drafts (the exit's greedy tokens, one no-cache forward) equal to the full model's
    greedy tokens (also capped by k); a row stops at n tokens or after a stop id."""
    full = autoregressive(model, prompts, n + k + 1).tokens
    stats = {"rounds": 0, "row_rounds": 0, "drafted": 0, "accepted": 0}
    for prompt, new in zip(prompts, full):
        seq = prompt + new
        draft = model(torch.tensor([seq]), exit_layer=E)[0].argmax(-1).tolist()
        p, out, rounds = len(prompt), [new[0]], 0  # p: position of the pending token
        while len(out) < n and not set(out) & set(stop_ids):
            m = 0
            while m < k and draft[p + m] == seq[p + m + 1]:
                m += 1
            rounds += 1
            stats["accepted"] += m
            out += seq[p + 1:p + m + 2]
            p += m + 1
        stats["row_rounds"] += rounds
        stats["rounds"] = max(stats["rounds"], rounds)
    stats["drafted"] = k * stats["row_rounds"]
    return stats


@pytest.mark.parametrize("E,k,n", [(1, 2, 40), (3, 5, 41), (3, 1, 17), (2, 8, 33)])
def test_stats_batch_one_match_a_simulation(generator, E, k, n):
    model = random_llama(generator, n_layers=4)
    prompt = random_prompts(generator, (5,))
    res = speculative(model, prompt, n, exit_layer=E, num_speculations=k)
    s = res.stats
    assert {key: s[key] for key in ("rounds", "row_rounds", "drafted", "accepted")} == \
        simulated_stats(model, prompt, E, k, n)
    # The closed-form invariant: every round emits m + 1 tokens, only the last round can be
    # cut by max_new_tokens, and it keeps at least one of its (at most k + 1) tokens.
    produced = 1 + s["accepted"] + s["row_rounds"]
    assert s["new_tokens"] == n <= produced <= n + k
    assert s["rounds"] == s["row_rounds"] and s["drafted"] == k * s["row_rounds"]
    assert s["acceptance_rate"] == s["accepted"] / s["drafted"]
    assert s["tokens_per_round"] == (s["accepted"] + s["row_rounds"]) / s["row_rounds"]
    assert 0 < s["accepted"] < s["drafted"]


def test_stats_ragged_batch_with_eos_match_a_simulation(generator):
    model = random_llama(generator, n_layers=5)
    prompts = random_prompts(generator, (1, 3, 7, 12))
    free = autoregressive(model, prompts, 30).tokens
    stop_ids = {free[1][11], free[2][4]}
    res = speculative(model, prompts, 30, exit_layer=4, num_speculations=3,
                      eos_token_id=list(stop_ids))
    s = res.stats
    assert {key: s[key] for key in ("rounds", "row_rounds", "drafted", "accepted")} == \
        simulated_stats(model, prompts, 4, 3, 30, stop_ids)
    assert s["accepted"] <= s["drafted"]
    assert s["acceptance_rate"] == s["accepted"] / s["drafted"]
    # Every row round emits m + 1 tokens; truncation (eos, max_new_tokens) only cuts rows'
    # last rounds, each keeping at least one token.
    produced = len(prompts) + s["accepted"] + s["row_rounds"]
    assert s["new_tokens"] <= produced <= s["new_tokens"] + 3 * len(prompts)


# ---------------------------------------------------------- rollback: stale slots unread


@pytest.mark.parametrize("q_len", [1, 4])
def test_stale_cache_slots_are_never_read(generator, q_len):
    """Rollback only shortens cache_seqlens: whatever lies past it must not change logits."""
    model = random_llama(generator, n_layers=3)
    prompts = random_prompts(generator, (3, 9, 6))
    clean = model.new_cache(len(prompts), 40)
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.int32)
    padded = torch.tensor([p + [0] * (9 - len(p)) for p in prompts])
    model.prefill(padded, lengths, clean)
    dirty = model.new_cache(len(prompts), 40)
    dirty.k.copy_(clean.k)
    dirty.v.copy_(clean.v)
    stale = torch.arange(40)[None, :] >= lengths[:, None]  # (B, Smax): slots past each row
    assert stale.sum() > 0 and not stale.all(-1).any()
    dirty.k[:, stale] = 1e4
    dirty.v[:, stale] = -1e4
    tokens = torch.randint(0, VOCAB, (len(prompts), q_len), generator=generator)
    expected = model(tokens, clean, lengths)
    got = model(tokens, dirty, lengths)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # ... and the slots the step wrote hold the same KV in both caches.
    written = (torch.arange(40)[None, :] >= lengths[:, None]) & \
        (torch.arange(40)[None, :] < lengths[:, None] + q_len)
    assert torch.equal(dirty.k[:, written], clean.k[:, written])
    assert torch.equal(dirty.v[:, written], clean.v[:, written])


# ------------------------------------------------------------------- lossless sampling


def chi_square_p_value(counts, probs, min_expected=5.0):
    """Pearson's chi-square p-value of counts against probs; bins expected below
    min_expected are pooled into one bin."""
    counts, probs = counts.double().flatten(), probs.double().flatten()
    expected = probs * counts.sum()
    small = expected < min_expected
    obs = torch.cat([counts[~small], counts[small].sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    if exp[-1] < min_expected:  # pooled bin still small: fold it into the smallest bin
        obs, exp = obs[:-1].clone(), exp[:-1].clone()
        obs[exp.argmin()] += counts[small].sum()
        exp[exp.argmin()] += expected[small].sum()
    keep = exp > 0
    assert (obs[~keep] == 0).all(), "a sample fell where the distribution has no mass"
    obs, exp = obs[keep], exp[keep]
    stat = ((obs - exp) ** 2 / exp).sum()
    dof = torch.tensor(len(exp) - 1.0, dtype=torch.float64)
    return float(torch.special.gammaincc(dof / 2, stat / 2))


def exact_distribution(model, prompt, sampling):
    """The autoregressive law of the first 3 new tokens, enumerated: (V, V, V) probs."""
    V = model.config.vocab_size
    pairs = torch.cartesian_prod(torch.arange(V), torch.arange(V))  # (V*V, 2): (t1, t2)
    seqs = torch.cat([torch.tensor(prompt).expand(V * V, -1), pairs], dim=1)
    probs = logits_to_probs(model(seqs).double(), *sampling)  # no cache: an independent path
    P = len(prompt)
    p1 = probs[0, P - 1]  # (V,)
    p2 = probs[::V, P].view(V, V)  # [t1, t2]
    p3 = probs[:, P + 1].view(V, V, V)  # [t1, t2, t3]
    return p1[:, None, None] * p2[:, :, None] * p3


def first_tokens_histogram(res, V):
    t = torch.tensor(res.tokens)  # (n, 3)
    return torch.bincount(t[:, 0] * V * V + t[:, 1] * V + t[:, 2], minlength=V ** 3).view(V, V, V)


def sampling_p_values(counts, law):
    """p-values of the joint (t1, t2) and of the t3 marginal (the drafted tokens)."""
    return (chi_square_p_value(counts.sum(2), law.sum(2)),
            chi_square_p_value(counts.sum((0, 1)), law.sum((0, 1))))


def sampled_speculative(model, prompts, n, E, k, sampling, seed):
    temperature, top_k, top_p = sampling
    return speculative(model, prompts, n, exit_layer=E, num_speculations=k,
                       temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)


def resample_from_p_on_rejection(drafts, draft_probs, logits, sampling, generator):
    """A plausible bug: after a rejection, sample from p instead of norm(max(0, p - q))."""
    m, _ = accept(drafts, draft_probs, logits, sampling, generator)
    p = logits_to_probs(logits, *sampling)[torch.arange(len(m)), m]
    return m, torch.multinomial(p, 1, generator=generator).squeeze(1)


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (3, 1.0), (0, 0.8)])
def test_sampling_is_lossless(generator, monkeypatch, top_k, top_p):
    V, n = 10, 6000
    model = random_llama(generator, n_layers=4, vocab=V, dim=32, hidden_dim=48, std=0.35)
    prompt = random_prompts(generator, (4,), V)[0]
    sampling = (1.0, top_k, top_p)
    law = exact_distribution(model, prompt, sampling)
    draft_law = logits_to_probs(model(torch.tensor([prompt]), exit_layer=1)[0, -1].double(),
                                *sampling)
    assert (draft_law - law.sum((1, 2))).abs().sum() / 2 > 0.2  # a weak draft: rejections
    seed = int(torch.randint(0, 2**31 - 1, (), generator=generator))
    kw = dict(temperature=1.0, top_k=top_k, top_p=top_p, seed=seed)
    spec = sampled_speculative(model, [prompt] * n, 3, 1, 3, sampling, seed)
    assert 0.2 < spec.stats["acceptance_rate"] < 0.9
    p_joint, p_third = sampling_p_values(first_tokens_histogram(spec, V), law)
    assert p_joint > 1e-3 and p_third > 1e-3, (p_joint, p_third)
    # The same samples from the plain sampler pass too (the statistic is calibrated) ...
    plain_run = autoregressive(model, [prompt] * n, 3, **kw)
    plain = sampling_p_values(first_tokens_histogram(plain_run, V), law)
    assert min(plain) > 1e-3, plain
    # ... and two wrong laws fail by far: the draft's own (early exit) sampling, and
    # self-speculation with a broken rejection rule.
    early = autoregressive(model, [prompt] * n, 3, strategy="early_exit", exit_layer=1, **kw)
    assert max(sampling_p_values(first_tokens_histogram(early, V), law)) < 1e-9
    monkeypatch.setattr(self_speculative, "accept", resample_from_p_on_rejection)
    broken = sampled_speculative(model, [prompt] * n, 3, 1, 3, sampling, seed)
    assert min(sampling_p_values(first_tokens_histogram(broken, V), law)) < 1e-9


def test_sampling_seed_is_deterministic(generator):
    model = random_llama(generator, n_layers=4)
    prompts = random_prompts(generator, (1, 7))
    kw = dict(exit_layer=2, num_speculations=3, temperature=0.9, top_k=20, seed=7)
    a, b = speculative(model, prompts, 17, **kw), speculative(model, prompts, 17, **kw)
    assert a.tokens == b.tokens and [len(t) for t in a.tokens] == [17, 17]


# ----------------------------------------------------------------------------- accept()


def one_hot_logits(argmaxes, generator, vocab=7):
    """Logits (B, S, vocab) with the given argmax per position and a clear margin."""
    argmaxes = torch.tensor(argmaxes)
    logits = torch.randn(*argmaxes.shape, vocab, generator=generator)
    return logits.scatter(-1, argmaxes[..., None], 10.0)


def test_accept_greedy_takes_the_longest_matching_prefix(generator):
    drafts = torch.tensor([[1, 2, 3, 4], [5, 2, 3, 4], [1, 2, 6, 4], [1, 2, 3, 5]])
    logits = one_hot_logits([[1, 2, 3, 4, 0], [6, 2, 3, 4, 0], [1, 2, 3, 4, 0],
                             [1, 2, 3, 4, 5]], generator)
    m, next_token = accept(drafts, None, logits, GREEDY, generator)
    assert m.tolist() == [4, 0, 2, 3]  # row 2: a later match after a miss does not count
    assert next_token.tolist() == [0, 6, 3, 4]  # all accepted: the bonus token at k


def test_accept_sampling_accepts_everything_when_p_equals_q(generator):
    B, k, V = 500, 3, 7
    logits = torch.randn(B, k + 1, V, generator=generator) * 2
    sampling = (0.8, 5, 0.9)
    q = logits_to_probs(logits[:, :k], *sampling)
    drafts = torch.multinomial(q.view(-1, V), 1, generator=generator).view(B, k)
    m, next_token = accept(drafts, q, logits, sampling, generator)
    assert (m == k).all()
    bonus = logits_to_probs(logits[:, k], *sampling)
    assert (bonus.gather(1, next_token[:, None]) > 0).all()  # from p at position k


def test_accept_sampling_rejects_a_draft_p_gives_no_mass(generator):
    B, V = 7000, 6
    # p = (0.4, 0.3, 0.3, 0, 0, 0) at both positions; q puts 0.7 on token 3, p's zero.
    logits = torch.tensor([0.4, 0.3, 0.3, 0, 0, 0]).log().expand(B, 2, V)
    q = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.0, 0.0]).expand(B, 2, V)
    drafts = torch.tensor([[3, 0]]).expand(B, 2)
    m, next_token = accept(drafts, q, logits, (1.0, 0, 1.0), generator)
    assert (m == 0).all()  # always rejected, whatever the second draft
    # The residual norm(max(0, p - q)) = (0.3, 0.2, 0.2, 0, 0, 0) / 0.7.
    freq = torch.bincount(next_token, minlength=V).double() / B
    residual = torch.tensor([3, 2, 2, 0, 0, 0], dtype=torch.float64) / 7
    assert (freq[3:] == 0).all()
    assert (freq - residual).abs().max() < 5 * (0.25 / B) ** 0.5  # 5 sigma


def test_accept_sampling_accepts_with_probability_p_over_q(generator):
    B, V = 8000, 4
    p = torch.tensor([0.1, 0.2, 0.3, 0.4])
    q = torch.tensor([0.4, 0.3, 0.2, 0.1])
    logits = p.log().expand(B, 2, V)
    drafts = torch.zeros(B, 1, dtype=torch.long)  # token 0: accepted with 0.1 / 0.4
    m, next_token = accept(drafts, q.expand(B, 1, V), logits, (1.0, 0, 1.0), generator)
    rate = m.double().mean()
    assert abs(rate - 0.25) < 5 * (0.25 * 0.75 / B) ** 0.5
    # Rejected rows draw from norm(max(0, p - q)) = (0, 0, 0.1, 0.3) / 0.4; accepted rows
    # draw the bonus from p.
    rejected = next_token[m == 0]
    assert set(rejected.tolist()) <= {2, 3}
    assert abs((rejected == 3).double().mean() - 0.75) < 5 * (0.1875 / len(rejected)) ** 0.5


# ------------------------------------------------------------------------- argument checks


@pytest.fixture
def no_work_model(generator, monkeypatch):
    """A model that fails loudly if generate touches it beyond reading its config."""
    model = random_llama(generator, n_layers=4, max_seq_len=32)

    def forbidden(*args, **kwargs):
        raise AssertionError("generate did work before checking its arguments")

    monkeypatch.setattr(model, "run_layers", forbidden)
    monkeypatch.setattr(model, "new_cache", forbidden)
    return model


@pytest.mark.parametrize("arg,kw", [
    ("exit_layer", {"exit_layer": 0}),
    ("exit_layer", {"exit_layer": 4}),
    ("exit_layer", {"exit_layer": -1}),
    ("exit_layer", {"exit_layer": 2.0}),
    ("num_speculations", {"num_speculations": 0}),
    ("num_speculations", {"num_speculations": "x"}),
    ("num_speculations", {"num_speculations": -3}),
    ("speedup", {"draft": "layer_skip", "speedup": 0.5, "exit_layer": None}),
    ("speedup", {"draft": "layer_skip", "exit_layer": None}),
    ("exit_layer", {"draft": "layer_skip", "speedup": 1.5}),  # not used by a layer-skip draft
    ("draft", {"draft": "nope"}),
    ("max_new_tokens", {"max_new_tokens": 17}),  # 10 + 17 + 5 + 1 > 32
    ("max_new_tokens", {"max_new_tokens": 14, "num_speculations": "auto"}),  # 10 + 14 + 9
    ("max_new_tokens", {"max_new_tokens": 0}),
])
def test_bad_arguments_raise_before_any_work(no_work_model, arg, kw):
    kw = {"exit_layer": 2, "num_speculations": 5, "max_new_tokens": 16, **kw}
    with pytest.raises(ValueError, match=arg):
        lsk.generate(no_work_model, [[1] * 10, [2]], strategy="self_speculative", **kw)


@pytest.mark.parametrize("kw", [
    {"exit_layer": 1}, {"exit_layer": 3},
    {"num_speculations": 1, "max_new_tokens": 20},  # 10 + 20 + 1 + 1 = 32: just fits
    {"num_speculations": "auto", "max_new_tokens": 13},  # 10 + 13 + 8 + 1 = 32
    {"draft": "layer_skip", "speedup": 1, "exit_layer": None},
    {"draft": "layer_skip", "speedup": 1.5, "exit_layer": None},
])
def test_good_arguments_control(generator, kw):
    model = random_llama(generator, n_layers=4, max_seq_len=32)
    kw = {"exit_layer": 2, "num_speculations": 5, "max_new_tokens": 16, **kw}
    prompts = [[1] * 10]  # batch 1: a ragged batch may trip test_rows_finishing_first's bug
    res = lsk.generate(model, prompts, strategy="self_speculative", eos_token_id=[], **kw)
    assert len(res.tokens[0]) == kw["max_new_tokens"]
    assert res.tokens == autoregressive(model, prompts, kw["max_new_tokens"]).tokens
