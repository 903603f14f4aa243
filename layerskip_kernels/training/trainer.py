"""The LayerSkip trainer: layer dropout + early-exit loss, AdamW with warmup and cosine decay,
gradient clipping, bf16 autocast on a GPU, and checkpoints that resume bit-identically.

A checkpoint directory is a Hugging Face Llama directory (config.json + model.safetensors,
loadable by lsk.load_model) plus trainer_state.safetensors (optimizer moments, RNG states)
and trainer_state.json (step, config). No pickle anywhere.
"""
import dataclasses
import json
import math
import os
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..files import atomic_path, check_replaceable, write_bytes, write_text
from ..model import Llama, LlamaConfig, load_model, load_tokenizer, save_hf_directory
from ..model.checkpoint import MAX_POSITIONS, read_json_object, regular_file
from ..model.tokenizer import Llama2cTokenizer
from ..ops._checks import check
from ..ops.llama_layer import check_num_threads
from .early_exit_loss import early_exit_loss, enabled_exits, exit_scales
from .layer_dropout import dropout_rates, run_layers_with_dropout

STATE_TENSORS, STATE_JSON = "trainer_state.safetensors", "trainer_state.json"
# What a checkpoint directory holds (save_hf_directory's two files, the trainer state, the
# tokenizer copied beside them): the names `train` checks before it starts.
CHECKPOINT_FILES = ("config.json", "model.safetensors", STATE_TENSORS, STATE_JSON,
                    "tokenizer.json")
# Training holds float32 weights, their gradients and AdamW's two moments: 16 bytes a parameter.
TRAINING_BYTES_PER_PARAMETER = 16


@dataclass
class TrainConfig:
    data: str = ""                    # a text file
    tokenizer: str | None = None      # default: the model directory's tokenizer.json
    model: str | None = None          # a checkpoint to continue from; None: a new model ...
    model_config: dict = field(default_factory=dict)  # ... from these LlamaConfig fields
    output: str = "runs/layerskip"
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 1000
    lr: float = 3e-4
    min_lr_ratio: float = 0.1         # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0            # 0: off
    seed: int = 0
    p_max: float = 0.1                # layer dropout at the last layer (at the end of training)
    dropout_depth: str = "exp"        # D(l): exp | linear | uniform
    dropout_time: str = "constant"    # S(t): constant (continual) | exp (from scratch)
    exit_scale: str = "sum"           # sum | linear | uniform
    exit_weights: list | None = None  # per-exit weights replacing exit_scale's (one per layer)
    exit_curriculum: str = "none"     # none | rotational | gradual
    rotation: int = 2                 # R of the rotational curriculum
    save_every: int = 0               # 0: only at the end
    log_every: int = 10               # unused: tqdm paces its bar (kept for old configs)
    device: str = "cpu"
    threads: int | None = None        # torch CPU threads (None: torch's choice)

    def __post_init__(self):
        self.betas = tuple(self.betas)
        for name in ("seq_len", "batch_size", "steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)!r}")
        if self.threads is not None:
            check_num_threads(self.threads, "threads")


def load_config(path, **overrides):
    """A TrainConfig from a .json or .toml file; keyword overrides win (None is ignored)."""
    path = Path(path)
    text = path.read_text()
    raw = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    raw.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    if unknown := sorted(set(raw) - known):
        raise ValueError(f"config {path}: unknown keys {unknown} (expected some of {sorted(known)})")
    return TrainConfig(**raw)


def new_model(model_config, seed=0):
    """A freshly initialised Llama: N(0, 0.02) weights, residual projections scaled by
    1/sqrt(2L) (GPT-2), unit norms. The global RNG is left as it was. model_config is checked
    first (check_model_config): nothing is allocated for a model too large to train here."""
    config = check_model_config(model_config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Llama(config)
        for name, p in model.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * config.n_layers) if name.endswith(
                    ("o_proj.weight", "down_proj.weight")) else 0.02
                torch.nn.init.normal_(p, std=std)
    return model


def check_model_config(model_config):
    """The LlamaConfig of a TrainConfig's model_config, checked before anything is allocated:
    known keys, every size an integer >= 1 (max_seq_len at most MAX_POSITIONS), and a training
    state (TRAINING_BYTES_PER_PARAMETER) within this machine's memory; errors name the key."""
    check(isinstance(model_config, dict), "model_config", "a table of LlamaConfig fields",
          type(model_config).__name__)
    known = {f.name for f in dataclasses.fields(LlamaConfig)}
    check(set(model_config) <= known, "model_config", f"keys among {sorted(known)}",
          sorted(set(model_config) - known))
    sizes = {"vocab_size": None, "dim": None, "n_layers": None, "n_heads": None,
             "n_kv_heads": None, "head_dim": None, "hidden_dim": None,
             "max_seq_len": MAX_POSITIONS}  # the integer keys and their bounds
    for key, high in sizes.items():
        value = model_config.get(key)
        if value is not None or key not in ("n_kv_heads", "head_dim"):  # None: derived
            value = getattr(LlamaConfig, key) if key not in model_config else value
            check(type(value) is int and value >= 1 and (high is None or value <= high),
                  f"model_config {key}", "an integer >= 1" + (f" and <= {high}" if high else ""),
                  repr(value))
    c = LlamaConfig(**model_config)
    per_layer = (c.dim * (c.n_heads + 2 * c.n_kv_heads) * c.head_dim + c.n_heads * c.head_dim
                 * c.dim + 3 * c.dim * c.hidden_dim + 2 * c.dim)  # qkv, o, gate-up-down, norms
    parameters = c.vocab_size * c.dim * (1 if c.tie_embeddings else 2) + c.n_layers * per_layer
    needed, memory = parameters * TRAINING_BYTES_PER_PARAMETER, _memory_bytes()
    if memory is not None and needed > memory:
        raise ValueError(
            f"model_config: expected a model whose training state ({TRAINING_BYTES_PER_PARAMETER}"
            f" bytes a parameter) fits this machine's {memory / 2**30:.1f} GiB of memory, got "
            f"{parameters:,} parameters ({needed / 2**30:,.1f} GiB) from vocab_size "
            f"{c.vocab_size}, dim {c.dim}, n_layers {c.n_layers}, hidden_dim {c.hidden_dim}")
    return c


def _memory_bytes():
    """The machine's physical memory in bytes, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return None


def tokenize_text(tokenizer, text):
    """Token ids of a text file as one int64 tensor. llama2.c tokenizers (quadratic merges)
    encode line by line, each line with BOS; others encode the whole text after one BOS."""
    if isinstance(tokenizer, Llama2cTokenizer):
        ids = [i for line in text.splitlines() if line.strip() for i in tokenizer.encode(line)]
    else:
        ids = tokenizer.encode(text)
    return torch.tensor(ids, dtype=torch.long)


def sample_windows(tokens, seq_len, batch_size, generator):
    """(batch_size, seq_len + 1) random contiguous windows of tokens: inputs and targets."""
    if len(tokens) < seq_len + 1:
        raise ValueError(f"data: expected at least seq_len + 1 = {seq_len + 1} tokens, "
                         f"got {len(tokens)}")
    starts = torch.randint(0, len(tokens) - seq_len, (batch_size,), generator=generator)
    return torch.stack([tokens[s:s + seq_len + 1] for s in starts.tolist()])


def lr_at(config, step):
    """Linear warmup to config.lr, then cosine decay to lr * min_lr_ratio at the last step."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(config.steps - config.warmup_steps, 1)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine)


class Trainer:
    """Trains `model` on `tokens` (a 1-D tensor of ids) with the LayerSkip recipe."""

    def __init__(self, model, tokens, config: TrainConfig):
        self.config, self.tokens = config, tokens
        self.device = torch.device(config.device)
        self.model = model.to(self.device).train().requires_grad_(True)
        if config.seq_len > model.config.max_seq_len:
            raise ValueError(f"seq_len: expected <= the model's max_seq_len "
                             f"{model.config.max_seq_len}, got {config.seq_len}")
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": config.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=config.lr, betas=config.betas, foreach=False)
        self.data_generator = torch.Generator().manual_seed(config.seed)
        self.dropout_generator = torch.Generator().manual_seed(config.seed + 1)
        self.step = 0
        self.history = []  # one dict per step: step, lr, loss, exits {layer: CE}

    def train_step(self):
        c, model = self.config, self.model
        n_layers = model.config.n_layers
        batch = sample_windows(self.tokens, c.seq_len, c.batch_size, self.data_generator)
        batch = batch.to(self.device)
        rates = dropout_rates(n_layers, c.p_max, self.step, c.steps, c.dropout_depth,
                              c.dropout_time)
        enabled = enabled_exits(n_layers, self.step, c.steps, c.exit_curriculum, c.rotation)
        scales = exit_scales(n_layers, c.exit_scale, enabled, c.exit_weights)
        lr = lr_at(c, self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            h = F.embedding(batch[:, :-1], model.embed_tokens.weight)
            exits = {l for l, on in enumerate(enabled) if on}
            _, hidden = run_layers_with_dropout(model, h, rates, self.dropout_generator, exits)
            loss, per_exit = early_exit_loss(model, hidden, batch[:, 1:], scales)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if c.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), c.grad_clip, foreach=False)
        self.optimizer.step()
        record = {"step": self.step, "lr": lr, "loss": loss.item(),
                  "exits": {l: v.item() for l, v in per_exit.items()}}
        self.history.append(record)
        self.step += 1
        return record

    def train(self, steps=None, progress=True):
        """Run until `steps` more steps (default: to config.steps), saving every save_every."""
        c = self.config
        end = c.steps if steps is None else min(self.step + steps, c.steps)
        bar = _Progress(self.step, end, enabled=progress)
        try:
            while self.step < end:
                bar.update(self.train_step())
                if c.save_every and self.step % c.save_every == 0 and self.step < c.steps:
                    self.save(c.output)
        finally:
            bar.close()  # before any error is printed
        return self.history

    def save(self, path):
        """The model (HF layout), then the optimizer, RNG and step beside it, each file through
        files.atomic_path; every name is checked before the first is written."""
        path = Path(path)
        for name in CHECKPOINT_FILES:
            check_replaceable(path / name)
        save_hf_directory(self.model, path)
        tensors = {"rng.data": self.data_generator.get_state(),
                   "rng.dropout": self.dropout_generator.get_state()}
        state = self.optimizer.state_dict()
        for index, moments in state["state"].items():
            for key, value in moments.items():
                tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().contiguous()
        with atomic_path(path / STATE_TENSORS) as tmp:
            save_file(tensors, tmp)
        groups = [{k: v for k, v in g.items() if k != "params"} | {"params": g["params"]}
                  for g in state["param_groups"]]
        meta = {"step": self.step, "param_groups": groups,
                "config": dataclasses.asdict(self.config)}
        write_text(path / STATE_JSON, json.dumps(meta, indent=2) + "\n")

    def load_state(self, path):
        """Continue from a checkpoint written by save() (the model must hold its weights).
        Both state files must be regular files (a FIFO would block the read), and the step
        an integer >= 0."""
        path = Path(path)
        meta = read_json_object(path / STATE_JSON, STATE_JSON)
        step = meta.get("step")
        check(type(step) is int and step >= 0, f"{path / STATE_JSON} step", "an integer >= 0",
              repr(step))
        tensors = load_file(regular_file(path / STATE_TENSORS, STATE_TENSORS))
        self.data_generator.set_state(tensors.pop("rng.data"))
        self.dropout_generator.set_state(tensors.pop("rng.dropout"))
        moments = {}
        for key, value in tensors.items():
            _, index, name = key.split(".", 2)
            moments.setdefault(int(index), {})[name] = value.to(self.device)
        for group in meta["param_groups"]:
            group["betas"] = tuple(group["betas"])
        self.optimizer.load_state_dict({"state": moments, "param_groups": meta["param_groups"]})
        self.step = step


class _Progress:
    """A tqdm bar on stderr (which handles a non-terminal stderr and the ETA) showing the loss of
    each exit; nothing when disabled."""

    def __init__(self, start, end, enabled=True):
        from tqdm import tqdm
        self.exits = {}
        self.bar = tqdm(initial=start, total=end, file=sys.stderr, dynamic_ncols=True,
                        disable=not enabled)

    def update(self, record):
        self.exits.update(record["exits"])  # curricula train some exits only: show the latest
        if not self.bar.disable:
            self.bar.set_postfix_str(f"loss {record['loss']:.3f} | " + " ".join(
                f"e{l + 1} {v:.2f}" for l, v in sorted(self.exits.items())), refresh=False)
        self.bar.update(1)

    def close(self):
        self.bar.close()


def run_training(config: TrainConfig, progress=True):
    """`layerskip train`: build or load the model, resume from config.output if it holds a
    trainer state, train, save. Returns the Trainer."""
    if config.threads:
        torch.set_num_threads(config.threads)
    output = Path(config.output)
    resuming = (output / STATE_JSON).exists()
    source = output if resuming else config.model
    tokenizer_path = config.tokenizer or (
        str(Path(source) / "tokenizer.json") if source and Path(source).is_dir() else None)
    if tokenizer_path is None:
        raise ValueError("tokenizer: expected a path (the model has no tokenizer.json), got None")
    tokenizer = load_tokenizer(tokenizer_path)
    tokens = tokenize_text(tokenizer, regular_file(Path(config.data), "data").read_text())
    if source is not None:
        model = load_model(source)
    else:
        model = new_model({"vocab_size": tokenizer.vocab_size, **config.model_config}, config.seed)
    trainer = Trainer(model, tokens, config)
    if resuming:
        trainer.load_state(output)
        print(f"resuming {output} at step {trainer.step}", file=sys.stderr)
    trainer.train(progress=progress)
    trainer.save(output)
    if Path(tokenizer_path).name == "tokenizer.json" and Path(tokenizer_path).parent != output:
        write_bytes(output / "tokenizer.json", Path(tokenizer_path).read_bytes())
    return trainer
