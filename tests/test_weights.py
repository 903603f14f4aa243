"""The weight contract (model/weights.py) against transformers' Llama, the config key table
(checkpoint.CONFIG_KEYS) against transformers' LlamaConfig and modelling, and the fused paths'
requirements: a module a fused kernel would not compute exactly (a bias, a hook, a subclass)
keeps the model on its modules, never dropped."""
import pytest
import torch
from torch import nn

import layerskip_kernels as lsk
from layerskip_kernels.model.checkpoint import CONFIG_KEYS, hf_state_dict
from layerskip_kernels.model.weights import FUSED, LAYER_WEIGHTS, checkpoint_shapes

transformers = pytest.importorskip("transformers")

VOCAB, DIM, HEADS = 61, 32, 4


def hf_config(**update):
    return transformers.LlamaConfig(**dict(
        dict(vocab_size=VOCAB, hidden_size=DIM, intermediate_size=40, num_hidden_layers=2,
             num_attention_heads=HEADS, num_key_value_heads=2, max_position_embeddings=64,
             attn_implementation="eager"), **update))


def hf_llama(generator, **update):
    model = transformers.LlamaForCausalLM(hf_config(**update)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1.0 if "norm" in name else 0.0) + 0.2 * torch.randn(p.shape,
                                                                       generator=generator))
    return model


# ---------------------------------------------------------------- the contract


@pytest.mark.parametrize("tied", [True, False])
def test_contract_is_transformers_checkpoint(generator, tied):
    """checkpoint_shapes names and sizes every tensor of a transformers Llama checkpoint;
    hf_state_dict gives exactly those tensors back from our fused parameters."""
    hf = hf_llama(generator, tie_word_embeddings=tied, head_dim=16)
    expected = {k.removeprefix("model."): tuple(v.shape) for k, v in hf.state_dict().items()
                if not (tied and k == "lm_head.weight")}
    ours = lsk.load_model(hf)
    assert checkpoint_shapes(ours.config) == expected
    exported = hf_state_dict(ours)
    for name, tensor in hf.state_dict().items():
        assert torch.equal(exported[name.removeprefix("model.")], tensor), name


def test_fused_parameters_are_the_models():
    """Each fused parameter of the table is one of the model's, of its parts' rows."""
    model = lsk.Llama(lsk.LlamaConfig(vocab_size=VOCAB, dim=DIM, n_layers=1, n_heads=HEADS,
                                      n_kv_heads=2, hidden_dim=40))
    params = dict(model.named_parameters())
    shapes = checkpoint_shapes(model.config)
    for fused, parts in FUSED.items():
        rows = sum(shapes[f"layers.0.{p}"][0] for p in parts)
        assert params[f"layers.0.{fused}"].shape == (rows, DIM)
    assert {f"layers.0.{w.fused}" for w in LAYER_WEIGHTS} == {
        n for n in params if n.startswith("layers.0.")}


# ---------------------------------------------------------------- the config key table


def test_every_llama_config_key_has_a_rule():
    """A key transformers adds to LlamaConfig fails here until CONFIG_KEYS decides on it."""
    keys = set(transformers.LlamaConfig.__annotations__)
    assert keys - set(CONFIG_KEYS) == set()
    for key, rule in CONFIG_KEYS.items():
        assert isinstance(rule, tuple) or rule == "implemented" or rule.startswith("ignored: ")


@pytest.mark.parametrize("key, value", [
    ("initializer_range", 0.5), ("use_cache", False), ("pad_token_id", 0),
    ("attention_dropout", 0.5), ("pretraining_tp", 2)])
def test_ignored_keys_change_nothing_in_transformers(generator, key, value):
    """What CONFIG_KEYS ignores, transformers' eval-mode logits ignore too."""
    assert CONFIG_KEYS[key].startswith("ignored")
    hf = hf_llama(generator)
    other = transformers.LlamaForCausalLM(hf_config(**{key: value})).eval()
    other.load_state_dict(hf.state_dict())
    tokens = torch.randint(0, VOCAB, (2, 9), generator=generator)
    with torch.no_grad():
        assert torch.equal(other(tokens).logits, hf(tokens).logits)
        ours = lsk.load_model(other)(tokens)
    torch.testing.assert_close(ours, hf(tokens).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("key, value", [
    ("hidden_act", "gelu"), ("hidden_act", "relu"), ("attention_bias", True),
    ("mlp_bias", True)])
def test_refused_keys_change_transformers_logits(generator, key, value, tmp_path):
    """What CONFIG_KEYS refuses matters: transformers' logits move with it, and loading the
    checkpoint is refused naming the key (never decoded as SiLU, or without the biases)."""
    assert value not in CONFIG_KEYS[key]
    hf = hf_llama(generator)
    other = hf_llama(generator, **{key: value})
    other.load_state_dict(hf.state_dict(), strict=False)  # the biases stay random
    tokens = torch.randint(0, VOCAB, (2, 9), generator=generator)
    with torch.no_grad():
        assert (other(tokens).logits - hf(tokens).logits).abs().max() > 1e-2
    other.save_pretrained(tmp_path)
    for source in (other, tmp_path):
        with pytest.raises(ValueError, match=key):
            lsk.load_model(source)


def test_swish_is_silu_in_transformers(generator):
    """hidden_act "swish" is accepted: transformers' ACT2FN maps it to SiLU too."""
    hf = hf_llama(generator)
    swish = hf_llama(generator, hidden_act="swish")
    swish.load_state_dict(hf.state_dict())
    tokens = torch.randint(0, VOCAB, (1, 7), generator=generator)
    with torch.no_grad():
        assert torch.equal(swish(tokens).logits, hf(tokens).logits)
        torch.testing.assert_close(lsk.load_model(swish)(tokens), hf(tokens).logits,
                                   rtol=1e-4, atol=1e-4)


def test_rope_dicts_refused_as_transformers_reads_them(generator, tmp_path):
    """rope_type null: transformers refuses it too (KeyError at the model); a factor without a
    rope_type: transformers runs default RoPE, the factor dropped, so it is refused here rather
    than ignored; llama3 without original_max_position_embeddings: transformers falls back to
    max_position_embeddings, which the checkpoint did not state, so it is refused."""
    with pytest.raises(KeyError):
        transformers.LlamaForCausalLM(hf_config(rope_scaling={"rope_type": None, "factor": 8.0}))
    hf = hf_llama(generator)
    dropped = transformers.LlamaForCausalLM(hf_config(rope_scaling={"factor": 8.0})).eval()
    dropped.load_state_dict(hf.state_dict())
    tokens = torch.randint(0, VOCAB, (1, 40), generator=generator)
    with torch.no_grad():
        assert torch.equal(dropped(tokens).logits, hf(tokens).logits)
    for rope, key in (({"rope_type": None, "factor": 8.0}, "rope_type"),
                      ({"factor": 8.0}, "factor"),
                      ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0}, "original_max_position_embeddings")):
        config = dict(hf.config.to_dict(), rope_parameters=None, rope_scaling=rope)
        with pytest.raises(ValueError, match=key):
            lsk.model.checkpoint.config_from_hf(config)


# ---------------------------------------------------------------- fused paths


def small_llama(generator):
    model = lsk.Llama(lsk.LlamaConfig(vocab_size=VOCAB, dim=DIM, n_layers=3, n_heads=HEADS,
                                      n_kv_heads=2, hidden_dim=40, max_seq_len=64))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1.0 if "norm" in name else 0.0) + 0.3 * torch.randn(p.shape,
                                                                       generator=generator))
    return model.eval().requires_grad_(False)


def with_bias(linear, generator):
    """An nn.Linear of linear's weight and a large random bias."""
    biased = nn.Linear(linear.in_features, linear.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(linear.weight)
        biased.bias.copy_(3 * torch.randn(biased.bias.shape, generator=generator))
    return biased.requires_grad_(False)


def decode(model, **kwargs):
    prompts = [[1, 5, 9, 2], [7, 3]]
    return lsk.generate(model, prompts, max_new_tokens=10, **kwargs)


@pytest.mark.parametrize("strategy", ["autoregressive", "self_speculative"])
@pytest.mark.parametrize("where", ["self_attn.o_proj", "mlp.down_proj", "mlp.gate_up_proj"])
def test_a_bias_is_computed_never_dropped(generator, where, strategy):
    """A projection with a bias keeps every path on the modules, which add it: the tokens are
    the reference backend's, and stats say why the fused path did not run."""
    model = small_llama(generator)
    parent, name = where.split(".")
    block = model.layers[1]
    setattr(getattr(block, parent), name, with_bias(getattr(getattr(block, parent), name),
                                                     generator))
    assert block.fused_weights() is None
    assert block.fused_refusal() == f"{where} has a bias"
    kwargs = {"strategy": strategy, **({"exit_layer": 1} if strategy != "autoregressive" else {})}
    got = decode(model, **kwargs)
    model.backend = "torch"
    expected = decode(model, **kwargs)
    assert got.tokens == expected.tokens
    assert got.stats["path"] == f"eager: layer 1 {where} has a bias"


@pytest.mark.parametrize("strategy", ["autoregressive", "self_speculative"])
def test_a_hook_on_the_head_is_run(generator, strategy):
    """A forward hook on lm_head that favours one token: every greedy token is that token
    (the fused heads, the C++ decoder's and the draft head, would skip the hook)."""
    model = small_llama(generator)

    def favour(module, args, out):
        out[..., 11] += 1e4
        return out
    model.lm_head.register_forward_hook(favour)
    assert model.head_refusal() == "lm_head has forward hooks"
    kwargs = {"strategy": strategy, **({"exit_layer": 1} if strategy != "autoregressive" else {})}
    result = decode(model, **kwargs)
    assert result.tokens == [[11] * 10] * 2
    assert result.stats["path"] == "eager: lm_head has forward hooks"


def test_a_hook_inside_a_layer_is_run(generator):
    """A hook on a layer's norm (not on the block) also keeps the layers on their modules."""
    model = small_llama(generator)
    calls = []
    model.layers[2].post_attention_layernorm.register_forward_hook(
        lambda *args: calls.append(1))
    assert model.layers[2].fused_refusal() == "post_attention_layernorm has forward hooks"
    assert decode(model).stats["path"] == "eager: layer 2 post_attention_layernorm has forward hooks"
    assert len(calls) >= 10


def test_plain_model_runs_fused(generator):
    """Control: without any of those, the C++ steps run (where built)."""
    model = small_llama(generator)
    assert model.head_refusal() is None and all(b.fused_refusal() is None for b in model.layers)
    path = decode(model).stats["path"]
    from layerskip_kernels.ops.llama_layer import cpu_unavailable_reason
    assert path.startswith("cpu") or cpu_unavailable_reason() is not None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_on_a_cpu_says_which_path_ran(generator, dtype, tmp_path):
    """Half-precision weights on a CPU decode in eager torch ops, much slower than the C++
    kernels' float32: load_model warns, and stats["path"] says why."""
    model = small_llama(generator)
    lsk.model.save_hf_directory(model, tmp_path)
    with pytest.warns(UserWarning, match="slower than float32"):
        half = lsk.load_model(tmp_path, dtype=dtype)
    name = str(dtype).removeprefix("torch.")
    assert decode(half).stats["path"] == (f"eager: {name} weights on a CPU (the C++ kernels "
                                          "take float32)")
