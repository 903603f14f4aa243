"""`generate` (ragged batches, early exit, sampling, eos, stats, argument checks) and the
sampling filters of decoding/sampling.py."""
import math

import numpy as np
import pytest
import torch

import layerskip_kernels as lsk
from layerskip_kernels.decoding.sampling import logits_to_probs, sample

VOCAB = 97  # odd on purpose


@pytest.fixture
def seed(generator):
    return int(torch.randint(0, 2**31 - 1, (), generator=generator))


def randomized(config, generator, scale, norm_scale):
    """An inference-mode Llama with N(0, scale) weights and N(1, norm_scale) norm weights."""
    model = lsk.Llama(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            std = norm_scale if "norm" in name else scale
            p.copy_(std * torch.randn(p.shape, generator=generator) + ("norm" in name))
    return model.eval().requires_grad_(False)


def tiny_llama(generator, n_layers=4, max_seq_len=48):
    """A random Llama (norms random too) whose greedy output is not one repeated token."""
    config = lsk.LlamaConfig(vocab_size=VOCAB, dim=32, n_layers=n_layers, n_heads=4,
                             n_kv_heads=2, hidden_dim=45, max_seq_len=max_seq_len)
    return randomized(config, generator, scale=0.15, norm_scale=0.3)


def truncated(model, n_layers):
    """A Llama of the first n_layers of `model`, sharing its embedding, layers and head."""
    config = lsk.LlamaConfig(**{**vars(model.config), "n_layers": n_layers})
    small = lsk.Llama(config)
    small.embed_tokens, small.norm, small.lm_head = model.embed_tokens, model.norm, model.lm_head
    small.layers = torch.nn.ModuleList(model.layers[:n_layers])
    return small.eval().requires_grad_(False)


def random_prompts(generator, lengths, vocab=VOCAB):
    return [torch.randint(0, vocab, (n,), generator=generator).tolist() for n in lengths]


@pytest.fixture(params=["tiny", "stories"])
def model_and_vocab(request, generator):
    if request.param == "tiny":
        return tiny_llama(generator), VOCAB
    return lsk.load_model(request.getfixturevalue("stories_path")), 512


# ---------------------------------------------------------------- batching and early exit


@pytest.mark.parametrize("strategy", ["autoregressive", "early_exit"])
@pytest.mark.parametrize("lengths", [(1, 7, 4), (5,)])
def test_ragged_batch_equals_each_prompt_alone(generator, model_and_vocab, lengths, strategy):
    model, vocab = model_and_vocab
    prompts = random_prompts(generator, lengths, vocab)
    if vocab == 512:
        prompts[0][0] = 1  # one row starts from BOS as real prompts do
    kw = dict(max_new_tokens=13, strategy=strategy, eos_token_id=[])
    kw.update(exit_layer=2) if strategy == "early_exit" else None
    batch = lsk.generate(model, prompts, **kw)
    assert [len(t) for t in batch.tokens] == [13] * len(prompts)
    for prompt, tokens in zip(prompts, batch.tokens):
        assert lsk.generate(model, [prompt], **kw).tokens[0] == tokens
    if strategy == "autoregressive":  # a model that does more than repeat one token
        assert len({t for row in batch.tokens for t in row}) > 2


@pytest.mark.parametrize("exit_layer", [2, 3])
def test_early_exit_equals_truncated_model(generator, exit_layer):
    model = tiny_llama(generator, n_layers=4)
    prompts = random_prompts(generator, (3, 1, 6))
    kw = dict(max_new_tokens=11, eos_token_id=[])
    early = lsk.generate(model, prompts, strategy="early_exit", exit_layer=exit_layer, **kw)
    small = lsk.generate(truncated(model, exit_layer), prompts, **kw)
    full = lsk.generate(model, prompts, **kw)
    assert early.tokens == small.tokens
    assert early.tokens != full.tokens  # control: the exit layer matters


def test_one_layer_model_generates(generator):
    model = tiny_llama(generator, n_layers=1)
    res = lsk.generate(model, [[1, 2]], max_new_tokens=3, eos_token_id=[])
    with torch.no_grad():
        first = model(torch.tensor([[1, 2]]))[0, -1].argmax().item()
    assert len(res.tokens[0]) == 3 and res.tokens[0][0] == first


def test_early_exit_equals_truncated_stories(stories_path):
    model = lsk.load_model(stories_path)
    kw = dict(max_new_tokens=21, eos_token_id=[])
    early = lsk.generate(model, [[1], [1, 403, 407]], strategy="early_exit", exit_layer=3, **kw)
    small = lsk.generate(truncated(model, 3), [[1], [1, 403, 407]], **kw)
    assert early.tokens == small.tokens


# ---------------------------------------------------------------- sampling


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (5, 0.9)])
def test_sampling_seeded(generator, seed, top_k, top_p):
    model = tiny_llama(generator)
    prompts = random_prompts(generator, (2, 5, 1))
    kw = dict(max_new_tokens=15, temperature=1.5, top_k=top_k, top_p=top_p, eos_token_id=[])
    first = lsk.generate(model, prompts, seed=seed, **kw)
    again = lsk.generate(model, prompts, seed=seed, **kw)
    other = lsk.generate(model, prompts, seed=seed + 1, **kw)
    greedy = lsk.generate(model, prompts, max_new_tokens=15, eos_token_id=[])
    assert first.tokens == again.tokens
    assert first.tokens != other.tokens
    assert first.tokens != greedy.tokens


@pytest.mark.parametrize("filters", [dict(top_k=1), dict(top_p=1e-6), dict(top_k=1, top_p=0.5)])
def test_sampling_with_one_candidate_is_greedy(generator, seed, filters):
    model = tiny_llama(generator)
    prompts = random_prompts(generator, (4, 1, 3))
    greedy = lsk.generate(model, prompts, max_new_tokens=15, eos_token_id=[])
    sampled = lsk.generate(model, prompts, max_new_tokens=15, eos_token_id=[],
                           temperature=2.0, seed=seed, **filters)
    assert sampled.tokens == greedy.tokens


# ---------------------------------------------------------------- eos and stats


EOS_FORMS = {"int": lambda t: t, "list": lambda t: [t], "tensor": lambda t: torch.tensor([t]),
             "0-d tensor": torch.tensor, "numpy": lambda t: np.array([t]), "np.int64": np.int64}


@pytest.mark.parametrize("form", EOS_FORMS)
def test_eos_stops_its_row_only(generator, form):
    """An eos given as a tensor or array stops too (a tensor element never equals an int)."""
    model = tiny_llama(generator)
    prompts = random_prompts(generator, (3, 6, 2))
    free = lsk.generate(model, prompts, max_new_tokens=17, eos_token_id=[]).tokens
    # An eos that row 0 emits after a few tokens and the other rows never emit.
    eos = next(t for t in free[0][2:] if all(t not in row for row in free[1:]))
    cut = free[0].index(eos) + 1
    res = lsk.generate(model, prompts, max_new_tokens=17, eos_token_id=EOS_FORMS[form](eos))
    assert res.tokens[0] == free[0][:cut] and res.tokens[0][-1] == eos
    assert cut < 17
    assert res.tokens[1:] == free[1:]
    assert res.stats["new_tokens"] == cut + 34


def test_eos_from_config(generator):
    model = tiny_llama(generator)
    free = lsk.generate(model, [[5, 6]], max_new_tokens=9, eos_token_id=[]).tokens[0]
    model.config.eos_token_id = [free[3]]
    expected = free[:free.index(free[3]) + 1]
    assert lsk.generate(model, [[5, 6]], max_new_tokens=9).tokens[0] == expected


@pytest.mark.parametrize("strategy", ["autoregressive", "early_exit"])
def test_stats(generator, strategy):
    model = tiny_llama(generator)
    res = lsk.generate(model, random_prompts(generator, (2, 7, 1)), max_new_tokens=5,
                       strategy=strategy, eos_token_id=[],
                       exit_layer=2 if strategy == "early_exit" else None)
    assert isinstance(res, lsk.GenerationResult)
    assert res.stats["tokens_per_s"] > 0
    assert res.stats["new_tokens"] == sum(len(t) for t in res.tokens) == 15
    assert res.stats["strategy"] == strategy


# ---------------------------------------------------------------- argument checks


BAD_ARGS = [
    (dict(prompts=[[]]), "prompts\\[0\\]"),
    (dict(prompts=[[1, 2], []]), "prompts\\[1\\]"),
    (dict(prompts=[]), "prompts"),
    (dict(prompts=[[1, VOCAB]]), "prompts\\[0\\]"),
    (dict(prompts=[[-1, 3]]), "prompts\\[0\\]"),
    (dict(prompts=[[1] * 49]), "prompts\\[0\\]"),
    (dict(max_new_tokens=46), "max_new_tokens"),  # 3 + 46 > max_seq_len 48
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(strategy="beam"), "strategy"),
    (dict(strategy="early_exit", exit_layer=0), "exit_layer"),
    (dict(strategy="early_exit", exit_layer=4), "exit_layer"),
    (dict(strategy="early_exit", exit_layer=None), "exit_layer"),
    (dict(strategy="autoregressive", exit_layer=2), "exit_layer"),
    (dict(strategy="autoregressive", num_speculations=3), "num_speculations"),
    (dict(strategy="early_exit", exit_layer=2, speedup=1.5), "speedup"),
    (dict(strategy="self_speculative", draft="layer_skip", speedup=1.5, exit_layer=2),
     "exit_layer"),
    (dict(cuda_graphs="yes"), "cuda_graphs"),
    (dict(prompts=torch.tensor([[1.0, 2.0]])), "prompts"),
    (dict(prompts=torch.tensor([[1, 2]]), attention_mask=torch.ones(1, 3)), "attention_mask"),
    (dict(temperature=-0.5), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    # Integers are integers: no bools, no floats (even 8.0), no strings.
    *[(dict(max_new_tokens=v), "max_new_tokens") for v in (8.0, 1.5, math.nan, True, "5")],
    *[(dict(prompts=p), "prompts") for p in ([[1.0, 2.0]], [[1, 2.5]], [[True, 2]], [[1, None]],
                                             torch.tensor([[True, False]]),
                                             np.array([[1.0, 2.0]]), [torch.tensor([1.5])],
                                             [np.array([1, 2]).astype(bool)], "1 2 3",
                                             np.array([[1, None]]), [np.array([1, None])])],
    (dict(strategy="early_exit", exit_layer=True), "exit_layer"),
    (dict(strategy="early_exit", exit_layer=2.0), "exit_layer"),
    (dict(strategy="self_speculative", exit_layer=2, num_speculations=True), "num_speculations"),
    (dict(strategy="self_speculative", exit_layer=2, num_speculations="3"), "num_speculations"),
    *[(dict(seed=v), "seed") for v in ("1", 1.5, 2**64, -1, True)],
    *[(dict(top_k=v), "top_k") for v in (1.5, True)],
    # Numbers are finite.
    *[(dict(temperature=v), "temperature") for v in (math.nan, math.inf, "1")],
    *[(dict(top_p=v), "top_p") for v in (math.nan, True)],
    *[(dict(strategy="layer_skip", speedup=v), "speedup") for v in (math.nan, math.inf, True)],
    # Stop tokens are token ids.
    *[(dict(eos_token_id=v), "eos_token_id") for v in (-1, "abc", [1.5], [None], [VOCAB], True,
                                                       torch.tensor([1.5]), np.array([-1]))],
    (dict(stream=5), "stream"),
    (dict(cuda_graphs=1), "cuda_graphs"),
    # A mask is 1s (tokens) with padding on either side: no hole, no other value.
    *[(dict(prompts=torch.tensor([[1, 2, 3]]), attention_mask=torch.tensor([m])),
       "attention_mask") for m in ([1, 0, 1], [1, 2, 1], [1, -1, 1], [0.5, 1.0, 1.0])],
    (dict(prompts=torch.tensor([[1, 2, 3]]), attention_mask=np.array([[1, None, 1]])),
     "attention_mask"),
    # What the CLI refuses as a flag that cannot apply, the API refuses too.
    (dict(draft="layer_skip", speedup=1.5), "draft"),
    (dict(draft="early_exit"), "draft"),
    (dict(strategy="layer_skip"), "speedup"),
    (dict(temperature=0.0), "seed"),  # kw's seed=0 with greedy decoding
    (dict(temperature=0.0, seed=None, top_k=3), "top_k"),
    (dict(temperature=0.0, seed=None, top_p=0.9), "top_p"),
]


@pytest.mark.parametrize("bad, match", BAD_ARGS)
def test_bad_arguments_fail_before_any_work(generator, monkeypatch, bad, match):
    model = tiny_llama(generator)
    kw = dict(prompts=[[1, 2, 3]], max_new_tokens=5, temperature=1.0, seed=0)
    assert len(lsk.generate(model, **kw).tokens[0]) == 5  # passing control
    assert len(lsk.generate(model, **{**kw, "prompts": [[1] * 43]}).tokens[0]) == 5  # 43 + 5 = 48

    def no_work(*args, **kwargs):
        raise AssertionError("generate did work before checking its arguments")

    monkeypatch.setattr(model, "new_cache", no_work)
    monkeypatch.setattr(model, "forward", no_work)
    with pytest.raises(ValueError, match=f"^{match}") as error:
        lsk.generate(model, **{**kw, **bad})
    assert "\n" not in str(error.value) and "expected" in str(error.value)


P = dict(prompts=[[1, 2, 3]])  # the plain prompts of the cases below


@pytest.mark.parametrize("good, plain", [
    (dict(max_new_tokens=np.int64(5)), {}), (dict(max_new_tokens=torch.tensor(5)), {}),
    (dict(prompts=[np.array([1, 2, 3])]), P), (dict(prompts=[[np.int64(1), np.int32(2), 3]]), P),
    (dict(prompts=np.array([[1, 2, 3]])), P),
    (dict(prompts=torch.tensor([[1, 2, 3]], dtype=torch.int16)), P),
    (dict(prompts=torch.tensor([[0, 1, 2, 3]]), attention_mask=torch.tensor([[0, 1, 1, 1]])), P),
    (dict(prompts=torch.tensor([[1, 2, 3, 0]]), attention_mask=torch.tensor([[1., 1, 1, 0]])), P),
    (dict(prompts=torch.tensor([[1, 2, 3, 0]]), attention_mask=np.array([[1, 1, 1, 0]]) > 0), P),
    (dict(strategy="early_exit", exit_layer=np.int64(2)),
     dict(strategy="early_exit", exit_layer=2)),
    (dict(strategy="self_speculative", exit_layer=np.int64(2), num_speculations=np.int64(3)),
     dict(strategy="self_speculative", exit_layer=2, num_speculations=3)),
    (dict(strategy="self_speculative", draft="early_exit", exit_layer=torch.tensor(2)),
     dict(strategy="self_speculative", exit_layer=2)),
    (dict(top_k=np.int64(3), top_p=np.float32(0.5), temperature=np.float64(0.7)),
     dict(top_k=3, top_p=0.5, temperature=0.7)),
    (dict(seed=np.uint64(2**64 - 1)), dict(seed=2**64 - 1)),
    (dict(seed=torch.tensor(7)), dict(seed=7)),
    (dict(strategy="layer_skip", speedup=np.float64(1.5), seed=None, temperature=0.0),
     dict(strategy="layer_skip", speedup=1.5, seed=None, temperature=0.0)),
    # The neutral values of the sampling filters are no error with greedy decoding (benchmark,
    # sweep and training call generate() with them).
    (dict(temperature=0.0, seed=None, top_k=0, top_p=1.0), dict(temperature=0.0, seed=None)),
])
def test_integer_and_float_scalars_accepted(generator, good, plain):
    """numpy and torch scalars, arrays and masks give the tokens of the plain Python values."""
    model = tiny_llama(generator)
    kw = dict(prompts=[[1, 2, 3]], max_new_tokens=5, temperature=1.0, seed=0, eos_token_id=[])
    got = lsk.generate(model, **{**kw, **good})
    assert got.tokens == lsk.generate(model, **{**kw, **plain}).tokens
    assert len(got.tokens[0]) == 5


# ---------------------------------------------------------------- logits_to_probs


@pytest.mark.parametrize("k", [1, 5, VOCAB])
@pytest.mark.parametrize("batch", [1, 3])
def test_top_k_keeps_exactly_k(generator, batch, k):
    logits = torch.randn(batch, VOCAB, generator=generator) * 3
    probs = logits_to_probs(logits, temperature=1.0, top_k=k)
    assert ((probs > 0).sum(-1) == k).all()
    top = logits.topk(k, dim=-1).indices
    assert (probs.gather(-1, top) > 0).all()
    expected = torch.full_like(logits, float("-inf")).scatter(-1, top, logits.gather(-1, top))
    torch.testing.assert_close(probs, expected.softmax(-1), rtol=1e-6, atol=1e-7)


# probs of the 5 tokens, by rank: 0.5, 0.2, 0.15, 0.1, 0.05 (cumulative 0.5 0.7 0.85 0.95 1)
TOP_P_CASES = [(0.3, 1), (0.6, 2), (0.75, 3), (0.85 + 1e-3, 4), (0.97, 5), (1.0, 5)]


@pytest.mark.parametrize("top_p, kept", TOP_P_CASES)
def test_top_p_keeps_smallest_prefix_reaching_p(top_p, kept):
    ranked = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    order = torch.tensor([3, 0, 4, 1, 2])  # ranked[i] sits at vocab position order[i]
    probs_in = torch.empty(5).scatter(0, order, ranked)
    probs = logits_to_probs(probs_in.log()[None], temperature=1.0, top_p=top_p)[0]
    expected = torch.zeros(5).scatter(0, order[:kept], ranked[:kept] / ranked[:kept].sum())
    torch.testing.assert_close(probs, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_temperature_scales_logits(generator, temperature):
    logits = torch.randn(3, VOCAB, generator=generator)
    probs = logits_to_probs(logits, temperature=temperature)
    torch.testing.assert_close(probs, (logits / temperature).softmax(-1), rtol=1e-6, atol=1e-7)
    entropy = -(probs * probs.log()).sum(-1)
    base = logits.softmax(-1)
    base_entropy = -(base * base.log()).sum(-1)
    if temperature != 1.0:  # hotter spreads the mass, colder sharpens it
        assert ((entropy > base_entropy) == (temperature > 1)).all()


def test_sample_greedy_is_argmax(generator):
    logits = torch.randn(5, VOCAB, generator=generator)
    assert torch.equal(sample(logits), logits.argmax(-1))
    assert torch.equal(sample(logits, temperature=1.0, top_k=1,
                              generator=torch.Generator().manual_seed(0)), logits.argmax(-1))
    assert math.isclose(float(logits_to_probs(logits, 0.7, 3, 0.9).sum()), 5.0, rel_tol=1e-6)


def test_stream_sees_every_kept_token_in_order(generator):
    model = tiny_llama(generator)
    prompts = [[1, 2], [3], [4, 5, 6]]
    seen = [[] for _ in prompts]
    for strategy, extra in [("autoregressive", {}),
                            ("self_speculative", {"exit_layer": 1, "num_speculations": 3})]:
        seen = [[] for _ in prompts]
        res = lsk.generate(model, prompts, max_new_tokens=7, strategy=strategy, eos_token_id=[],
                           stream=lambda row, tokens: seen[row].extend(tokens), **extra)
        assert seen == res.tokens


@pytest.mark.parametrize("strategy,extra", [
    ("autoregressive", {}), ("self_speculative", {"exit_layer": 2, "num_speculations": 2})])
def test_finished_rows_leave_the_batch(generator, strategy, extra):
    model = tiny_llama(generator)
    prompts = [[1, 2], [3], [4, 5, 6]]
    free = lsk.generate(model, prompts, max_new_tokens=12, eos_token_id=[])
    eos = free.tokens[1][0]  # row 1 stops on its first token
    batch_sizes = []
    hook = model.layers[0].register_forward_pre_hook(lambda m, args: batch_sizes.append(len(args[0])))
    try:
        res = lsk.generate(model, prompts, max_new_tokens=12, strategy=strategy,
                           eos_token_id=[eos], **extra)
    finally:
        hook.remove()
    assert res.tokens[1] == [eos]
    assert batch_sizes[0] == 3 and batch_sizes[-1] < 3  # the prefill had all rows, the end not
    assert 3 not in batch_sizes[2:]  # after the first decode step row 1 is gone


@pytest.mark.parametrize("strategy,extra", [
    ("autoregressive", {}), ("self_speculative", {"exit_layer": 1, "num_speculations": 3})])
def test_triton_backend_generates_the_same_tokens(generator, strategy, extra):
    """The whole model on the Triton kernels (attention, norms, draft head), in the CPU
    interpreter, against the PyTorch reference; head_dim 64 as the kernels require."""
    config = lsk.LlamaConfig(vocab_size=VOCAB, dim=128, n_layers=2, n_heads=2, n_kv_heads=1,
                             hidden_dim=64, max_seq_len=32)
    model = randomized(config, generator, scale=0.2, norm_scale=0.2)
    prompts = [[1, 2, 3], [4]]
    outputs = {}
    for backend in ("torch", "triton"):
        model.backend = backend
        outputs[backend] = lsk.generate(model, prompts, max_new_tokens=6, strategy=strategy,
                                        eos_token_id=[], **extra).tokens
    assert outputs["triton"] == outputs["torch"]


DECISIVE_PROMPTS, DECISIVE_TOKENS = [[1, 2, 3, 4, 5], [6, 7]], 12
DECISIVE_MARGIN = 0.08  # smallest top-1 minus top-2 logit gap, in standard deviations of the logits


def decisive_llama():
    """A random Llama (GQA 4/2, head_dim 64 as the CUDA kernels need) whose greedy tokens on
    DECISIVE_PROMPTS have no near-ties, so fp16 kernels must reproduce them exactly: seed 26
    was picked for that, and test_decisive_llama_has_no_near_ties keeps it honest. Weights
    are fp16 values, so the fp16 model differs from the float32 one only in its arithmetic."""
    config = lsk.LlamaConfig(vocab_size=VOCAB, dim=128, n_layers=4, n_heads=4, n_kv_heads=2,
                             head_dim=64, hidden_dim=256, max_seq_len=64)
    model = randomized(config, torch.Generator().manual_seed(26), scale=0.1, norm_scale=0.3)
    for p in model.parameters():
        p.copy_(p.half())
    return model


def greedy_margins(model, prompts, outputs):
    """Per generated token: (top-1 - top-2 logit) / std of the logits, from one forward pass."""
    margins = []
    for prompt, output in zip(prompts, outputs):
        logits = model(torch.tensor([prompt + output]))[0, len(prompt) - 1:-1].float()
        top2 = logits.topk(2, dim=-1).values
        margins += ((top2[:, 0] - top2[:, 1]) / logits.std(-1)).tolist()
    return margins


def test_decisive_llama_has_no_near_ties():
    model = decisive_llama()
    tokens = lsk.generate(model, DECISIVE_PROMPTS, max_new_tokens=DECISIVE_TOKENS,
                          eos_token_id=[]).tokens
    assert min(greedy_margins(model, DECISIVE_PROMPTS, tokens)) > DECISIVE_MARGIN
    assert len(set(sum(tokens, []))) > 8  # not one repeated token
    # fp16 arithmetic moves a logit by far less than half the smallest gap.
    ids = torch.tensor([DECISIVE_PROMPTS[0] + tokens[0]])
    exact, half = model(ids)[0], model.half()(ids)[0].float()
    assert ((exact - half).abs().amax(-1) / exact.std(-1)).max() < DECISIVE_MARGIN / 4


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("strategy,extra", [
    ("autoregressive", {}), ("self_speculative", {"exit_layer": 2, "num_speculations": 3})])
def test_gpu_backends_generate_the_float32_cpu_tokens(backend, strategy, extra):
    """The whole model on each GPU backend in fp16 against the float32 CPU reference: exact
    tokens, as the decisive model has no near-ties."""
    if backend == "cuda" and not lsk.cuda_available():
        pytest.skip("layerskip_kernels._C was not built with CUDA")
    model = decisive_llama()
    expected = lsk.generate(model, DECISIVE_PROMPTS, max_new_tokens=DECISIVE_TOKENS,
                            eos_token_id=[]).tokens
    model = model.to("cuda", torch.float16)
    model.backend = backend
    got = lsk.generate(model, DECISIVE_PROMPTS, max_new_tokens=DECISIVE_TOKENS, strategy=strategy,
                       eos_token_id=[], **extra).tokens
    assert got == expected


def test_training_runs_the_references_even_with_a_kernel_backend(generator):
    """Kernels have no backward: with weights that want gradients, the head's norm must be
    the differentiable reference whatever the backend."""
    model = tiny_llama(generator).requires_grad_(True)
    model.backend = "triton"
    h = torch.randn(2, 3, model.config.dim, generator=generator)
    model.head(h).sum().backward()
    assert model.norm.weight.grad is not None and model.lm_head.weight.grad is not None


def test_tensor_prompts_with_attention_mask_equal_id_lists(generator):
    """Left- and right-padded 2-D prompts, as transformers' generate takes them."""
    model = tiny_llama(generator)
    prompts = random_prompts(generator, (5, 2, 7))
    ids = torch.zeros(3, 7, dtype=torch.long)
    mask = torch.zeros(3, 7, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        span = slice(7 - len(prompt), 7) if row % 2 else slice(0, len(prompt))  # left / right
        ids[row, span], mask[row, span] = torch.tensor(prompt), 1
    want = lsk.generate(model, prompts, max_new_tokens=6, eos_token_id=[]).tokens
    got = lsk.generate(model, ids, attention_mask=mask, max_new_tokens=6, eos_token_id=[]).tokens
    assert got == want
    full = lsk.generate(model, ids[:1], max_new_tokens=6, eos_token_id=[]).tokens
    assert full == lsk.generate(model, [ids[0].tolist()], max_new_tokens=6, eos_token_id=[]).tokens


def test_self_speculative_defaults_without_a_recommendation(generator):
    """A model whose config recommends no (E, k) drafts from a quarter of its depth with k = 4,
    and says so in the stats."""
    model = tiny_llama(generator)
    assert model.config.exit_layer is None and model.config.num_speculations is None
    prompts = random_prompts(generator, (3, 6))
    res = lsk.generate(model, prompts, max_new_tokens=8, strategy="self_speculative",
                       eos_token_id=[])
    assert res.stats["exit_layer"] == 1 and res.stats["num_speculations"] == 4
    assert res.stats["defaulted"] == ["num_speculations", "exit_layer"]
    assert res.tokens == lsk.generate(model, prompts, max_new_tokens=8, eos_token_id=[]).tokens
