"""The lm-evaluation-harness model `layerskip` on local tasks (a task YAML over JSON lines in
tmp_path, nothing from the hub): its rolling log-likelihood is eval-exits' perplexity at every
exit, generate_until is lsk.generate with the task's stops, and loglikelihood is the model's
own. Skips when the [eval] extra (lm-eval) is absent."""
import json
import math
import os
import sys

import pytest
import torch

pytest.importorskip("lm_eval")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import layerskip_kernels as lsk  # noqa: E402
from layerskip_kernels.integrations.lm_eval_model import LayerSkipLM  # noqa: E402
from layerskip_kernels.training.evaluate import evaluate_exits  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402

STORY = ("Once upon a time, there was a little girl named Lily. She loved to play outside in "
         "the park. One day, she saw a big, red ball.")


@pytest.fixture
def stories_lm(stories_path, stories_tokenizer_path):
    def make(**kwargs):
        return LayerSkipLM(pretrained=str(stories_path), tokenizer=str(stories_tokenizer_path),
                           **kwargs)
    return make


def instance(request_type, args, i=0):
    return Instance(request_type=request_type, doc={}, arguments=args, idx=i)


@pytest.mark.parametrize("exit_layer", [1, 2, 3, 4, 5])
def test_rolling_perplexity_is_eval_exits_perplexity(stories_lm, exit_layer):
    """One text, one window: exp(-loglikelihood / tokens) at exit E (E = 5: the full model)
    is evaluate_exits' perplexity at E on the BOS-led tokens of the same text."""
    lm = (stories_lm() if exit_layer == 5
          else stories_lm(strategy="early_exit", exit_layer=exit_layer))
    tokens = lm.tokenizer.encode(STORY)  # BOS first
    [loglikelihood] = lm.loglikelihood_rolling([instance("loglikelihood_rolling", (STORY,))])
    exits = evaluate_exits(lm.model, torch.tensor(tokens), seq_len=len(tokens) - 1)
    assert exits["tokens"] == len(tokens) - 1
    expected = exits["exits"][exit_layer - 1]["perplexity"]
    assert math.exp(-loglikelihood / (len(tokens) - 1)) == pytest.approx(expected, rel=1e-5)


def test_rolling_windows_cover_a_long_text(stories_lm):
    """A text longer than max_seq_len is scored in lm-eval's disjoint windows: every token
    once, each window a forward of its own."""
    lm = stories_lm()
    text = " ".join([STORY] * 12)
    tokens = lm.tok_encode(text, add_special_tokens=False)
    assert len(tokens) > lm.max_length
    [total] = lm.loglikelihood_rolling([instance("loglikelihood_rolling", (text,))])
    windows = (len(tokens) + lm.max_length - 1) // lm.max_length
    head = lm.loglikelihood_rolling([instance("loglikelihood_rolling",
                                              (lm.tok_decode(tokens[:lm.max_length]),))])[0]
    assert windows >= 2 and total < head < 0


@pytest.mark.parametrize("batch_size", [1, 3])
def test_loglikelihood_is_the_models_own(stories_lm, batch_size):
    """loglikelihood(context, continuation): the sum of the model's log-probabilities of the
    continuation's tokens, and whether each is the argmax; batching changes nothing."""
    lm = stories_lm(batch_size=batch_size)
    pairs = [("Once upon a time", " there was a girl"), ("The dog", " ran"),
             ("Lily saw a big", " red ball."), ("", "Once upon a time")]
    results = lm.loglikelihood([instance("loglikelihood", p, i) for i, p in enumerate(pairs)])
    model, tok = lm.model, lm.tokenizer
    for (context, continuation), (ll, greedy) in zip(pairs, results):
        whole = tok.encode(context + continuation)
        n = len(whole) - len(tok.encode(context)) if context else len(whole) - 1
        logprobs = torch.log_softmax(model(torch.tensor([whole[:-1]]))[0], -1)
        want = sum(logprobs[i - 1, whole[i]].item() for i in range(len(whole) - n, len(whole)))
        assert ll == pytest.approx(want, rel=1e-5, abs=1e-5)
        assert greedy == all(logprobs[i - 1].argmax().item() == whole[i]
                             for i in range(len(whole) - n, len(whole)))


@pytest.mark.parametrize("settings", [dict(strategy="autoregressive"),
                                      dict(strategy="early_exit", exit_layer=3),
                                      dict(strategy="self_speculative", exit_layer=2,
                                           num_speculations=3),
                                      dict(strategy="layer_skip", speedup=1.5)])
def test_generate_until_is_generate_with_the_stops(stories_lm, settings):
    lm = stories_lm(batch_size=2, **settings)
    contexts = ["Once upon a time", "The cat sat", "Tom had a toy car"]
    until = {"until": [".", " big"], "max_gen_toks": 40}
    got = lm.generate_until([instance("generate_until", (c, until), i)
                             for i, c in enumerate(contexts)])
    tok = lm.tokenizer
    want = lsk.generate(lm.model, [tok.encode(c) for c in contexts], max_new_tokens=40,
                        stop=[".", " big"], tokenizer=tok, eos_token_id=[tok.bos_id, tok.eos_id],
                        **settings).texts
    assert got == want
    assert all("." not in text for text in got)


def test_bad_gen_kwargs_and_batch_size(stories_lm):
    lm = stories_lm()
    with pytest.raises(ValueError, match="gen_kwargs"):
        lm.generate_until([instance("generate_until", ("Once", {"num_beams": 4}))])
    with pytest.raises(ValueError, match="batch_size"):
        stories_lm(batch_size="auto")
    with pytest.raises(ValueError, match="exit_layer"):
        stories_lm(strategy="early_exit", exit_layer=5)


def _task(tmp_path, name, output_type, rows, extra):
    data = tmp_path / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  cache_dir: {tmp_path / 'hf'}\n"
        f"  data_files:\n    test: {data}\ntest_split: test\noutput_type: {output_type}\n"
        f"{extra}")


def test_simple_evaluate_on_local_tasks(stories_lm, tmp_path):
    """lm-eval runs its own pipeline over local tasks: generation scored with exact match
    against our own greedy continuation (so 1.0), and perplexity from rolling windows."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    lm = stories_lm(strategy="early_exit", exit_layer=4)
    prompts = ["Once upon a time", "The dog was"]
    tok = lm.tokenizer
    own = lsk.generate(lm.model, [tok.encode(p) for p in prompts], max_new_tokens=24,
                       stop=["."], tokenizer=tok, strategy="early_exit", exit_layer=4,
                       eos_token_id=[tok.bos_id, tok.eos_id]).texts
    _task(tmp_path, "ls_continue", "generate_until",
          [{"prompt": p, "reference": o} for p, o in zip(prompts, own)],
          'doc_to_text: "{{prompt}}"\ndoc_to_target: "{{reference}}"\n'
          'target_delimiter: ""\ngeneration_kwargs:\n  until: ["."]\n  max_gen_toks: 24\n'
          "  do_sample: false\nmetric_list:\n  - metric: exact_match\n")
    _task(tmp_path, "ls_perplexity", "loglikelihood_rolling", [{"text": STORY}],
          'doc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n'
          "  - metric: word_perplexity\n")
    results = lm_eval.simple_evaluate(model=lm, tasks=["ls_continue", "ls_perplexity"],
                                      task_manager=TaskManager(include_path=str(tmp_path),
                                                                include_defaults=False))
    assert results["results"]["ls_continue"]["exact_match,none"] == 1.0
    [ll] = lm.loglikelihood_rolling([instance("loglikelihood_rolling", (STORY,))])
    words = len(STORY.split())
    assert results["results"]["ls_perplexity"]["word_perplexity,none"] == pytest.approx(
        math.exp(-ll / words), rel=1e-6)


def test_registered_as_layerskip():
    from lm_eval.api.registry import get_model
    assert get_model("layerskip") is LayerSkipLM


def test_layerskip_lm_eval_hands_every_argument_to_lm_eval(monkeypatch):
    """`layerskip lm-eval ARGS`: lm-eval's command line gets ARGS untouched (argparse keeps
    off them), with `layerskip` registered."""
    import lm_eval.__main__
    from lm_eval.api.registry import get_model

    from layerskip_kernels.cli import main
    monkeypatch.setattr(sys, "argv", sys.argv[:])  # lm-eval's command line reads sys.argv
    seen = []
    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate",
                        lambda: seen.append((sys.argv[:], get_model("layerskip"))))
    args = ["--model", "layerskip", "--model_args", "pretrained=x,exit_layer=2", "--tasks", "t"]
    assert main(["lm-eval", *args]) == 0
    assert seen == [(["lm-eval", *args], LayerSkipLM)]
