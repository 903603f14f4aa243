"""What each lossy speedup costs on a task: `layerskip eval` on two continuation tasks built at
run time (neither file is committed: they come from the CPython standard library and from
../shared/data), with the report and plots written to --output.

- default model (embedded, LayerSkip-trained on stdlib code): held-out Python line
  completion. The prompt is the start of a function from a module held out of training
  (bench/train_default_model.stdlib_files(20)): its first half, dedented, at most 12 lines,
  and the first words of its next line; the reference is the rest of that line; generation
  stops at the end of the line.
- stories260K (llama2.c, not LayerSkip-trained): TinyStories continuation. The prompt is the
  first two sentences of a paragraph of ../shared/data/tinystories_val.txt, the reference the
  third sentence without its final punctuation; generation stops at a sentence's end.

    python bench/task_eval_report.py --output bench/results/task_eval --threads 2

Writes DIR/{default_model,stories260K}.json (eval's report, its per-example outputs left
out), DIR/{default_model,stories260K}.png (ROUGE-L against speedup) and DIR/report.md.
"""
import argparse
import ast
import itertools
import json
import re
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from layerskip_kernels.cli import main
from layerskip_kernels.files import write_text
from layerskip_kernels.task_eval import format_table

sys.path.insert(0, str(Path(__file__).parent))
from train_default_model import read, stdlib_files  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def python_lines(n, most_lines=12):
    """n (prompt, reference) pairs: the first half of a held-out function (at most
    most_lines lines, dedented) and the start of its next line, up to the last space in that
    line's first half; the reference is the rest of the line. Cutting before a space keeps
    the prompt's last token as the tokenizer makes it in running code (its pre-tokenizer
    puts a space with the word after it), where a prompt ending in a newline would not be
    (a newline and the next line's indentation are one token). Lines without such a space,
    and comments, are skipped; the modules take turns (each one's first function, then each
    one's second...)."""
    _, heldout, _ = stdlib_files(20)
    per_module = []
    for path in heldout:
        try:
            tree = ast.parse(read(path))
        except SyntaxError:
            continue
        lines, examples = read(path).splitlines(), []
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            body = textwrap.dedent("\n".join(lines[node.lineno - 1:node.end_lineno])).split("\n")
            cut = min(most_lines, len(body) // 2)
            line = body[cut]
            indent = len(line) - len(line.lstrip())
            space = line.rfind(" ", indent, indent + (len(line) - indent) // 2 + 1)
            if cut < 2 or space <= indent or line.lstrip().startswith("#"):
                continue
            examples.append({"prompt": "\n".join(body[:cut] + [line[:space]]),
                             "reference": line[space:]})
        per_module.append(examples)
    turns = itertools.zip_longest(*per_module)
    return [e for turn in turns for e in turn if e is not None][:n]


def story_sentences(n):
    """n (prompt, reference) pairs: two sentences of a paragraph, then its third without its
    final punctuation (the stop strings end generation before it)."""
    text = (DATA / "tinystories_val.txt").read_text()
    examples = []
    for paragraph in text.split("\n\n"):
        sentences = re.split(r"(?<=[.!?])\s+", paragraph.strip())
        if len(sentences) < 3 or sentences[2][-1:] not in ".!?":
            continue
        examples.append({"prompt": " ".join(sentences[:2]),
                         "reference": " " + sentences[2][:-1]})
        if len(examples) == n:
            break
    return examples


TASKS = {
    "default_model": dict(examples=python_lines, model=None, tokenizer=None, stop=["\\n"],
                          max_new_tokens=48,
                          what="held-out stdlib Python, next line of a function"),
    "stories260K": dict(examples=story_sentences, model=DATA / "stories260K.bin",
                        tokenizer=DATA / "tok512.bin", stop=[".", "!", "?", "\\n"],
                        max_new_tokens=48, what="TinyStories validation, next sentence"),
}


def run_task(name, task, args, scratch):
    data = scratch / f"{name}.jsonl"
    examples = task["examples"](args.examples)
    data.write_text("".join(json.dumps(e) + "\n" for e in examples))
    out, png = args.output / f"{name}.json", args.output / f"{name}.png"
    argv = ["eval", "--data", data, "--output", out, "--plot", png, "--overwrite",
            "--max-new-tokens", task["max_new_tokens"], "--repeats", args.repeats,
            "--warmup", args.warmup]
    argv += [a for s in task["stop"] for a in ("--stop", s)]
    argv += ["--model", task["model"]] if task["model"] else []
    argv += ["--tokenizer", task["tokenizer"]] if task["tokenizer"] else []
    argv += ["--threads", args.threads] if args.threads else []
    start = time.perf_counter()
    main(argv)
    seconds = time.perf_counter() - start
    report = json.loads(out.read_text())
    report.pop("examples")  # the prompts are rebuilt by this script; see its docstring
    report["settings"].update(data=task["what"], wall_s=round(seconds, 1),
                              command="python bench/task_eval_report.py " + " ".join(sys.argv[1:]))
    write_text(out, json.dumps(report, indent=1) + "\n")
    return report, seconds


def main_report():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--examples", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int)
    p.add_argument("--tasks", default=",".join(TASKS))
    args = p.parse_args()
    sections = []
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.tasks.split(","):
            report, seconds = run_task(name, TASKS[name], args, Path(scratch))
            s = report["settings"]
            sections += [f"## {name}: {s['data']}", "",
                         f"{s['examples']} examples, at most {s['max_new_tokens']} new tokens, "
                         f"stops {s['stop']}, greedy, batch size {s['batch_size']}, "
                         f"{s['repeats']} timed repeats after {s['warmup']} warm-up, "
                         f"{report['kernel_threads']} kernel threads; the whole eval took {seconds:.0f} s.",
                         "", "```", format_table(report), "```", "",
                         f"![ROUGE-L against speedup]({name}.png)", ""]
    machine = report["machine"]
    text = "\n".join([
        "# Task quality against speedup (`layerskip eval`)", "",
        f"Machine: {machine['processor'] or machine['platform']}, {machine['cpu_count']} CPUs, "
        f"commit {machine['commit']}, {machine['date']}. The machine was shared with other "
        "developers' jobs while this ran: absolute times are inflated (tokens/s deflated) by "
        "that load, which changed from second to second (see the min-max spreads in the JSON); "
        "the speedups are ratios of medians of interleaved runs in one process.", "",
        "Columns: `tokens`, new tokens over all examples; `x tok/s`, the speedup over "
        "autoregressive decoding in tokens/s (as `bench`); `x time`, in wall time on the same "
        "examples (stop strings let a lossy configuration write more or fewer tokens; the plots "
        "use this one); `same as AR`, every output equal to the autoregressive one.", "",
        f"Scores: {report['metrics']}.", "",
        "Reproduce: `" + report["settings"]["command"] + "`", "", *sections])
    write_text(args.output / "report.md", text)


if __name__ == "__main__":
    main_report()
