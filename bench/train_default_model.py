"""Experiment B: pretrain the default model from scratch with the LayerSkip recipe.

A small GQA Llama and a byte-level BPE tokenizer (trained here with `tokenizers`), both on the
Python source of the CPython standard library found at run time (sysconfig), with a fixed
set of modules held out. Recipe: layer dropout (exp depth schedule, exp time curriculum, as
the paper does from scratch) and the early-exit loss through the shared head. After
training, the held-out code picks the recommended exit layer and draft length by measuring
greedy self-speculative decoding, and they are written into config.json ("layerskip").

    python bench/train_default_model.py --output runs/default_model --threads 2
    python bench/train_default_model.py --output /tmp/tiny --steps 30 --dim 64 --layers 4 \
        --heads 4 --hidden 128 --vocab 512 --seq-len 64 --batch-size 4   # smoke test

At the defaults training stops after at most 3000 steps or what --minutes 50 allows
(measured after 10 steps); pass --minutes 0 and --steps N to reproduce a run exactly.
--init-from DIR continues a checkpoint instead (its tokenizer and shape; layer dropout with a
constant time schedule, as in continual pretraining), e.g. with other --exit-weights.

The (E, k) recommended in config.json is the fastest exact pair of a sweep timed as
`layerskip sweep --batch-size 1` times it (benchmark.run_benchmark: each held-out prompt
decoded alone, interleaved repeats, medians).

Writes to --output: config.json + model.safetensors (lsk.load_model), tokenizer.json,
trainer_state.* (resume by running the same command again), history.json (the per-step
training losses; bench/default_model_report.py plots them), report.json and report.md.
"""
import argparse
import json
import platform
import sys
import sysconfig
import time
from pathlib import Path

import torch

import layerskip_kernels as lsk
from layerskip_kernels.benchmark import machine_info, run_benchmark
from layerskip_kernels.model import save_hf_directory
from layerskip_kernels.training import (TrainConfig, Trainer, evaluate_exits, format_table,
                                        new_model, plot_exits)
from layerskip_kernels.sweep import best_pair, sweep_rows
from layerskip_kernels.training.trainer import STATE_JSON

SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
             "lib2to3", "turtledemo", "idlelib", "tkinter", "ensurepip", "encodings"}


def stdlib_files(heldout_every):
    """(train, held-out) lists of the standard library's .py files, in a fixed order; every
    `heldout_every`-th file (sorted by path) is held out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py")
                   if not SKIP_DIRS & set(p.relative_to(root).parts[:-1])
                   and not p.name.startswith("test_"))
    heldout = files[heldout_every // 2::heldout_every]
    held = set(heldout)
    return [p for p in files if p not in held], heldout, root


def read(path):
    return path.read_text(encoding="utf-8", errors="replace")


def train_tokenizer(files, vocab_size, path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator((read(p) for p in files), trainer)
    tok.save(str(path))
    return lsk.load_tokenizer(path)


def token_stream(tokenizer, files):
    """BOS + ids of each file, concatenated into one int64 tensor."""
    encodings = tokenizer.tokenizer.encode_batch([read(p) for p in files])
    ids = []
    for e in encodings:
        ids.append(tokenizer.bos_id)
        ids.extend(e.ids)
    return torch.tensor(ids, dtype=torch.long)


def held_out_prompts(tokenizer, files, n, prompt_tokens):
    """The first prompt_tokens tokens of the first n held-out files long enough to have them
    (a license header is skipped by starting after the module docstring when there is one)."""
    prompts = []
    for p in files:
        text = read(p)
        start = text.find('"""', text.find('"""') + 3) + 3 if text.lstrip().startswith('"""') else 0
        ids = tokenizer.encode(text[start:].lstrip())
        if len(ids) >= prompt_tokens + 64:
            prompts.append(ids[:prompt_tokens])
        if len(prompts) == n:
            break
    return prompts


def choose_exit(model, prompts, args):
    """Time autoregressive and each (exit layer, draft length), each prompt decoded alone, as
    `layerskip sweep --batch-size 1` does; the fastest exact pair wins."""
    report = run_benchmark(model, prompts, args.max_new_tokens, repeats=args.repeats, warmup=1,
                           exit_layers=list(range(1, model.config.n_layers)),
                           draft_lengths=args.speculations, speedups=(),
                           with_transformers=False, batch_size=1)
    rows = [{"exit_layer": e, "num_speculations": k, "acceptance": r["acceptance_rate"],
             "tokens_per_s": r["tokens_per_s"], "speedup": r["speedup_vs_ours_autoregressive"],
             "speedup_min": r["speedup_vs_ours_autoregressive_min"],
             "speedup_max": r["speedup_vs_ours_autoregressive_max"],
             "same_tokens": r["same_tokens_as_autoregressive"],
             "speedup_if_all_accepted": r["speedup_if_all_accepted"]}
            for (e, k), r in sweep_rows(report).items() if k != "auto"]
    best = best_pair(report)
    best = next(r for r in rows if (r["exit_layer"], r["num_speculations"]) ==
                (best["exit_layer"], best["num_speculations"]))
    return report["results"][0]["tokens_per_s"], rows, best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", default="runs/default_model")
    p.add_argument("--init-from", help="continue this checkpoint directory instead of a new "
                   "model (continual pretraining: constant layer-dropout schedule)")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--dim", type=int, default=192)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--p-max", type=float, default=0.2)
    p.add_argument("--exit-weights", type=lambda t: [float(x) for x in t.split(",")],
                   help="per-exit loss weights, one per layer (comma list), replacing the "
                   "paper's depth-quadratic scales, e.g. to favour the exit to draft from")
    p.add_argument("--exit-curriculum", default="rotational")
    p.add_argument("--rotation", type=int, default=2)
    p.add_argument("--heldout-every", type=int, default=20, help="hold out every N-th module")
    p.add_argument("--eval-windows", type=int, default=64)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--speculations", type=int, nargs="+", default=[2, 3, 4, 6])
    p.add_argument("--repeats", type=int, default=3, help="timed repeats of the sweep")
    p.add_argument("--minutes", type=float, default=50, help="training time budget: after 10 steps, cut "
                   "--steps to what fits (the schedules follow the new length)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="CPU threads (torch's and the C++ kernels')")
    p.add_argument("--save-every", type=int, default=200)
    args = p.parse_args(argv)
    if args.threads:
        lsk.set_num_threads(args.threads)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()

    train_files, heldout_files, root = stdlib_files(args.heldout_every)
    tokenizer_path = out / "tokenizer.json"
    if args.init_from and not tokenizer_path.exists():
        tokenizer_path.write_bytes((Path(args.init_from) / "tokenizer.json").read_bytes())
    if tokenizer_path.exists():  # resuming or continuing: the tokenizer must stay the same
        tokenizer = lsk.load_tokenizer(tokenizer_path)
    else:
        tokenizer = train_tokenizer(train_files, args.vocab, tokenizer_path)
    train_tokens = token_stream(tokenizer, train_files)
    eval_tokens = token_stream(tokenizer, heldout_files)
    print(f"stdlib {root}: {len(train_files)} train files ({len(train_tokens)} tokens), "
          f"{len(heldout_files)} held out ({len(eval_tokens)} tokens), "
          f"{time.time() - started:.0f} s", file=sys.stderr)

    config = TrainConfig(
        output=str(out), seq_len=args.seq_len, batch_size=args.batch_size, steps=args.steps,
        lr=args.lr, warmup_steps=min(args.warmup, args.steps // 10 + 1), seed=args.seed,
        p_max=args.p_max, dropout_depth="exp",
        dropout_time="constant" if args.init_from else "exp", exit_scale="sum",
        exit_weights=args.exit_weights,
        exit_curriculum=args.exit_curriculum, rotation=args.rotation,
        save_every=args.save_every, threads=args.threads)
    resuming = (out / STATE_JSON).exists()
    if resuming:
        model = lsk.load_model(out)
    elif args.init_from:
        model = lsk.load_model(args.init_from).train().requires_grad_(True)
    else:
        model = new_model(dict(
            vocab_size=tokenizer.vocab_size, dim=args.dim, n_layers=args.layers,
            n_heads=args.heads, n_kv_heads=args.kv_heads, hidden_dim=args.hidden,
            max_seq_len=max(1024, args.seq_len), tie_embeddings=True, norm_eps=1e-5,
            bos_token_id=tokenizer.bos_id, eos_token_id=[]), seed=args.seed)
    trainer = Trainer(model, train_tokens, config)
    if resuming:
        trainer.load_state(out)
    train_start, first_step = time.time(), trainer.step
    if args.minutes and trainer.step < config.steps:
        trainer.train(steps=10)
        rate = (trainer.step - first_step) / (time.time() - train_start)
        config.steps = max(trainer.step, min(config.steps, int(rate * args.minutes * 60)))
        print(f"{rate:.3f} steps/s: training {config.steps} steps", file=sys.stderr)
    trainer.train()
    train_s = time.time() - train_start
    steps_per_s = (trainer.step - first_step) / max(train_s, 1e-9)
    trainer.save(out)
    (out / "history.json").write_text(json.dumps(trainer.history) + "\n")  # the training curve

    model = lsk.load_model(out)
    exits = evaluate_exits(model, eval_tokens, seq_len=args.seq_len, max_windows=args.eval_windows)
    prompts = held_out_prompts(tokenizer, heldout_files, args.prompts, args.prompt_tokens)
    ar_tps, sweep, best = choose_exit(model, prompts, args)
    model.config.exit_layer, model.config.num_speculations = best["exit_layer"], best["num_speculations"]
    save_hf_directory(model, out)

    weights = {p.data_ptr(): p for p in model.parameters()}.values()
    report = {
        "experiment": "B: LayerSkip pretraining from scratch on the CPython stdlib",
        "command": " ".join([sys.executable, *sys.argv]),
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "threads": torch.get_num_threads()},
        "commit": machine_info()["commit"], "args": vars(args),
        "data": {"stdlib": str(root), "train_files": len(train_files),
                 "heldout_files": [str(p.relative_to(root)) for p in heldout_files],
                 "train_tokens": len(train_tokens), "heldout_tokens": len(eval_tokens)},
        "parameters": sum(p.numel() for p in weights),
        "weights_bytes": (out / "model.safetensors").stat().st_size,
        "training": {"steps": trainer.step, "seconds": train_s, "steps_per_s": steps_per_s,
                     "tokens_per_s": steps_per_s * args.batch_size * args.seq_len,
                     "first_loss": trainer.history[0]["loss"] if trainer.history else None,
                     "last_loss": trainer.history[-1]["loss"] if trainer.history else None},
        "exits": exits, "autoregressive_tokens_per_s": ar_tps, "sweep": sweep,
        "recommended": best, "total_seconds": time.time() - started,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    sweep_md = ["| E | k | acceptance | tokens/s | speedup (min-max) | if all accepted | same tokens |",
                "| ---: | ---: | ---: | ---: | ---: | ---: | :---: |"]
    sweep_md += [f"| {r['exit_layer']} | {r['num_speculations']} | {100 * r['acceptance']:.1f}% "
                 f"| {r['tokens_per_s']:.1f} | {r['speedup']:.2f}x ({r['speedup_min']:.2f}-"
                 f"{r['speedup_max']:.2f}) | {r['speedup_if_all_accepted']:.2f}x "
                 f"| {r['same_tokens']} |" for r in sweep]
    (out / "report.md").write_text("\n".join([
        "# The default model: LayerSkip " + ("continued" if args.init_from else
                                               "pretrained from scratch"), "",
        f"`{report['command']}`", "",
        f"{report['parameters']} parameters, {report['weights_bytes'] / 1e6:.1f} MB; "
        f"{trainer.step} steps, {steps_per_s:.3f} steps/s; autoregressive {ar_tps:.1f} tokens/s", "",
        format_table(exits, "Held-out stdlib code, per exit"), "",
        f"### Greedy self-speculative decoding on held-out prompts (each alone, "
        f"{args.max_new_tokens} new tokens, {torch.get_num_threads()} threads)", "", *sweep_md, "",
        "\"if all accepted\": the speedup had the same rounds accepted all k drafts, speedup x "
        "(k + 1) / (1 + acceptance x k); a better-trained exit cannot beat it at that (E, k).", "",
        f"Recommended: exit_layer {best['exit_layer']}, num_speculations "
        f"{best['num_speculations']} ({best['speedup']:.2f}x, acceptance "
        f"{100 * best['acceptance']:.1f}%)", ""]))
    try:
        plot_exits({"default model": exits}, out / "exits.png")
    except RuntimeError as error:
        print(f"no plot: {error}", file=sys.stderr)
    print((out / "report.md").read_text())



if __name__ == "__main__":
    main()
