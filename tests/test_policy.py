"""Self-speculation that asks a policy each round (decoding/policy.py): exit_layer="auto" is
greedy-exact (random and trained models, ragged batches, stop tokens inside accepted drafts),
a change of drafter between rounds keeps sampling lossless, the adaptive policy falls back
to autoregressive steps when no draft pays and keeps drafting when one does (fed fake
timings: no timing assertion), and it decides from Python numbers the round already synced,
adding no device-to-host transfer."""
import pytest
import torch
from test_shadow import damped, default_model_auto
from test_self_speculative import (VOCAB, autoregressive, exact_distribution,
                                   first_tokens_histogram, random_llama, random_prompts,
                                   sampling_p_values, speculative)

import layerskip_kernels as lsk
from layerskip_kernels.cli import draft_note
from layerskip_kernels.decoding import plan as plan_module
from layerskip_kernels.decoding.estimates import (MEMORY, candidate_exits, candidate_ks,
                                                  without_memory)
from layerskip_kernels.decoding.policy import (LONGEST_STINT, POLICY_SHARE, PROBE_STINT,
                                               SHADOW_STINT, STINT, AdaptivePolicy)


# ------------------------------------------------------------------------- greedy exactness


@pytest.mark.parametrize("num_speculations", [None, 2, "auto"])
@pytest.mark.parametrize("n_layers,lengths", [(4, (1, 3, 7, 12)), (6, (12, 1)), (5, (7,))])
def test_auto_exit_equals_autoregressive(generator, n_layers, lengths, num_speculations):
    """Upper layers damped, so that deep exits' drafts pay and the policy drafts."""
    model = damped(random_llama(generator, n_layers), range(n_layers // 2, n_layers), 0.3)
    prompts = random_prompts(generator, lengths)
    expected = autoregressive(model, prompts, 50).tokens
    res = speculative(model, prompts, 50, exit_layer="auto", num_speculations=num_speculations)
    assert res.tokens == expected
    s = res.stats
    assert s["exit_layer"] == "auto" and sum(s["choices"].values()) == s["rounds"]
    assert sum(n for _, n in s["stints"]) == s["rounds"]
    assert s["fallback_rounds"] == s["choices"].get("autoregressive", 0) >= 1  # its start
    # Drafts were made (rejections and their rollback: the scripted test below, as the
    # drafts a timed policy makes here depend on the machine's timings).
    assert s["drafted"] >= s["accepted"] and s["drafted"] > 0
    assert s["policy_s"] >= 0


def test_auto_exit_equals_autoregressive_with_every_drafter_change(generator, monkeypatch):
    """Each round drafts from another exit with another k, or takes a plain step: the KV
    a round leaves serves the next whatever its drafter (ragged batch, stop tokens inside
    accepted drafts)."""
    model = random_llama(generator, n_layers=5)
    prompts = random_prompts(generator, (1, 3, 7, 12))
    free = autoregressive(model, prompts, 40).tokens
    stop = next(t for t in range(VOCAB) if all(0 < row.index(t) < 39 for row in free[1:]
                                                if t in row) and sum(t in r for r in free) >= 2)
    expected = [row[:row.index(stop) + 1] if stop in row else row for row in free]
    monkeypatch.setattr(plan_module, "AdaptivePolicy", Scripted)
    res = speculative(model, prompts, 40, exit_layer="auto", eos_token_id=stop)
    assert res.tokens == expected
    assert any(len(row) < 40 for row in res.tokens)
    assert len(res.stats["choices"]) == len(set(Scripted.SCRIPT))
    assert 0 < res.stats["accepted"] < res.stats["drafted"]  # some drafts rejected


class Scripted:
    """A policy that cycles through exits 1-4, k 1-6 and plain steps, round by round (SCRIPT:
    None, or (exit, k) or (exit, k, shadow exits))."""
    SCRIPT = [(4, 6), None, (1, 1), (2, 3), (3, 2), None, (4, 1), (1, 4)]

    def __init__(self, make_drafter, *args, **kwargs):
        self.make_drafter, self.round, self.counts = make_drafter, 0, {}

    def choose(self):
        option = self.SCRIPT[self.round % len(self.SCRIPT)]
        self.round += 1
        self.counts[option] = self.counts.get(option, 0) + 1
        if option is None:
            return None, None, ()
        e, k, *shadow = option
        return self.make_drafter(e), k, (shadow or [()])[0]

    def learned(self):  # nothing for the next call
        return None

    def rounds_left(self):  # one round per choice
        return 0

    def record_steps(self, steps, seconds):
        pass

    def record(self, accepted, seconds, made=None, shadow=None):
        pass

    def stats(self):
        return {"choices": self.counts, "fallback_rounds": self.counts.get(None, 0)}


def test_default_model_auto_exit_equals_autoregressive():
    model, res = default_model_auto(48)
    # It starts at the model's recommendation (a trained exit: most drafts accepted).
    c = model.config
    assert res.stats["choices"][f"E{c.exit_layer} k{c.num_speculations}"] >= STINT // 2
    assert res.stats["acceptance_rate"] > 0.5


# ------------------------------------------------------------------------------- sampling


def test_sampling_stays_lossless_when_the_drafter_changes(generator, monkeypatch):
    V, n = 10, 6000
    model = random_llama(generator, n_layers=4, vocab=V, dim=32, hidden_dim=48, std=0.35)
    prompt = random_prompts(generator, (4,), V)[0]
    sampling = (1.0, 0, 1.0)
    law = exact_distribution(model, prompt, sampling)
    monkeypatch.setattr(Scripted, "SCRIPT", [(1, 1), (3, 1), None])
    monkeypatch.setattr(plan_module, "AdaptivePolicy", Scripted)
    res = speculative(model, [prompt] * n, 3, exit_layer="auto", num_speculations=1,
                      temperature=1.0, seed=int(torch.randint(0, 2**31, (), generator=generator)))
    assert 0.2 < res.stats["acceptance_rate"] < 0.9
    p_joint, p_third = sampling_p_values(first_tokens_histogram(res, V), law)
    assert p_joint > 1e-3 and p_third > 1e-3, (p_joint, p_third)


# ----------------------------------------------------------------- the adaptive policy's choices


def drive(policy, rounds, accept, seconds):
    """Run the policy for `rounds` rounds of 2 rows: accept(E, k) the drafts each row's round
    accepts, seconds(option) the round's fake time; a shadowed exit s agrees at every
    position the round checks where accept(s, 1) is 1, else at none. Returns the options
    chosen in order."""
    chosen = []
    for _ in range(rounds):
        drafter, k, shadow = policy.choose()
        option = None if drafter is None else (drafter, k)
        chosen.append(option)
        m = 0 if option is None else accept(*option)
        agreement = {s: (2 * (m + 1), 0) if accept(s, 1) else (0, 2 * (m + 1)) for s in shadow}
        policy.record([m, m], seconds(option), k or 0, agreement or None)
    return chosen


def round_seconds(option, n_layers=5):
    """A small model's cost on a CPU: 0.8 ms a round whatever its work (a call, the sync,
    Python), plus 0.05 ms per layer or head on one position, 0.012 ms per further verified
    position."""
    if option is None:
        return 8e-4 + 5e-5 * (n_layers + 1)
    e, k = option
    return 8e-4 + 5e-5 * ((k + 1) * e + k + n_layers - e + 1) + 1.2e-5 * k * (n_layers - e + 1)


@pytest.mark.parametrize("shadow", [True, False])
def test_falls_back_to_autoregressive_steps_when_no_draft_is_accepted(shadow):
    """Where rounds shadow, the exits are seen never to agree, so none is ever drafted
    from; where they cannot (sampling, a confidence stop), short probes at k = 1."""
    exits = candidate_exits(8, None)
    policy = AdaptivePolicy(lambda e: e, 8, exits, candidate_ks(None, 8), shadow=shadow)
    chosen = drive(policy, 400, accept=lambda e, k: 0,
                   seconds=lambda option: round_seconds(option, 8))
    drafted = sum(option is not None for option in chosen)
    assert chosen[-STINT:] == [None] * STINT
    assert drafted == 0 if shadow else 0 < drafted <= 40
    assert all(option[1] == 1 for option in chosen if option is not None)
    stats = policy.stats()
    assert stats["fallback_rounds"] == 400 - drafted
    assert stats["shadow_rounds"] == (SHADOW_STINT if shadow else 0)
    assert all(a < 0.25 for a in stats["exit_acceptance"].values())  # prior 1:3, misses
    assert set(stats["exit_acceptance"]) == set(exits if shadow else stats["exit_acceptance"])


def test_shadows_find_a_better_exit_than_the_recommendation():
    """The recommended exit 3 accepts two drafts at most, its neighbour 4 every draft: a
    shadow stint sees exit 4 without drafting from it, a short stint times it, and the
    policy moves there, to longer drafts than recommended (its neighbouring k timed)."""
    policy = AdaptivePolicy(lambda e: e, 12, candidate_exits(12, 3), candidate_ks(3, 8),
                            recommended=(3, 3))
    chosen = drive(policy, 300, accept=lambda e, k: min(k, 2) if e == 3 else k if e == 4 else 0,
                   seconds=lambda option: round_seconds(option, 12))
    assert chosen[:STINT] == [(3, 3)] * STINT
    assert policy.stats()["shadow_rounds"] == SHADOW_STINT
    late = chosen[100:]
    assert all(option is not None and option[0] == 4 for option in late)
    assert min(option[1] for option in late) > 3
    assert not any(option[0] == 2 for option in chosen if option is not None)


def test_keeps_drafting_where_a_draft_pays():
    """Exit 4 is always accepted, shallower ones never: the policy finds exit 4 (seen in
    the plain steps' shadow stint, then timed) and drafts long rounds from it."""
    policy = AdaptivePolicy(lambda e: e, 5, candidate_exits(5, None), candidate_ks(None, 8))
    chosen = drive(policy, 300, accept=lambda e, k: k if e == 4 else 0,
                   seconds=round_seconds)
    late = chosen[100:]
    assert sum(option is not None and option[0] == 4 for option in late) >= 0.9 * len(late)
    assert max(option[1] for option in late if option is not None) >= 4


def test_starts_at_the_recommendation():
    policy = AdaptivePolicy(lambda e: e, 12, candidate_exits(12, 3), candidate_ks(3, 8),
                            recommended=(3, 3))
    chosen = drive(policy, STINT, accept=lambda e, k: k,
                   seconds=lambda option: round_seconds(option, 12))
    assert chosen == [(3, 3)] * STINT


def test_stints_grow_until_the_policy_costs_a_small_share():
    """A decision of 50 us against 0.1 ms rounds: stints of 100 rounds keep the policy at
    POLICY_SHARE (0.5%) of the time; never past LONGEST_STINT; the doubling stint where the
    option's cost is unknown or the decisions are cheap."""
    policy = AdaptivePolicy(lambda e: e, 5, [4], [1])
    policy.exploit_stint = STINT
    assert policy._stint(None) == STINT  # not timed
    policy.cost[None], policy.decisions, policy.overhead_s = 1e-4, 4, 4 * 5e-5
    assert policy._stint(None) == round(5e-5 / (POLICY_SHARE * 1e-4)) == 100
    policy.overhead_s = 4.0
    assert policy._stint(None) == LONGEST_STINT
    policy.overhead_s = 4e-9
    assert policy._stint(None) == STINT


def test_a_round_that_captured_a_graph_is_not_timed():
    policy = AdaptivePolicy(lambda e: e, 5, [4], [1])
    drive(policy, STINT, accept=lambda e, k: 0, seconds=lambda option: None)
    assert policy.cost == {}


def test_a_call_starts_from_what_the_last_call_of_its_shape_learned(generator):
    """The model's second call with as many prompts recalls the first's statistics: it
    starts with a whole stint of the option the first ended on (not the first's shadow stint
    and short timed stint), with autoregressive decoding's tokens; a call of another batch
    size does not recall."""
    model = damped(random_llama(generator, 5), range(2, 5), 0.3)
    prompts = random_prompts(generator, (3, 9))
    expected = autoregressive(model, prompts, 60).tokens
    first = speculative(model, prompts, 60, exit_layer="auto")
    second = speculative(model, prompts, 60, exit_layer="auto")
    assert first.tokens == second.tokens == expected
    assert not first.stats["recalled"] and second.stats["recalled"]
    assert first.stats["stints"][0] == ("autoregressive", SHADOW_STINT + PROBE_STINT)
    assert first.stats["shadow_rounds"] == SHADOW_STINT
    name, rounds = second.stats["stints"][0]
    assert name == first.stats["stints"][-1][0] and rounds >= STINT
    assert not speculative(model, prompts[:1], 60, exit_layer="auto").stats["recalled"]
    with without_memory(model):  # a first call's exploration, for a benchmark
        assert not speculative(model, prompts, 60, exit_layer="auto").stats["recalled"]
    assert speculative(model, prompts, 60, exit_layer="auto").stats["recalled"]  # kept


def test_what_a_call_learned_is_scaled_to_memory():
    policy = AdaptivePolicy(lambda e: e, 5, [2, 4], [1, 2])
    policy.hits[4], policy.misses[4], policy.hits[2], policy.misses[2] = 900, 100, 3, 5
    policy.cost[(4, 2)] = 1e-3
    learned = policy.learned()
    assert learned["hits"][4] + learned["misses"][4] == MEMORY
    assert learned["hits"][4] / MEMORY == 0.9  # the acceptance kept
    assert (learned["hits"][2], learned["misses"][2]) == (3, 5)  # fewer: as they were
    again = AdaptivePolicy(lambda e: e, 5, [2, 4], [1, 2], learned=learned)
    assert again.recalled and again.cost == {(4, 2): 1e-3}
    assert again.alpha(4) == policy.alpha(4) or abs(again.alpha(4) - policy.alpha(4)) < 0.01


# ------------------------------------------------------------------------ replayed rounds


def test_replayed_rounds_equal_autoregressive_and_bound_the_captures(generator, monkeypatch):
    """With CUDA graphs (the CPU stand-in of test_decode_state): every (bucket, k, exit)
    round and the plain step are captured once and replayed, the tokens stay exact, and
    the captured variants are at most buckets x (exits x ks + 1), twice (each also with its
    shadow exits, in a shadow stint). Upper layers damped, so that the policy drafts."""
    from test_decode_state import Capture
    from test_decode_state import random_llama as graph_llama
    capture = Capture(monkeypatch)
    model = damped(graph_llama(generator), range(2, 4), 0.3)
    prompts = random_prompts(generator, (5, 17, 9), vocab=61)
    expected = autoregressive(model, prompts, 40).tokens
    res = speculative(model, prompts, 40, exit_layer="auto")
    assert res.tokens == expected and res.stats["cuda_graphs"]
    rounds = [key for key in capture.keys if key[0] == "round"]
    assert rounds and len(set(capture.keys)) == len(capture.keys)  # each captured once
    exits, ks = candidate_exits(4, None), candidate_ks(None, 8)
    assert {key[3] for key in rounds} <= {("exit", e) for e in exits}
    assert {key[2] for key in rounds} <= set(ks)
    buckets = {key[1] for key in capture.keys}
    assert len(capture.keys) <= 2 * len(buckets) * (len(exits) * len(ks) + 1)


# -------------------------------------------------------------------- no extra host sync


def test_decisions_use_only_the_rounds_sync(generator, monkeypatch):
    """The policy gets Python numbers only, and the decode loop makes one host transfer a
    round (tolist of the round's emitted tokens, the shadow tokens included): no .item() and
    no extra tolist."""
    model = random_llama(generator, n_layers=4)
    prompts = random_prompts(generator, (1, 3, 7, 12))
    records = []
    record = AdaptivePolicy.record

    def checked_record(self, accepted, seconds, made=None, shadow=None):
        records.append((accepted, seconds, made, shadow))
        return record(self, accepted, seconds, made, shadow)

    record_steps, steps = AdaptivePolicy.record_steps, []

    def checked_steps(self, n, seconds):
        steps.append((n, seconds))
        return record_steps(self, n, seconds)

    monkeypatch.setattr(AdaptivePolicy, "record", checked_record)
    monkeypatch.setattr(AdaptivePolicy, "record_steps", checked_steps)
    calls = {"tolist": 0, "item": 0}
    for name in calls:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original):
            calls[_name] += 1
            return _original(self, *args)
        monkeypatch.setattr(torch.Tensor, name, counted)
    res = speculative(model, prompts, 40, exit_layer="auto")
    assert len(records) + sum(n for n, _ in steps) == res.stats["rounds"]
    assert all(type(n) is int and (s is None or type(s) is float) for n, s in steps)
    for accepted, seconds, made, shadow in records:
        assert all(type(m) is int for m in accepted) and type(made) is int
        assert seconds is None or type(seconds) is float
        assert all(type(n) is int for counts in (shadow or {}).values() for n in counts)
    assert res.stats["shadow_rounds"] == sum(r[3] is not None for r in records) >= 2
    assert calls == {"tolist": res.stats["rounds"] + 1, "item": 0}  # + the prefill's token


# ------------------------------------------------------------------- arguments and the CLI


def test_auto_exit_layer_is_only_self_speculative(generator):
    model = random_llama(generator, n_layers=4)
    with pytest.raises(ValueError, match="exit_layer"):
        lsk.generate(model, [[1, 2]], 4, strategy="early_exit", exit_layer="auto")


def test_cli_notes_drafts_that_are_never_accepted():
    fixed = {"strategy": "self_speculative", "exit_layer": 1, "drafted": 40,
             "acceptance_rate": 0.0}
    assert "not LayerSkip-trained for exit layer 1" in draft_note(fixed)
    assert draft_note({**fixed, "acceptance_rate": 0.4}) is None
    fell_back = {"strategy": "self_speculative", "exit_layer": "auto", "rounds": 100,
                 "fallback_rounds": 90, "exit_acceptance": {4: 0.05}}
    assert "fell back to autoregressive steps in 90 of 100 rounds" in draft_note(fell_back)
    assert draft_note({**fell_back, "fallback_rounds": 10}) is None


def test_cli_compare_and_generate_take_exit_layer_auto(capsys, stories_path,
                                                        stories_tokenizer_path):
    from layerskip_kernels.cli import main
    model = ["--model", str(stories_path), "--tokenizer", str(stories_tokenizer_path)]
    main(["compare", *model, "--exit-layer", "auto", "--max-new-tokens", "24", "--repeats",
          "1", "--warmup", "0", "--quiet"])
    out = capsys.readouterr().out
    assert "identical outputs: yes" in out and "exit layer auto, k per round" in out
    assert "per round: " in out and "autoregressive x" in out  # its probe at least
    main(["generate", *model, "--strategy", "self_speculative", "--exit-layer", "auto",
          "--prompt", "Once", "--max-new-tokens", "8"])
    assert "per round: " in capsys.readouterr().err
