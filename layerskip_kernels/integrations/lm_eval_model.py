"""The lm-evaluation-harness model `layerskip`: a thin adapter over load_model, load_tokenizer,
generate and the model's layers.

    layerskip lm-eval --model layerskip --model_args pretrained=DIR,strategy=early_exit,exit_layer=8 \
        --tasks ...
    python -m layerskip_kernels.integrations.lm_eval_model --model layerskip ...  # the same

lm-eval 0.4.13 reads no entry points, so the harness knows `layerskip` only once this module
is imported: the commands above import it, then run lm-eval's own command line. In Python:

    import lm_eval
    from layerskip_kernels.integrations.lm_eval_model import LayerSkipLM  # registers it
    lm_eval.simple_evaluate(model="layerskip", model_args="pretrained=DIR", tasks=[...])

loglikelihood and loglikelihood_rolling score with the layers the strategy decodes with
(early_exit: layers [0, E); layer_skip: its kept layers; autoregressive and the lossless
self_speculative: all), batched over requests; generate_until runs lsk.generate with the
strategy's arguments and the task's stop strings (`until`)."""
import logging
import sys
from types import SimpleNamespace
from importlib.metadata import PackageNotFoundError, version

LM_EVAL_VERSIONS = ((0, 4, 13), (0, 5))  # [lowest, first unsupported): what this was written for


def _check_lm_eval():
    try:
        found = version("lm_eval")
    except PackageNotFoundError:
        raise ImportError("layerskip's lm-eval model needs lm-eval (pip install "
                          "'layerskip-kernels[eval]')") from None
    parts = tuple(int(p) for p in found.split(".")[:3] if p.isdigit())
    low, high = LM_EVAL_VERSIONS
    if not low <= parts < high:
        raise ImportError(f"layerskip's lm-eval model was written for lm-eval >=0.4.13,<0.5, "
                          f"found lm-eval {found} (pip install 'lm-eval>=0.4.13,<0.5')")


_check_lm_eval()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lm_eval import utils  # noqa: E402
from lm_eval.api.model import TemplateLM  # noqa: E402
from lm_eval.api.registry import register_model  # noqa: E402

from .. import generate, load_model  # noqa: E402
from ..cli_checks import draft_slots, find_tokenizer, stop_tokens  # noqa: E402
from ..decoding.generate import STRATEGIES  # noqa: E402
from ..decoding.layer_skip import kept_layers  # noqa: E402
from ..ops._checks import check, fail  # noqa: E402

GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p")


def _batch_size(value):
    """lm-eval passes --batch_size as given (a string from its CLI); 'auto' is not supported."""
    try:
        size = int(value)
    except (TypeError, ValueError):
        size = 0
    check(size >= 1, "batch_size", "an integer >= 1 ('auto' is not supported)", repr(value))
    return size


def _device(device):
    """lm-eval's command line asks for cuda:0 unless told otherwise: on a machine without
    CUDA that means the CPU, as lm-eval's own hf model takes it (with a warning)."""
    if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
        if device is not None:
            logging.getLogger(__name__).warning("device=%s: no CUDA device, using the CPU",
                                                device)
        return "cpu"
    return device


@register_model("layerskip")
class LayerSkipLM(TemplateLM):
    """pretrained: what load_model takes (None: the embedded default model); tokenizer: a path
    (default: tokenizer.json beside the model); strategy, exit_layer, num_speculations,
    speedup, draft: as generate() takes them; dtype, device, backend: as load_model takes
    them; batch_size: requests per forward or generate() call; max_gen_toks: new tokens when
    a task sets none."""

    def __init__(self, pretrained=None, tokenizer=None, strategy="autoregressive",
                 exit_layer=None, num_speculations=None, speedup=None, draft=None,
                 dtype="float32", device="cpu", backend="auto", batch_size=1,
                 max_batch_size=None, max_gen_toks=256):
        super().__init__()
        if strategy not in STRATEGIES:
            fail("strategy", f"one of {STRATEGIES}", strategy)
        self.model = load_model(pretrained, dtype=dtype, device=_device(device),
                                backend=backend)
        self.tokenizer, _ = find_tokenizer(SimpleNamespace(tokenizer=tokenizer,
                                                           model=pretrained))
        if self.tokenizer is None:
            fail("tokenizer", f"a tokenizer path (no tokenizer.json beside {pretrained})", None)
        self.decoding = {"strategy": strategy, "exit_layer": exit_layer,
                         "num_speculations": num_speculations, "speedup": speedup,
                         **({"draft": draft} if draft else {})}
        self.layers = self._scoring_layers(strategy, exit_layer, speedup, draft)
        self.eos = stop_tokens(SimpleNamespace(eos_token_id=None), self.model, self.tokenizer)
        self.batch_size = _batch_size(batch_size)
        self.max_gen_toks = max_gen_toks
        self._device = self.model.embed_tokens.weight.device

    def _scoring_layers(self, strategy, exit_layer, speedup, draft):
        c = self.model.config
        if strategy == "early_exit":
            exit_layer = exit_layer or c.exit_layer
            check(isinstance(exit_layer, int) and 1 <= exit_layer < c.n_layers, "exit_layer",
                  f"an integer in [1, {c.n_layers - 1}] with strategy=early_exit", exit_layer)
            return range(exit_layer)
        if strategy == "layer_skip":
            check(isinstance(speedup, (int, float)) and speedup >= 1, "speedup",
                  "a number >= 1 with strategy=layer_skip", speedup)
            return kept_layers(c.n_layers, speedup)
        return range(c.n_layers)

    # -- what TemplateLM asks of a model ------------------------------------------------------

    @property
    def eot_token_id(self):
        """The first end-of-text token generation stops on; BOS for a model that has none."""
        eos = self.model.config.eos_token_id if self.eos is None else self.eos
        eos = [eos] if isinstance(eos, int) else eos or []
        return eos[0] if eos else self.prefix_token_id

    @property
    def prefix_token_id(self):
        return self.tokenizer.bos_id

    @property
    def max_length(self):
        return self.model.config.max_seq_len

    @property
    def tokenizer_name(self):
        return type(self.tokenizer).__name__

    def tok_encode(self, string, add_special_tokens=None, **kwargs):
        """BOS first unless add_special_tokens is False: our models are trained on BOS-led
        texts (the harness adds its prefix token itself where it passes False)."""
        return self.tokenizer.encode(string, bos=add_special_tokens is not False)

    def tok_decode(self, tokens, **kwargs):
        return self.tokenizer.decode(tokens)

    @torch.no_grad()
    def _logprobs(self, inputs):
        """Log-softmax (B, S, vocab) of a right-padded batch of token lists, through the
        strategy's layers (right padding never reaches an earlier position: attention is
        causal)."""
        width = max(len(t) for t in inputs)
        batch = torch.zeros(len(inputs), width, dtype=torch.long, device=self._device)
        for row, tokens in enumerate(inputs):
            batch[row, :len(tokens)] = torch.tensor(tokens, device=self._device)
        h = self.model.run_layers(self.model.embed_tokens(batch), self.layers)
        return F.log_softmax(self.model.head(h).float(), dim=-1)

    def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
        """(sum of the continuation's log-probabilities, whether it is the greedy one) of each
        (key, context, continuation) request, in batches of batch_size; a sequence longer
        than max_length keeps its last max_length + 1 tokens."""
        results = []
        for first in range(0, len(requests), self.batch_size):
            chunk = requests[first:first + self.batch_size]
            inputs = [(context + continuation)[-(self.max_length + 1):][:-1]
                      for _, context, continuation in chunk]
            logprobs = self._logprobs(inputs)
            for row, (key, _, continuation) in enumerate(chunk):
                n = len(continuation)
                scored = logprobs[row, len(inputs[row]) - n:len(inputs[row])]
                target = torch.tensor(continuation, device=self._device)
                answer = (scored.gather(-1, target[:, None]).sum().item(),
                          bool((scored.argmax(-1) == target).all()))
                results.append(answer)
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, answer)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        """The whole text's log-likelihood after the prefix token (BOS), in lm-eval's
        disjoint rolling windows of max_length tokens."""
        results = []
        for (text,) in [r.args for r in requests]:
            windows = [(None, *utils.make_disjoint_window(w))
                       for w in utils.get_rolling_token_windows(
                           token_list=self.tok_encode(text, add_special_tokens=False),
                           prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                           context_len=1)]
            total = sum(ll for ll, _ in self._loglikelihood_tokens(windows))
            results.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return results

    def generate_until(self, requests, disable_tqdm=False):
        """lsk.generate over the contexts, batch_size at a time among requests of the same
        generation arguments, stopping at the task's `until` strings (the text cut before
        them) and at the model's end-of-text tokens; greedy unless the task samples."""
        outputs = [None] * len(requests)
        groups = {}
        for i, request in enumerate(requests):
            context, gen_kwargs = request.args
            groups.setdefault(repr(sorted(gen_kwargs.items())), []).append(i)
        for indices in groups.values():
            gen_kwargs = requests[indices[0]].args[1]
            settings = self._generation_settings(gen_kwargs)
            reserve = (self.model.config.max_seq_len - settings["max_new_tokens"]
                       - draft_slots(self.model, self.decoding["strategy"],
                                     self.decoding["num_speculations"]))
            check(reserve >= 1, "max_gen_toks", "fewer new tokens than the model's "
                  f"max_seq_len ({self.model.config.max_seq_len})", settings["max_new_tokens"])
            for first in range(0, len(indices), self.batch_size):
                chunk = indices[first:first + self.batch_size]
                prompts = [self.tok_encode(requests[i].args[0])[-reserve:] for i in chunk]
                result = generate(self.model, prompts, tokenizer=self.tokenizer,
                                  eos_token_id=self.eos, **self.decoding, **settings)
                for i, text in zip(chunk, result.texts):
                    outputs[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return outputs

    def _generation_settings(self, gen_kwargs):
        unknown = sorted(set(gen_kwargs) - set(GEN_KWARGS))
        if unknown:
            fail("gen_kwargs", f"only {', '.join(GEN_KWARGS)}", unknown)
        until = gen_kwargs.get("until") or None
        temperature = float(gen_kwargs.get("temperature", 0.0))
        if not gen_kwargs.get("do_sample", temperature > 0):
            temperature = 0.0
        settings = {"max_new_tokens": int(gen_kwargs.get("max_gen_toks", self.max_gen_toks)),
                    "stop": [until] if isinstance(until, str) else until,
                    "temperature": temperature}
        if temperature > 0:
            settings.update(top_k=int(gen_kwargs.get("top_k", 0)),
                            top_p=float(gen_kwargs.get("top_p", 1.0)))
        return settings


def main(argv=None):
    """lm-eval's own command line, with `layerskip` registered."""
    from lm_eval.__main__ import cli_evaluate
    sys.argv = ["lm-eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()


if __name__ == "__main__":
    main()
