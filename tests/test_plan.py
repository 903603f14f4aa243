"""The plan of a generate() call (decoding/plan.py): every default resolved from the arguments
and the model's config, before any work; the policy it makes; the drafting it names in stats;
and the CLI's draft slots, which come from the same resolution."""
import dataclasses
import importlib

import pytest
import torch

import layerskip_kernels as lsk
from layerskip_kernels import cli_checks
from layerskip_kernels.decoding import plan as plan_module
from layerskip_kernels.decoding.layer_skip import kept_layers
from layerskip_kernels.decoding.plan import plan_generation
from layerskip_kernels.decoding.policy import AdaptivePolicy, FixedPolicy
from layerskip_kernels.decoding.self_speculative import ExitDraft, SkipDraft

generate_module = importlib.import_module("layerskip_kernels.decoding.generate")
VOCAB = 61
PROMPTS = [[1, 2, 3], [4, 5]]


def config(n_layers=8, **recommendation):
    return lsk.LlamaConfig(vocab_size=VOCAB, dim=32, n_layers=n_layers, n_heads=4, n_kv_heads=2,
                           hidden_dim=48, max_seq_len=64, eos_token_id=[7], **recommendation)


RECOMMENDS = config(exit_layer=3, num_speculations=3)  # a model trained for early exit
PLAIN = config()  # a model that recommends nothing


def plan(c, **kw):
    return plan_generation(c, kw.pop("prompts", PROMPTS), **{"max_new_tokens": 8, **kw})


SS = dict(strategy="self_speculative")


# ---------------------------------------------------------------------- the resolved fields

@pytest.mark.parametrize("c, kw, fields", [
    # self_speculative: the config's recommendation, else a quarter of the depth and k = 4
    (RECOMMENDS, SS, dict(draft="early_exit", exit_layer=3, num_speculations=3, ks=(3,),
                          confidence=None, reserve=4, defaulted=(), exits=None)),
    (PLAIN, SS, dict(exit_layer=2, num_speculations=4, ks=(4,), reserve=5,
                     defaulted=("num_speculations", "exit_layer"))),
    (PLAIN, {**SS, "exit_layer": 5}, dict(exit_layer=5, defaulted=("num_speculations",))),
    # k="auto": drafts of at most 8, stopped when unsure
    (RECOMMENDS, {**SS, "num_speculations": "auto"},
     dict(exit_layer=3, num_speculations=8, ks=(8,), confidence=0.5, reserve=9)),
    # exit_layer="auto": the policy's exits, and its ks unless k is given
    (RECOMMENDS, {**SS, "exit_layer": "auto"},
     dict(exit_layer="auto", ks=(1, 2, 3, 4, 6), num_speculations=6, reserve=7,
          exits=(2, 3, 4), recommended=(3, 3), defaulted=())),
    (PLAIN, {**SS, "exit_layer": "auto"},
     dict(exit_layer="auto", ks=(1, 2, 3, 4, 6), exits=(2, 4, 6, 7), recommended=None,
          defaulted=())),
    (RECOMMENDS, {**SS, "exit_layer": "auto", "num_speculations": 2},
     dict(ks=(2,), num_speculations=2, reserve=3, recommended=(3, 2))),  # k=3 not allowed
    (config(exit_layer=3, num_speculations=12), {**SS, "exit_layer": "auto"},
     dict(ks=(1, 2, 3, 4, 6), recommended=(3, 6))),  # a recommended k past the cap of 8
    (RECOMMENDS, {**SS, "exit_layer": "auto", "num_speculations": "auto"},
     dict(ks=(8,), confidence=0.5, recommended=(3, 8))),
    # a layer-skip draft: no exit layer, the kept layers draft
    (RECOMMENDS, {**SS, "draft": "layer_skip", "speedup": 2},
     dict(draft="layer_skip", exit_layer=None, speedup=2.0, kept=tuple(kept_layers(8, 2)),
          num_speculations=3, reserve=4)),
    # plain strategies: no draft, no slots; the layers a step runs
    (RECOMMENDS, dict(strategy="early_exit"),
     dict(draft=None, exit_layer=3, num_speculations=None, ks=None, reserve=0,
          prefill_layers=range(3), decode_layers=range(3), defaulted=())),
    (PLAIN, dict(strategy="layer_skip", speedup=2),
     dict(exit_layer=None, kept=tuple(kept_layers(8, 2)), prefill_layers=range(8),
          decode_layers=tuple(kept_layers(8, 2)), reserve=0)),
    (RECOMMENDS, {}, dict(strategy="autoregressive", draft=None, exit_layer=None,
                          prefill_layers=range(8), decode_layers=range(8), reserve=0,
                          stop_ids={7}, stop=None, sampling=(0.0, 0, 1.0), seed=None,
                          cuda_graphs=None, prompts=PROMPTS, max_new_tokens=8)),
])
def test_plan_fields(c, kw, fields):
    got = plan(c, **kw)
    assert {name: getattr(got, name) for name in fields} == fields


def test_plan_of_tensors_sampling_and_stops():
    got = plan(RECOMMENDS, prompts=torch.tensor([[0, 1, 2], [3, 4, 5]]),
               attention_mask=torch.tensor([[0, 1, 1], [1, 1, 1]]), temperature=0.7, top_k=5,
               top_p=0.9, seed=11, eos_token_id=[1, 2], cuda_graphs=False)
    assert got.prompts == [[1, 2], [3, 4, 5]]
    assert (got.sampling, got.seed, got.stop_ids, got.cuda_graphs) == (
        (0.7, 5, 0.9), 11, {1, 2}, False)


def test_a_model_without_a_recommendation_needs_an_exit_layer_for_early_exit():
    with pytest.raises(ValueError, match="^exit_layer: expected an integer in"):
        plan(PLAIN, strategy="early_exit")
    assert plan(PLAIN, strategy="early_exit", exit_layer=5).prefill_layers == range(5)


def test_plans_are_frozen():
    got = plan(RECOMMENDS, **SS)
    for name, value in (("exit_layer", 5), ("num_speculations", 1), ("prompts", [[1]])):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(got, name, value)
    assert got.exit_layer == 3


# --------------------------------------------------------------------- the policy and stats

def test_the_plan_makes_the_calls_policy():
    model = lsk.Llama(RECOMMENDS)
    fixed = plan(RECOMMENDS, **SS).policy(model, 1)
    assert isinstance(fixed, FixedPolicy) and fixed.k == 3
    assert isinstance(fixed.drafter, ExitDraft) and fixed.drafter.exit_layer == 3
    skip = plan(RECOMMENDS, **SS, draft="layer_skip", speedup=2).policy(model, 1)
    assert isinstance(skip.drafter, SkipDraft) and skip.drafter.key == (
        "skip", tuple(kept_layers(8, 2)))
    adaptive = plan(RECOMMENDS, **SS, exit_layer="auto").policy(model, 1)
    assert isinstance(adaptive, AdaptivePolicy)
    assert (adaptive.exits, adaptive.ks, adaptive.recommended) == ([2, 3, 4], [1, 2, 3, 4, 6],
                                                                   (3, 3))
    drafter, k, shadow = adaptive.choose()  # the recommendation first, no shadows yet
    assert (drafter.exit_layer, k, shadow) == (3, 3, ())


@pytest.mark.parametrize("kw, reported", [
    (SS, {"exit_layer": 2, "num_speculations": 4,
          "defaulted": ["num_speculations", "exit_layer"]}),
    ({**SS, "num_speculations": "auto", "exit_layer": 1},
     {"exit_layer": 1, "num_speculations": "auto", "defaulted": []}),
    ({**SS, "exit_layer": "auto"},
     {"exit_layer": "auto", "num_speculations": "per round", "defaulted": []}),
    ({**SS, "exit_layer": "auto", "num_speculations": 2},
     {"exit_layer": "auto", "num_speculations": 2, "defaulted": []}),
    ({**SS, "draft": "layer_skip", "speedup": 2},
     {"exit_layer": None, "num_speculations": 4, "defaulted": ["num_speculations"]}),
    (dict(strategy="early_exit", exit_layer=2), {}),
])
def test_generate_reports_the_plans_drafting(generator, kw, reported):
    model = lsk.Llama(PLAIN)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=generator))
    assert plan(PLAIN, **kw).stats() == reported
    stats = lsk.generate(model, PROMPTS, max_new_tokens=8, **kw).stats
    assert {name: stats[name] for name in reported} == reported
    assert ("defaulted" in stats) == (kw.get("strategy") == "self_speculative")


# --------------------------------------------------------------------- before any work

LATE_ERRORS = [  # each resolved after the prompts are read: still before any work
    (dict(SS, num_speculations=0), "num_speculations"),
    (dict(SS, exit_layer=8), "exit_layer"),
    (dict(SS, exit_layer="auto", num_speculations="many"), "num_speculations"),
    (dict(strategy="early_exit", exit_layer="auto"), "exit_layer"),
    (dict(strategy="layer_skip", speedup=0.5), "speedup"),
    (dict(SS, max_new_tokens=57), "max_new_tokens"),  # 3 + 57 + 5 draft slots > 64
    (dict(prompts=[[1], [VOCAB]]), r"prompts\[1\]"),
]


@pytest.mark.parametrize("bad, match", LATE_ERRORS)
def test_an_invalid_argument_raises_before_any_work(monkeypatch, bad, match):
    model = lsk.Llama(PLAIN)
    reached = []

    def work(*args, **kwargs):
        reached.append(True)
        raise AssertionError("generate did work before its plan was complete")

    monkeypatch.setattr(generate_module, "held_state", work)
    monkeypatch.setattr(generate_module, "_generator", work)
    monkeypatch.setattr(model, "forward", work)
    with pytest.raises(AssertionError):  # control: valid arguments reach the work
        lsk.generate(model, PROMPTS, max_new_tokens=8, strategy="self_speculative")
    reached.clear()
    kw = {"max_new_tokens": 8, **bad}
    with pytest.raises(ValueError, match=f"^{match}: expected"):
        lsk.generate(model, kw.pop("prompts", PROMPTS), **kw)
    assert not reached


@pytest.mark.parametrize("first, then", [
    (dict(strategy="fast"), dict(temperature=-1)),
    (dict(draft="big"), dict(max_new_tokens=0)),
    (dict(temperature=-1), dict(strategy="early_exit", num_speculations=2)),
    (dict(max_new_tokens=0), dict(stream=5)),
    (dict(stream=5), dict(prompts=[])),
    (dict(prompts=[]), dict(eos_token_id=-1)),
    (dict(eos_token_id=-1), dict(strategy="self_speculative", num_speculations=0)),
    (dict(strategy="self_speculative", num_speculations=0), dict(exit_layer=9)),
    (dict(strategy="early_exit", exit_layer=9), dict(prompts=[[VOCAB]])),
])
def test_the_first_invalid_argument_is_the_one_named(first, then):
    arg = next(iter(first.keys() - {"strategy"} or first))
    with pytest.raises(ValueError, match=f"^{arg}: "):
        plan(PLAIN, **{**then, **first})
    with pytest.raises(ValueError, match=f"^{next(iter(then.keys() - {'strategy'} or then))}"):
        plan(PLAIN, **then)  # control: the later one alone is an error too


# ------------------------------------------------------------------------- the CLI

@pytest.mark.parametrize("c", [RECOMMENDS, PLAIN], ids=["recommends", "plain"])
@pytest.mark.parametrize("strategy, exit_layer, k", [
    ("self_speculative", None, None), ("self_speculative", None, 2),
    ("self_speculative", None, "auto"), ("self_speculative", "auto", None),
    ("self_speculative", "auto", 5), ("early_exit", 2, None), ("autoregressive", None, None)])
def test_cli_draft_slots_are_the_plans(c, strategy, exit_layer, k):
    got = plan(c, strategy=strategy, exit_layer=exit_layer, num_speculations=k)
    assert cli_checks.draft_slots(lsk.Llama(c), strategy, k, exit_layer) == got.reserve
