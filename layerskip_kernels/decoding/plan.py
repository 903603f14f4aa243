"""A generate() call planned: its arguments checked, in a fixed order, and resolved against the
model's config once, before any work (no allocation, no model call). The plan says what the
call decodes and with which layers, makes the policy the self-speculative rounds ask for
their drafter and k, and names the drafting in stats."""
from dataclasses import dataclass

from ..ops._checks import as_float, as_int, fail
from .arguments import check_applicable, check_prompts, check_sampling, prompt_lists, stop_ids
from .layer_skip import kept_layers
from .estimates import candidate_exits, candidate_ks, recall, remember
from .policy import AdaptivePolicy, FixedPolicy
from .self_speculative import ExitDraft, SkipDraft
from .stop import check_stop

STRATEGIES = ("autoregressive", "early_exit", "self_speculative", "layer_skip")
DRAFTS = ("early_exit", "layer_skip")
AUTO_DRAFT_CAP = 8  # num_speculations="auto": the longest a round may draft
AUTO_CONFIDENCE = 0.5  # ... and it stops once no row's draft is this sure of its token
DEFAULT_NUM_SPECULATIONS = 4  # self_speculative on a model that recommends no k


def default_exit_layer(n_layers):
    """self_speculative's exit layer on a model that recommends none: a quarter of the depth."""
    return max(1, n_layers // 4)


@dataclass(frozen=True)
class Plan:
    """What a generate() call does, every default resolved (plan_generation makes it)."""
    strategy: str
    draft: str | None  # self_speculative's drafter: "early_exit" or "layer_skip"; else None
    prompts: list  # each prompt's token ids, a list
    max_new_tokens: int
    stop_ids: frozenset  # a row ends after one of these tokens ...
    stop: list | None  # ... or after the token that completes one of these strings
    temperature: float  # 0: greedy
    top_k: int
    top_p: float
    seed: int | None
    cuda_graphs: bool | None  # None: replay captured steps where the device can
    exit_layer: int | str | None  # early exit's, or the drafter's; "auto": chosen per round
    num_speculations: int | None  # self_speculative: k, or the longest k a round may draft
    ks: tuple | None  # self_speculative: the draft lengths a round may draft
    confidence: float | None  # num_speculations="auto": a round stops drafting when unsure
    speedup: float | None  # layer skipping's target ...
    kept: tuple | None  # ... and the layers it keeps (strategy or draft layer_skip)
    prefill_layers: range  # the layers the prompt runs ...
    decode_layers: range | tuple  # ... and a plain step (autoregressive, early_exit, layer_skip)
    defaulted: tuple  # the arguments given neither by the caller nor by the model's config
    exits: tuple | None  # exit_layer="auto": the exits the policy may draft from ...
    recommended: tuple | None  # ... and the model's (E, k) it starts at, if any

    @property
    def sampling(self):
        return self.temperature, self.top_k, self.top_p

    @property
    def reserve(self):
        """Cache slots past the output that a self-speculative round may fill (k + 1)."""
        return 0 if self.num_speculations is None else self.num_speculations + 1

    def policy(self, model, rows):
        """The self-speculative call's policy (policy.py): the adaptive one for
        exit_layer="auto" (starting from what the model's last such call of `rows` rows
        learned: recall), else the fixed drafter and k."""
        if self.exit_layer == "auto":
            return AdaptivePolicy(lambda e: ExitDraft(model, e), model.config.n_layers,
                                  self.exits, self.ks, self.recommended, self.confidence,
                                  shadow=self.shadows, learned=recall(model, self.shape(rows)))
        return FixedPolicy(ExitDraft(model, self.exit_layer) if self.draft == "early_exit"
                           else SkipDraft(model, self.kept), self.num_speculations)

    def remember(self, model, rows, policy):
        """Keep what an adaptive policy learned for the model's next call of this shape."""
        if self.exit_layer == "auto":
            remember(model, self.shape(rows), policy.learned())

    @property
    def shadows(self):
        """Whether the call's rounds can shadow: greedy fixed-k rounds only (a sampled token
        or a confidence-stopped round has no full-model argmax run to compare exits with:
        decode_self_speculative)."""
        return self.temperature == 0 and self.confidence is None

    def shape(self, rows):
        """What an adaptive call's statistics depend on: its options, whether rounds shadow,
        and its rows (a round's cost grows with them)."""
        return (self.exits, self.ks, self.recommended, self.confidence, self.shadows, rows)

    def stats(self):
        """The drafting as stats name it (self_speculative; else nothing): exit_layer (None
        for a layer-skip draft), num_speculations ("auto" when confidence-stopped, "per round"
        when the policy chooses k) and what was defaulted."""
        if self.strategy != "self_speculative":
            return {}
        return {"exit_layer": self.exit_layer,
                "num_speculations": "auto" if self.confidence else (
                    "per round" if len(self.ks) > 1 else self.num_speculations),
                "defaulted": list(self.defaulted)}


def draft_lengths(config, num_speculations, adaptive=False):
    """(ks, k, confidence, defaulted) of a self-speculative call: the draft lengths its rounds
    may draft (with adaptive, exit_layer="auto", and no num_speculations: the policy's
    candidates), the longest, the confidence that stops a round's drafting
    (num_speculations="auto") and ["num_speculations"] where it fell back to
    DEFAULT_NUM_SPECULATIONS."""
    if adaptive and num_speculations is None:  # the policy chooses k per round
        ks = tuple(candidate_ks(config.num_speculations, AUTO_DRAFT_CAP))
        return ks, max(ks), None, []
    defaulted, confidence = [], None
    if num_speculations is None:
        num_speculations = config.num_speculations
    if num_speculations is None:
        num_speculations = DEFAULT_NUM_SPECULATIONS
        defaulted.append("num_speculations")
    if isinstance(num_speculations, str) and num_speculations == "auto":
        num_speculations, confidence = AUTO_DRAFT_CAP, AUTO_CONFIDENCE
    try:
        num_speculations = as_int("num_speculations", num_speculations, low=1)
    except ValueError:
        fail("num_speculations", "an integer >= 1 or 'auto'", num_speculations)
    return (num_speculations,), num_speculations, confidence, defaulted


def plan_generation(config, prompts, max_new_tokens=128, strategy="autoregressive",
                    exit_layer=None, num_speculations=None, speedup=None, temperature=0.0,
                    top_k=0, top_p=1.0, seed=None, eos_token_id=None, draft=None, stream=None,
                    cuda_graphs=None, attention_mask=None, stop=None, tokenizer=None):
    """The Plan of generate(model, ...) with model.config `config`: generate()'s arguments
    (stream and tokenizer only checked), or the ValueError of the first one that is wrong."""
    if strategy not in STRATEGIES:
        fail("strategy", f"one of {STRATEGIES}", strategy)
    if draft is not None and draft not in DRAFTS:
        fail("draft", f"None or one of {DRAFTS}", draft)
    temperature, top_k, top_p, seed = check_sampling(temperature, top_k, top_p, seed)
    check_applicable(strategy, draft, temperature, {
        "draft": draft, "exit_layer": exit_layer, "num_speculations": num_speculations,
        "speedup": speedup, "top_k": top_k or None, "top_p": None if top_p == 1 else top_p,
        "seed": seed})
    max_new_tokens = as_int("max_new_tokens", max_new_tokens, low=1)
    if stream is not None and not callable(stream):
        fail("stream", "None or a callable stream(row, tokens)", stream)
    if cuda_graphs is not None and not isinstance(cuda_graphs, bool):
        fail("cuda_graphs", "None, True or False", cuda_graphs)
    prompts = prompt_lists(prompts, attention_mask)
    stop = check_stop(stop, tokenizer)
    stops = frozenset(stop_ids(config, eos_token_id))
    speculative = strategy == "self_speculative"
    draft = (draft or "early_exit") if speculative else None
    adaptive = speculative and isinstance(exit_layer, str) and exit_layer == "auto"
    ks, defaulted, confidence, exits, recommended, kept = None, [], None, None, None, None
    if speculative:
        ks, num_speculations, confidence, defaulted = draft_lengths(config, num_speculations,
                                                                    adaptive)
    if adaptive:
        exits = tuple(candidate_exits(config.n_layers, config.exit_layer))
        if config.exit_layer:
            recommended = (config.exit_layer, config.num_speculations
                           if config.num_speculations in ks else max(ks))
    elif strategy == "early_exit" or draft == "early_exit":
        exit_layer = config.exit_layer if exit_layer is None else exit_layer
        if exit_layer is None and speculative and config.n_layers > 1:
            exit_layer = default_exit_layer(config.n_layers)
            defaulted.append("exit_layer")
        exit_layer = as_int("exit_layer", exit_layer, 1, config.n_layers - 1)
    if strategy == "layer_skip" or draft == "layer_skip":
        speedup = as_float("speedup", speedup, "a finite number >= 1", lambda r: r >= 1)
        kept = tuple(kept_layers(config.n_layers, speedup))
    prefill_layers = range(exit_layer) if strategy == "early_exit" else range(config.n_layers)
    plan = Plan(strategy=strategy, draft=draft, prompts=prompts, max_new_tokens=max_new_tokens,
                stop_ids=stops, stop=stop, temperature=temperature, top_k=top_k, top_p=top_p,
                seed=seed, cuda_graphs=cuda_graphs, exit_layer=exit_layer,
                num_speculations=num_speculations, ks=ks, confidence=confidence,
                speedup=speedup, kept=kept, prefill_layers=prefill_layers,
                decode_layers=kept if strategy == "layer_skip" else prefill_layers,
                defaulted=tuple(defaulted), exits=exits, recommended=recommended)
    check_prompts(config, plan.prompts, plan.max_new_tokens, plan.reserve)
    return plan
