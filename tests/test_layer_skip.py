"""Unified layer skipping (decoding/layer_skip.py): which layers are kept, and generation with
strategy="layer_skip" against a hand-run loop over model.run_layers and a KVCache."""
import pytest
import torch
from random_weights import random_weights

import layerskip_kernels as lsk
from layerskip_kernels.decoding.layer_skip import kept_layers
from layerskip_kernels.model.llama import KVCache

VOCAB = 101  # odd on purpose


def random_llama(generator, n_layers=6, n_kv_heads=2, max_seq_len=128):
    """Weights N(0, 0.2): logits spread enough that greedy argmax has no near-ties."""
    config = lsk.LlamaConfig(vocab_size=VOCAB, dim=64, n_layers=n_layers, n_heads=4,
                             n_kv_heads=n_kv_heads, hidden_dim=96, max_seq_len=max_seq_len)
    return random_weights(lsk.Llama(config), generator, 0.2)


def random_prompts(generator, lengths):
    return [torch.randint(0, VOCAB, (n,), generator=generator).tolist() for n in lengths]


# ---------------------------------------------------------------------------- kept_layers


@pytest.mark.parametrize("n_layers,speedup,expected", [
    (4, 1, [0, 1, 2, 3]),
    (32, 1, list(range(32))),
    (8, 2, [0, 2, 5, 7]),
    (5, 1.5, [0, 2, 4]),  # round(5 / 1.5) = 3
    (6, 2, [0, 2, 5]),  # 2.5 rounds half to even
    (7, 1.2, [0, 1, 2, 4, 5, 6]),  # round(5.83) = 6: the middle layer goes
    (9, 3, [0, 4, 8]),
    (32, 4, [0, 4, 9, 13, 18, 22, 27, 31]),
    (2, 1, [0, 1]),
    (2, 50, [0, 1]),
    (5, 100, [0, 4]),  # a huge speedup still keeps the first and last layers
    (32, 1e9, [0, 31]),
])
def test_kept_layers_table(n_layers, speedup, expected):
    assert kept_layers(n_layers, speedup) == expected


@pytest.mark.parametrize("n_layers", [2, 3, 5, 8, 13, 32, 80])
@pytest.mark.parametrize("speedup", [1, 1.1, 4 / 3, 1.5, 2, 2.5, 3, 7, 1000])
def test_kept_layers_properties(n_layers, speedup):
    kept = kept_layers(n_layers, speedup)
    assert kept[0] == 0 and kept[-1] == n_layers - 1  # first and last always run
    assert kept == sorted(set(kept))  # sorted, no repeats
    assert len(kept) == min(n_layers, max(2, round(n_layers / speedup)))  # about L / speedup
    gaps = [b - a for a, b in zip(kept, kept[1:])]
    assert max(gaps) - min(gaps) <= 1  # the skipped layers are spread evenly
    if speedup == 1:
        assert kept == list(range(n_layers))


@pytest.mark.parametrize("speedup", [1, 2, 1000])
def test_kept_layers_of_a_one_layer_model(generator, speedup):
    assert kept_layers(1, speedup) == [0]
    model = random_llama(generator, n_layers=1)
    res = lsk.generate(model, [[1, 2, 3]], 5, strategy="layer_skip", speedup=speedup,
                       eos_token_id=[])
    assert res.tokens == lsk.generate(model, [[1, 2, 3]], 5, eos_token_id=[]).tokens


# ---------------------------------------------------------------------------- generation


def hand_run(model, prompt, max_new_tokens, layers):
    """Greedy: prefill the prompt with every layer, then decode with `layers` only."""
    cache = KVCache(model.config, 1, len(prompt) + max_new_tokens,
                                    torch.float32, "cpu")
    seqlens = torch.zeros(1, dtype=torch.int32)
    step = model.step(cache, seqlens, len(prompt))
    h = model.run_layers(model.embed_tokens(torch.tensor([prompt])), range(model.config.n_layers),
                         step, cache)
    seqlens += len(prompt)
    out = [int(model.head(h)[0, -1].argmax())]
    while len(out) < max_new_tokens:
        step = model.step(cache, seqlens, 1)
        h = model.run_layers(model.embed_tokens(torch.tensor([[out[-1]]])), layers, step, cache)
        seqlens += 1
        out.append(int(model.head(h)[0, -1].argmax()))
    return out


@pytest.mark.parametrize("n_layers,speedup", [(6, 1.5), (6, 2), (5, 3), (4, 1)])
def test_layer_skip_equals_hand_run(generator, n_layers, speedup):
    model = random_llama(generator, n_layers)
    prompts = random_prompts(generator, (1, 3, 7, 12))
    layers = kept_layers(n_layers, speedup)
    res = lsk.generate(model, prompts, 21, strategy="layer_skip", speedup=speedup,
                       eos_token_id=[])
    with torch.inference_mode():
        expected = [hand_run(model, p, 21, layers) for p in prompts]
    assert res.tokens == expected
    full = lsk.generate(model, prompts, 21, eos_token_id=[]).tokens
    if speedup == 1:
        assert res.tokens == full
    else:  # skipping layers changes the output: the hand run is not plain greedy in disguise
        assert res.tokens != full
        assert [r[0] for r in res.tokens] == [f[0] for f in full]  # the prompt ran every layer


@pytest.mark.parametrize("speedup", [0.5, 0.999, 0, -2, None, "2"])
def test_speedup_below_one_errors(generator, speedup):
    model = random_llama(generator, 4)
    for kw in ({"strategy": "layer_skip"},
               {"strategy": "self_speculative", "draft": "layer_skip", "num_speculations": 2}):
        with pytest.raises(ValueError, match="speedup"):
            lsk.generate(model, [[1, 2]], 4, speedup=speedup, **kw)


@pytest.mark.parametrize("speedup", [1, 1.0, 2, 100])
def test_speedup_control(generator, speedup):
    model = random_llama(generator, 4)
    for kw in ({"strategy": "layer_skip"},
               {"strategy": "self_speculative", "draft": "layer_skip", "num_speculations": 2}):
        res = lsk.generate(model, [[1, 2]], 4, speedup=speedup, eos_token_id=[], **kw)
        assert len(res.tokens[0]) == 4


@pytest.mark.parametrize("lengths", [(1, 3, 7, 12), (12, 1), (5, 5, 2)])
def test_ragged_batch_equals_each_prompt_alone(generator, lengths):
    model = random_llama(generator, 6, n_kv_heads=1)
    prompts = random_prompts(generator, lengths)
    kw = dict(max_new_tokens=17, strategy="layer_skip", speedup=2, eos_token_id=[])
    batch = lsk.generate(model, prompts, **kw).tokens
    assert [len(t) for t in batch] == [17] * len(prompts)
    assert batch == [lsk.generate(model, [p], **kw).tokens[0] for p in prompts]
