"""Tensor parallelism (model/parallel.py) on this CPU: 2 gloo ranks, spawned by the tests.

One spawn (module fixture `ranks`: torchrun --nproc-per-node 2 running this file) first runs
the CLI with --tp 2 (which initializes the process group from torchrun's environment), then
loads every model at TP=2 and decodes with it; each rank writes what it got, and the tests
compare both ranks with TP=1 (this process). Exact token equality is fair in float32 because
every model and prompt set here has no near-tie: the smallest top-1 minus top-2 logit gap is
checked to be far above what a reordered fp32 sum can move (row-parallel all-reduces add in
another order).

The worker by hand: torchrun --standalone --nproc-per-node 2 tests/test_tensor_parallel.py
SPEC OUT.
"""
import json
import os
from fractions import Fraction
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
MARGIN = 0.01  # min (top1 - top2) / std(logits) of every greedy token; fp32 noise is ~1e-6
NEW = 10
DEFAULT_PROMPTS = [[0, 100, 101, 102], [0], [0, 300, 301]]  # ragged batch of 3
GQA_PROMPTS = [[1, 2, 3, 4, 5], [6], [7, 8, 9]]
STORIES_PROMPTS = [[1, 100, 200], [1], [1, 50, 60, 70, 80]]
GREEDY = {"ar": {}, "ss": {"strategy": "self_speculative", "num_speculations": 3},
          "ss_auto": {"strategy": "self_speculative", "num_speculations": "auto"},
          "ss_skip": {"strategy": "self_speculative", "draft": "layer_skip", "speedup": 2.0,
                      "num_speculations": 2}}
SAMPLED = {"sampled_ar": {"temperature": 1.0, "top_k": 40, "seed": 5},
           "sampled_ss": {"strategy": "self_speculative", "temperature": 0.8, "top_p": 0.9,
                          "seed": 5},
           "unseeded": {"temperature": 1.0}}
# (n_heads, n_kv_heads, head_dim, seed): KV heads that divide by 2 nowhere; seeds picked for
# margins (test_models_have_no_near_ties keeps them honest).
GQA = {"gqa_6q3kv": (6, 3, 16, 4), "gqa_4q1kv": (4, 1, 24, 3)}


def gqa_llama(n_heads, n_kv_heads, head_dim, seed):
    """A random float32 Llama (vocab 101: uneven vocab shards) with N(0, 0.15) weights."""
    import layerskip_kernels as lsk
    config = lsk.LlamaConfig(vocab_size=101, dim=96, n_layers=4, n_heads=n_heads,
                             n_kv_heads=n_kv_heads, head_dim=head_dim, hidden_dim=128,
                             max_seq_len=64, bos_token_id=1)
    model, g = lsk.Llama(config), torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            std = 0.3 if "norm" in name else 0.15
            p.copy_(std * torch.randn(p.shape, generator=g) + ("norm" in name))
    return model.eval().requires_grad_(False)


def save_sharded(model, path):
    """An HF directory whose weights are split over two files with an index."""
    from safetensors.torch import load_file, save_file

    from layerskip_kernels.model import save_hf_directory
    save_hf_directory(model, path)
    state = load_file(path / "model.safetensors")
    (path / "model.safetensors").unlink()
    names = sorted(state)
    files = {n: f"model-0000{1 + i % 2}-of-00002.safetensors" for i, n in enumerate(names)}
    for file in set(files.values()):
        save_file({n: state[n] for n in names if files[n] == file}, path / file,
                  metadata={"format": "pt"})
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": files}))


def worker(spec, out):
    """One rank under torchrun: the CLI's output, then every model of `spec` at TP=world, its
    runs, reads and head outputs."""
    import contextlib
    import io

    import torch.distributed as dist

    import layerskip_kernels as lsk
    from layerskip_kernels.cli import main
    from layerskip_kernels.model import parallel
    torch.set_num_threads(1)
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        main(CLI_ARGS)  # initializes the (gloo) process group from torchrun's environment
    rank, world = dist.get_rank(), dist.get_world_size()  # the CLI's process group
    result = {"cli": [stdout.getvalue(), stderr.getvalue()], "errors": {}}
    for arg, kw in (("tp", {"tp": 4}), ("dtype", {"tp": 2, "dtype": "int8"})):
        try:  # guards that fire before any collective, identically on every rank
            parallel.load_model_tp(None, **kw)
        except ValueError as error:
            result["errors"][arg] = str(error)
    for name, case in json.loads(Path(spec).read_text()).items():
        model = parallel.load_model_tp(case["path"], world)
        c = model.config
        local = [c.n_heads, c.n_kv_heads, c.hidden_dim, model.lm_head.out_features,
                 model.new_cache(1, 4).k.shape[3]]
        got = result[name] = {"reads": model.reads, "local": local}
        for label, kw in case["runs"].items():
            got[label] = lsk.generate(model, case["prompts"], max_new_tokens=NEW,
                                      eos_token_id=[], **kw).tokens
        with torch.inference_mode():
            h = torch.randn(5, c.dim, generator=torch.Generator().manual_seed(0))
            got["head"] = {"logits": model.head(h).tolist(),
                           "argmax": model.head_argmax(h).tolist(),
                           "refusal": model.head_refusal(parallel.VocabParallelLinear)}
            got["hooked"] = hooked_head(model, h, case)
    dist.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


def hooked_head(model, h, case):
    """With a forward hook on every rank's lm_head that favours the first token of the last
    rank's rows (a hook the fused head would skip): head_argmax(h), greedy tokens, the
    refusal."""
    import layerskip_kernels as lsk
    from layerskip_kernels.model import parallel
    favoured = model.lm_head.bounds[-1][0]

    def favour(module, args, out, on_this_rank=model.lm_head.start == favoured):
        if on_this_rank:
            out[..., 0] += 1e4
        return out
    hook = model.lm_head.register_forward_hook(favour)
    try:
        return {"favoured": favoured, "argmax": model.head_argmax(h).tolist(),
                "refusal": model.head_refusal(parallel.VocabParallelLinear),
                "tokens": {label: lsk.generate(model, case["prompts"], max_new_tokens=NEW,
                                               eos_token_id=[], **case["runs"][label]).tokens
                           for label in ("ar", "ss")}}
    finally:
        hook.remove()


def _env():
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")


@pytest.fixture(scope="module")
def models(tmp_path_factory, stories_path_or_none):
    """name -> (TP=1 model, path, prompts, runs)."""
    import layerskip_kernels as lsk
    from layerskip_kernels.model import save_hf_directory
    tmp = tmp_path_factory.mktemp("tp_models")
    cases = {"default": (lsk.load_model(), None, DEFAULT_PROMPTS, {**GREEDY, **SAMPLED})}
    for name, (heads, kv, hd, seed) in GQA.items():
        model, path = gqa_llama(heads, kv, hd, seed), tmp / name
        save_sharded(model, path) if kv == 3 else save_hf_directory(model, path)
        runs = {label: {**kw, "exit_layer": 2} if "strategy" in kw and "draft" not in kw
                else kw for label, kw in GREEDY.items()}
        cases[name] = (model, str(path), GQA_PROMPTS, runs)
    if stories_path_or_none is not None:  # llama2.c: loaded whole, then sharded
        cases["stories"] = (lsk.load_model(stories_path_or_none), str(stories_path_or_none),
                            STORIES_PROMPTS, {"ar": {}, "ss": {"strategy": "self_speculative",
                                                               "exit_layer": 3,
                                                               "num_speculations": 3}})
    return cases


@pytest.fixture(scope="module")
def stories_path_or_none():
    from conftest import DATA
    path = DATA / "stories260K.bin"
    return path if path.exists() else None


@pytest.fixture(scope="module")
def expected(models):
    """name -> TP=1 greedy autoregressive tokens (self-speculation is lossless)."""
    return {name: reference(model, prompts) for name, (model, _, prompts, _) in models.items()}


@pytest.fixture(scope="module")
def ranks(models, tmp_path_factory):
    """Both ranks' results (one spawn of 2 gloo processes)."""
    tmp = tmp_path_factory.mktemp("tp_run")
    spec = {name: {"path": path, "prompts": prompts, "runs": runs}
            for name, (_, path, prompts, runs) in models.items()}
    (tmp / "spec.json").write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", __file__, str(tmp / "spec.json"), str(tmp)],
                          env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(2)]


def greedy_margins(model, prompts, outputs):
    """Per generated token: (top-1 - top-2 logit) / std of the logits (full model)."""
    margins = []
    with torch.inference_mode():
        for prompt, output in zip(prompts, outputs):
            logits = model(torch.tensor([prompt + output]))[0, len(prompt) - 1:-1]
            top2 = logits.topk(2, dim=-1).values
            margins += ((top2[:, 0] - top2[:, 1]) / logits.std(-1)).tolist()
    return margins


def reference(model, prompts, **kw):
    import layerskip_kernels as lsk
    return lsk.generate(model, prompts, max_new_tokens=NEW, eos_token_id=[], **kw).tokens


# -- in this process: the plan and the packed keys ---------------------------------------------

@pytest.mark.parametrize("heads,kv,tp,slots", [
    (6, 2, 2, [(0,), (1,)]),  # the default model: KV heads split
    (4, 1, 2, [(0,), (0,)]),  # one KV head, replicated on both ranks
    (6, 3, 2, [(0, 0, 1), (1, 2, 2)]),  # uneven straddle: one slot per query head
    (32, 8, 4, [(0, 1), (2, 3), (4, 5), (6, 7)]),  # llama-3-8b at tp 4
    (64, 8, 16, [(i // 2,) for i in range(16)]),  # tp a multiple of the KV heads
])
def test_shard_plan_kv_slots(heads, kv, tp, slots):
    import layerskip_kernels as lsk
    from layerskip_kernels.model.parallel import shard_plan
    c = lsk.LlamaConfig(vocab_size=10, dim=heads * 4, n_heads=heads, n_kv_heads=kv,
                        hidden_dim=4 * tp)
    plans = [shard_plan(c, tp, r) for r in range(tp)]
    assert [p.kv_slots for p in plans] == slots
    for p in plans:  # the local GQA layout maps every local query head to its global KV head
        group, local_group = heads // kv, len(p.q_heads) // len(p.kv_slots)
        assert [p.kv_slots[j // local_group] for j in range(len(p.q_heads))] == [
            q // group for q in p.q_heads]
        assert p.local.n_heads == heads // tp and p.local.n_kv_heads == len(p.kv_slots)
    assert [p.vocab[p.rank] for p in plans][-1][1] == 10


@pytest.mark.parametrize("tp", [4, 5])
def test_shard_plan_names_tp(tp):
    import layerskip_kernels as lsk
    from layerskip_kernels.model.parallel import shard_plan
    c = lsk.LlamaConfig(vocab_size=10, dim=24, n_heads=6, n_kv_heads=2, hidden_dim=20)
    with pytest.raises(ValueError, match="tp: expected a divisor of the model's n_heads=6"):
        shard_plan(c, tp, 0)
    assert shard_plan(c, 2, 1).q_heads == range(3, 6)  # control


def test_packed_keys_order_as_argmax():
    from layerskip_kernels.model.parallel import pack, unpack
    logits = torch.tensor([-3.5, 2.0, 2.0, -0.0, 0.0, float("-inf"), 1e-30, -1e-30, 7.25])
    index = torch.tensor([4, 9, 3, 1, 0, 2, 8, 6, 100])
    keys = pack(logits, index)
    values, back = unpack(keys)
    assert torch.equal(back, index) and torch.equal(values, logits + 0.0)
    order = keys.argsort(descending=True)
    expected = sorted(range(len(index)), key=lambda i: (-logits[i].item(), index[i].item()))
    assert order.tolist() == expected  # logit first, then the lower index
    # The max over "ranks" of their local argmax keys is the global argmax, ties lowest first.
    x = torch.randn(6, 40, generator=torch.Generator().manual_seed(1)).round(decimals=1)
    shards = [pack(*[t.squeeze(-1) for t in (s.max(-1, keepdim=True).values,
                                             s.argmax(-1, keepdim=True) + 10 * i)])
              for i, s in enumerate(x.split(10, dim=-1))]
    assert torch.equal(unpack(torch.stack(shards).amax(0))[1], x.argmax(-1))


def test_checkpoint_names_are_checked(tmp_path):
    """The sharded loader checks the checkpoint's names and shapes from its headers, with the
    whole-model loader's check_checkpoint."""
    from contextlib import ExitStack

    from safetensors.torch import load_file, save_file

    from layerskip_kernels.model import parallel, save_hf_directory
    from layerskip_kernels.model.checkpoint import check_checkpoint
    model = gqa_llama(*GQA["gqa_4q1kv"])
    save_hf_directory(model, tmp_path)
    with ExitStack() as stack:  # control: a checkpoint we wrote passes
        check_checkpoint(model.config, parallel.SafetensorsSource(tmp_path, stack).shapes(), "c")
    state = load_file(tmp_path / "model.safetensors")
    state["model.layers.0.mlp.extra.weight"] = state.pop("model.layers.0.mlp.up_proj.weight")
    save_file(state, tmp_path / "model.safetensors")
    with ExitStack() as stack, pytest.raises(ValueError, match="checkpoint weights: missing "
                                             r"\['layers.0.mlp.up_proj.weight'\], unexpected "
                                             r"\['layers.0.mlp.extra.weight'\]"):
        check_checkpoint(model.config, parallel.SafetensorsSource(tmp_path, stack).shapes(), "c")


def test_tp_outside_a_process_group_is_an_error(monkeypatch):
    from layerskip_kernels.model import parallel
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ValueError, match="tp: expected a process group"):
        parallel.load_model_tp(None, 2)
    assert not hasattr(parallel.load_model_tp(None, 1), "plan")  # control: tp=1, plain Llama


# -- two ranks -----------------------------------------------------------------------------

def test_models_have_no_near_ties(models, expected):
    for name, (model, _, prompts, _) in models.items():
        assert min(greedy_margins(model, prompts, expected[name])) > MARGIN, name
        assert len(set(sum(expected[name], []))) > 5, name  # not one repeated token


@pytest.mark.parametrize("name", ["default", *GQA, "stories"])
@pytest.mark.parametrize("run", list(GREEDY))
def test_greedy_tokens_equal_tp1(ranks, expected, name, run):
    if name not in expected:
        pytest.skip("stories260K.bin is absent")
    if run not in ranks[0][name]:
        pytest.skip(f"{run} is not run on {name}")
    assert ranks[0][name][run] == expected[name] and ranks[1][name][run] == expected[name]


def test_guards_inside_the_process_group(ranks):
    errors = ranks[0]["errors"]
    assert errors["tp"] == "tp: expected the process group's size (2), got 4"
    assert errors["dtype"].startswith("dtype: expected one of")
    assert ranks[1]["errors"] == errors


def test_local_shapes(ranks):
    # [n_heads, n_kv_heads, hidden, vocab rows, cache KV heads] of rank 0 / rank 1
    assert ranks[0]["default"]["local"] == [3, 1, 256, 1024, 1] == ranks[1]["default"]["local"]
    assert ranks[0]["gqa_6q3kv"]["local"] == [3, 3, 64, 51, 3]
    assert ranks[1]["gqa_6q3kv"]["local"] == [3, 3, 64, 50, 3]
    assert ranks[0]["gqa_4q1kv"]["local"][:2] == [2, 1]


@pytest.mark.parametrize("run", list(SAMPLED))
def test_sampling_is_identical_on_every_rank(ranks, run):
    assert ranks[0]["default"][run] == ranks[1]["default"][run]
    assert len(set(sum(ranks[0]["default"][run], []))) > 5  # sampled, not one repeated token


def test_seeded_sampling_reproduces_tp1(ranks, models):
    """Same seed, same gathered logits (to fp32 rounding): TP=1's samples, with no near-ties
    between the draw and a CDF boundary on these prompts."""
    model, _, prompts, _ = models["default"]
    assert ranks[0]["default"]["sampled_ar"] == reference(model, prompts,
                                                          **SAMPLED["sampled_ar"])


@pytest.mark.parametrize("name", ["default", *GQA])
def test_head_argmax_and_logits_match_tp1(ranks, models, name):
    model = models[name][0]
    h = torch.randn(5, model.config.dim, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        logits = model.head(h)
    for got in (ranks[0][name]["head"], ranks[1][name]["head"]):
        assert got == ranks[0][name]["head"]  # identical on both ranks, bit for bit
        torch.testing.assert_close(torch.tensor(got["logits"]), logits)
        assert got["argmax"] == logits.argmax(-1).tolist()


@pytest.mark.parametrize("name", ["default", *GQA])
def test_a_hook_on_the_vocab_parallel_head_is_run(ranks, models, name):
    """Llama.head_refusal's rule, for the vocab-parallel head: with a hook on it, head_argmax
    and greedy decoding (autoregressive and self-speculative) run head() and its hook, so
    every token is the favoured one, on both ranks; without one, the fused head (control)."""
    prompts = models[name][2]
    hooked = ranks[0][name]["hooked"]
    favoured = hooked["favoured"]
    assert favoured > 0  # on the last rank, past the first rank's rows
    for got in (ranks[0][name], ranks[1][name]):
        assert got["hooked"] == hooked
        assert got["head"]["refusal"] is None and got["head"]["argmax"] != [favoured] * 5
    assert hooked["refusal"] == "lm_head has forward hooks"
    assert hooked["argmax"] == [favoured] * 5
    assert hooked["tokens"] == {"ar": [[favoured] * NEW] * len(prompts),
                                "ss": [[favoured] * NEW] * len(prompts)}


def _tensor_bytes(model):
    """name -> bytes of each checkpoint tensor (HF names without "model.")."""
    from layerskip_kernels.model.checkpoint import hf_state_dict
    state = hf_state_dict(model)
    if model.config.tie_embeddings:
        state.pop("lm_head.weight")
    return {n: t.numel() * t.element_size() for n, t in state.items()}


@pytest.mark.parametrize("name,kv_share", [("default", Fraction(1, 2)),
                                           ("gqa_6q3kv", Fraction(2, 3)), ("gqa_4q1kv", 1)])
def test_sharded_loading_reads_each_slice_once(ranks, models, name, kv_share):
    """Every tensor read once per rank, as one slice; a rank's bytes are the replicated
    tensors (embedding, norms) whole, its share of the others (KV: the heads it holds)."""
    sizes, vocab = _tensor_bytes(models[name][0]), models[name][0].config.vocab_size
    rows = (-(-vocab // 2), vocab // 2)  # lm_head rows of rank 0, rank 1 (101: 51, 50)
    kv_share, half = Fraction(kv_share), Fraction(1, 2)
    for rank, got in enumerate(ranks):
        reads = got[name]["reads"]
        assert sorted(n for n, *_ in reads) == sorted(sizes)  # each tensor once
        share = {n: 1 if "norm" in n or n == "embed_tokens.weight"
                 else kv_share if n.endswith(("k_proj.weight", "v_proj.weight"))
                 else Fraction(rows[rank], vocab) if n == "lm_head.weight" else half
                 for n in sizes}
        assert sum(b for *_, b in reads) == sum(sizes[n] * share[n] for n in sizes)
        if kv_share < 1:  # never the whole model
            assert sum(b for *_, b in reads) < 0.8 * sum(sizes.values())


def test_cli_under_torchrun_prints_on_rank0_only(ranks, expected):
    """`layerskip generate --tp 2` on each rank of torchrun: rank 0 prints one JSON object
    (TP=1's tokens) and the stats line; rank 1 prints nothing."""
    (out, err), (out1, err1) = ranks[0]["cli"], ranks[1]["cli"]
    assert out1 == "" and err1 == ""
    lines = out.strip().splitlines()
    assert len(lines) == 1, out
    assert [o["tokens"] for o in json.loads(lines[0])["outputs"]] == expected["default"]
    assert "self_speculative" in err


CLI_ARGS = ["generate", "--tp", "2", "--json", "--eos-token-id", "none", "--max-new-tokens",
            str(NEW), "--strategy", "self_speculative",
            *[a for p in DEFAULT_PROMPTS for a in ("--prompt-ids", " ".join(map(str, p)))]]

if __name__ == "__main__":
    worker(*sys.argv[1:])


def test_a_shard_is_not_exported_as_a_model():
    """hf_state_dict (and so save_hf_directory) refuses a rank's shard: it would write the
    shard's tensors under the whole model's names."""
    from layerskip_kernels.model.checkpoint import hf_state_dict
    from layerskip_kernels.model.llama import Llama, LlamaConfig
    shard = Llama(LlamaConfig(vocab_size=8, dim=8, n_layers=1, n_heads=2, hidden_dim=8))
    shard.global_config = shard.config
    with pytest.raises(ValueError, match="^model: expected a whole model"):
        hf_state_dict(shard)
