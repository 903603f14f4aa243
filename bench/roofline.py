"""GPU roofline of LayerSkip decoding on Llama shapes (random bf16 weights).

For each model shape and batch: ms per autoregressive step, per draft step (layers [0, E) and
the head), per full step over k + 1 positions and per verify pass (ExitDraft.verify: layers
[0, E) on the last draft, layers [E, L) on k + 1 positions, the head on k + 1), each beside its
floor, weight bytes / HBM bandwidth measured in the same run (and weights + KV bytes). Steps
are captured in CUDA graphs and replayed (eager with a note when capture fails).

Projected speedup at acceptance a (Leviathan et al., 2023, i.i.d. acceptance): a round of k
drafts emits (1 - a^(k+1)) / (1 - a) tokens and costs k*c + v full steps, with c = draft / AR
step and v = verify / AR step; Leviathan's formula takes v = 1, ours measures v, and also
reports v_model = (L-E)/L * full(k+1) / full(1) + E/L for comparison.

End to end: generate() itself, greedy autoregressive from --prompt-len random tokens for
--new-tokens tokens, as a user calls it (CUDA graphs replayed, every host step counted): ms
per decoded token beside the same floor, at B = 1 and with a ragged batch of --batches'
largest size (per-row throughput against B = 1).

Measured: generate() on a model whose layers >= E are damped (o_proj and down_proj scaled by
--damp, so the exit agrees with the last layer and acceptance is high), through
layerskip_kernels.benchmark.run_benchmark (interleaved repeats): self-speculative at E and
k in --draft-lengths against our autoregressive, against the projection from this run's
measured c and v at the measured acceptance, and against transformers' generate and
assistant_early_exit on the same weights (--transformers).

    python bench/roofline.py --output roofline.json            # all shapes, a few minutes
    python bench/roofline.py --models llama-3.2-1b --batches 1 --output r.json
"""
import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

SHAPES = {  # the published configs' shapes; rope scaling is left out (it costs nothing per step)
    "llama-3.2-1b": dict(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                         hidden_dim=8192, rope_theta=500000.0, tie_embeddings=True),
    "llama-3-8b": dict(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                       hidden_dim=14336, rope_theta=500000.0),
    "llama-2-7b": dict(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                       hidden_dim=11008),
}
ACCEPTANCES = (0.5, 0.6, 0.7, 0.8, 0.9)


def measure_hbm_bandwidth(device="cuda", nbytes=1 << 30, iters=20):
    """GB/s of a large device-to-device copy, counting bytes read plus bytes written."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / iters)
    del src, dst
    return 2 * nbytes / statistics.median(times) / 1e9


def random_model(shape, device, dtype=torch.bfloat16, max_seq_len=1024, seed=0):
    """A Llama of a named shape (or a LlamaConfig kwargs dict) with N(0, 0.02) weights, built on
    the meta device first so only the dtype's bytes are ever allocated."""
    from layerskip_kernels.model.llama import Llama, LlamaConfig
    config = LlamaConfig(**{**(SHAPES[shape] if isinstance(shape, str) else shape),
                            "max_seq_len": max_seq_len})
    with torch.device("meta"):
        model = Llama(config).to(dtype)
    model.to_empty(device=device)
    if config.tie_embeddings:  # to_empty gives each module a tensor of its own: tie them again
        model.lm_head.weight = model.embed_tokens.weight
    generator = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0, 0.02, generator=generator)
    return model.eval()


def damp_upper_layers(model, exit_layer, factor):
    """Scale what layers >= exit_layer add to the residual stream, so that the exit's logits
    approach the final layer's and self-speculation accepts most drafts."""
    with torch.no_grad():
        for layer in model.layers[exit_layer:]:
            layer.self_attn.o_proj.weight.mul_(factor)
            layer.mlp.down_proj.weight.mul_(factor)


def byte_counts(model, batch, context):
    """Bytes one layer's weights, the head (final norm + lm_head) and one layer's KV reads take."""
    c = model.config
    size = lambda ps: sum(p.numel() * p.element_size() for p in ps)  # noqa: E731
    layer = size(model.layers[0].parameters())
    head = size(model.norm.parameters()) + size(model.lm_head.parameters())
    kv = 2 * batch * context * c.n_kv_heads * c.head_dim * model.embed_tokens.weight.element_size()
    return layer, head, kv


def time_step(fn, graphs, iters, reps=3):
    """Median ms of fn, replayed from a CUDA graph when it captures; (ms, note). Without a GPU
    (the quick tests) it times eager calls on the host clock."""
    if not torch.cuda.is_available():
        fn()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            for _ in range(iters):
                fn()
            times.append((time.perf_counter() - start) * 1e3 / iters)
        return statistics.median(times), "eager (cpu)"
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (and compile Triton kernels) off the capture
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    run, note, graph = fn, "eager", None
    if graphs:
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            run, note = graph.replay, "cuda graph"
        except Exception as error:  # noqa: BLE001 - any capture failure falls back to eager
            torch.cuda.synchronize()
            graph, note = None, f"eager: capture failed ({type(error).__name__}: {error})"[:200]
    run()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / iters)
    del graph
    return statistics.median(times), note


def count_kernels(fn):
    """GPU kernels one eager call of fn launches (torch.profiler); None without a GPU."""
    if not torch.cuda.is_available():
        return None
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type.name == "CUDA"
               and not e.name.startswith(("Memcpy", "Memset")))


def projected_speedup(a, k, c, v=1.0):
    """Tokens per round over the round's cost in full steps (Leviathan et al., i.i.d. a)."""
    return (1 - a ** (k + 1)) / (1 - a) / (k * c + v)


def roofline_case(model, batch, exit_layer, draft_lengths, context, bandwidth, graphs, iters):
    """Each step of generate() on a decode state of `batch` rows holding `context` tokens:
    the rows are masked inactive, so replays redo the same work without advancing."""
    from layerskip_kernels.decoding.autoregressive import decode_step
    from layerskip_kernels.decoding.self_speculative import ExitDraft, greedy_round
    from layerskip_kernels.decoding.state import DecodeState
    c = model.config
    L, E = c.n_layers, exit_layer
    state = DecodeState(model, batch, context + max(draft_lengths) + 1, max(draft_lengths),
                        graphs=False)
    rows = state.rows(batch)
    state.cache.k.normal_(), state.cache.v.normal_(), state.exit_cache.normal_()  # never zeros
    rows.cache_seqlens.fill_(context)
    rows.tokens.random_(0, c.vocab_size)
    drafter = ExitDraft(model, E)
    layer_b, head_b, kv_b = byte_counts(model, batch, context)
    floor = lambda layers, kv, heads: (layers * layer_b + heads * head_b  # noqa: E731
                                       + kv * kv_b) / bandwidth / 1e6
    row = {"batch": batch, "exit_layer": E, "context": context, "weight_bytes_full": L * layer_b + head_b}
    tokens = rows.tokens[:, None].expand(batch, max(draft_lengths) + 1).contiguous()
    # (step, layers whose weights it reads, layers whose KV it reads, heads it reads): a round
    # reads the head once per draft and once for the verify's k + 1 positions.
    steps = {"ar": (lambda: decode_step(model, rows, range(L)), L, L, 1),
             "draft": (lambda: model.head_argmax(drafter.hidden(rows.tokens, 0, rows)), E, E, 1)}
    for k in draft_lengths:
        steps[f"full_k{k}"] = (lambda k=k: model(tokens[:, :k + 1], state.cache,
                                                 rows.cache_seqlens), L, L, 1)
        steps[f"verify_k{k}"] = (lambda k=k: model.head_argmax(drafter.verify(rows.tokens, k,
                                                                              rows)), L, L, 1)
        steps[f"round_k{k}"] = (lambda k=k: greedy_round(drafter, rows, k), L + k * E,
                                L + k * E, k + 1)
    for name, (fn, layers, kv_layers, heads) in steps.items():
        ms, note = time_step(fn, graphs, iters)
        row[f"{name}_ms"] = ms
        row[f"{name}_floor_ms"] = floor(layers, 0, heads)
        row[f"{name}_floor_with_kv_ms"] = floor(layers, kv_layers, heads)
        row[f"{name}_timing"] = note
    row["ar_eager_ms"] = time_step(steps["ar"][0], False, iters)[0]
    ar_kernels, draft_kernels = count_kernels(steps["ar"][0]), count_kernels(steps["draft"][0])
    if ar_kernels is not None:  # the two steps share the embedding and the head
        row["kernels_ar_step"] = ar_kernels
        row["kernels_per_layer"] = (ar_kernels - draft_kernels) / (L - E)
    row["c"] = row["draft_ms"] / row["ar_ms"]
    for k in draft_lengths:
        row[f"v_k{k}"] = row[f"verify_k{k}_ms"] / row["ar_ms"]
        row[f"v_model_k{k}"] = (L - E) / L * row[f"full_k{k}_ms"] / row["ar_ms"] + E / L
        row[f"projected_k{k}"] = {
            str(a): {"leviathan": projected_speedup(a, k, row["c"]),
                     "measured_verify": projected_speedup(a, k, row["c"], row[f"v_k{k}"])}
            for a in ACCEPTANCES}
    return row


def e2e_run(model, batch, prompt_len, new_tokens, bandwidth, ragged=False, seed=1):
    """generate(), greedy autoregressive, as a user runs it: a warm-up call (captures the
    graphs), then the timed call. Decode ms per token excludes the prefill; the floor is the
    weight bytes (+ the KV read at the mean context) over this run's bandwidth."""
    import layerskip_kernels as lsk
    g = torch.Generator().manual_seed(seed)
    lengths = ([prompt_len] * batch if not ragged else
               torch.randint(prompt_len // 2, prompt_len + 1, (batch,), generator=g).tolist())
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist()
               for n in lengths]
    kw = dict(max_new_tokens=new_tokens, eos_token_id=[])
    warm = lsk.generate(model, prompts, **kw)
    res = lsk.generate(model, prompts, **kw)
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    steps = new_tokens - 1  # the first token comes from the prefill
    decode_ms = (res.stats["time_s"] - res.stats["prefill_s"]) * 1e3 / steps
    layer_b, head_b, kv_b = byte_counts(model, batch, prompt_len + new_tokens // 2)
    floor_ms = (model.config.n_layers * (layer_b + kv_b) + head_b) / bandwidth / 1e6
    return {"batch": batch, "ragged": ragged, "prompt_lengths": lengths,
            "new_tokens": new_tokens, "tokens_per_s": res.stats["tokens_per_s"],
            "decode_ms_per_step": decode_ms, "prefill_ms": res.stats["prefill_s"] * 1e3,
            "floor_ms": floor_ms, "pct_of_floor": 100 * floor_ms / decode_ms,
            "per_row_tokens_per_s": batch / decode_ms * 1e3, "path": res.stats["path"],
            "capture_s": warm.stats["capture_s"]}


def measured_run(model, exit_layer, draft_lengths, factor, new_tokens, repeats, batch,
                 prompt_len=32, with_transformers=False, steps=None):
    """Damp the upper layers, then time generate() with benchmark.run_benchmark. `steps` (a
    roofline_case row of this batch) turns each measured acceptance into the projection from
    the measured c and v."""
    from layerskip_kernels.benchmark import run_benchmark
    damp_upper_layers(model, exit_layer, factor)
    prompts = torch.randint(0, model.config.vocab_size, (batch, prompt_len),
                            generator=torch.Generator().manual_seed(1)).tolist()
    report = run_benchmark(model, prompts, new_tokens, repeats, warmup=1,
                           exit_layers=[exit_layer], draft_lengths=draft_lengths, speedups=(),
                           with_transformers=with_transformers)
    for row in report["results"]:
        k = row.get("num_speculations")
        if steps and isinstance(k, int) and f"v_k{k}" in steps and row.get("acceptance_rate"):
            row["projected_speedup"] = projected_speedup(
                min(row["acceptance_rate"], 0.999), k, steps["c"], steps[f"v_k{k}"])
            row["pct_of_projection"] = 100 * row["speedup_vs_ours_autoregressive"] / row[
                "projected_speedup"]
    return {"damp": factor, "exit_layer": exit_layer, "batch": batch,
            "timing": "cuda graphs" if torch.cuda.is_available() else "eager",
            **report["settings"], "results": report["results"]}


def parse_ints(text):
    return [int(x) for x in text.split(",") if x]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--models", default=",".join(SHAPES), help=f"comma list of {list(SHAPES)}")
    p.add_argument("--batches", type=parse_ints, default=[1, 8, 32])
    p.add_argument("--draft-lengths", type=parse_ints, default=[2, 4, 8], help="k values")
    p.add_argument("--exit-fraction", type=float, default=0.25, help="E = round(L * this)")
    p.add_argument("--context", type=int, default=512, help="cached tokens per row")
    p.add_argument("--iters", type=int, default=20, help="replays per timing (3 timings)")
    p.add_argument("--no-graphs", action="store_true", help="time eager steps only")
    p.add_argument("--damp", type=float, default=0.01, help="upper-layer scale, measured run")
    p.add_argument("--measured-model", default="llama-3.2-1b", help="'' skips the measured run")
    p.add_argument("--measured-batch", type=int, default=1)
    p.add_argument("--measured-new-tokens", type=int, default=64)
    p.add_argument("--measured-repeats", type=int, default=3)
    p.add_argument("--measured-prompt-len", type=int, default=512)
    p.add_argument("--transformers", action=argparse.BooleanOptionalAction, default=True,
                   help="time transformers' generate and assistant_early_exit in the measured run")
    p.add_argument("--prompt-len", type=int, default=512, help="end-to-end prompt tokens")
    p.add_argument("--new-tokens", type=int, default=128, help="end-to-end new tokens")
    p.add_argument("--no-e2e", action="store_true", help="skip the end-to-end generate() runs")
    p.add_argument("--output", default="roofline.json")
    args = p.parse_args(argv)
    for name in args.models.split(","):
        if name not in SHAPES:
            p.error(f"--models: expected names from {list(SHAPES)}, got {name!r}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("roofline.py needs a CUDA GPU (torch.cuda.is_available() is False): nothing measured")
    from layerskip_kernels.benchmark import machine_info
    torch.manual_seed(0)
    bandwidth = measure_hbm_bandwidth()
    report = {"machine": machine_info(), "hbm_gb_per_s": bandwidth, "settings": vars(args),
              "models": {}, "measured": None}
    write(report, args.output)
    print(f"HBM copy bandwidth: {bandwidth:.0f} GB/s (read + write)", flush=True)
    with torch.inference_mode():
        for name in args.models.split(","):
            start = time.perf_counter()
            longest = max(args.context, args.prompt_len + args.new_tokens,
                          args.measured_prompt_len + args.measured_new_tokens)
            model = random_model(name, "cuda", max_seq_len=longest + max(args.draft_lengths) + 1)
            E = max(1, round(model.config.n_layers * args.exit_fraction))
            rows = [roofline_case(model, b, E, args.draft_lengths, args.context, bandwidth,
                                  not args.no_graphs, args.iters) for b in args.batches]
            e2e = [] if args.no_e2e else [
                e2e_run(model, 1, args.prompt_len, args.new_tokens, bandwidth),
                e2e_run(model, max(args.batches), args.prompt_len, args.new_tokens, bandwidth,
                        ragged=True)]
            report["models"][name] = {"config": SHAPES[name], "rows": rows, "e2e": e2e}
            print(format_rows(name, rows, args.draft_lengths), flush=True)
            print(format_e2e(e2e), flush=True)
            if name == args.measured_model:  # last use of these weights: damp them in place
                steps = next(r for r in rows if r["batch"] == args.measured_batch) \
                    if args.measured_batch in args.batches else None
                report["measured"] = {"model": name, **measured_run(
                    model, E, args.draft_lengths, args.damp, args.measured_new_tokens,
                    args.measured_repeats, args.measured_batch, args.measured_prompt_len,
                    args.transformers, steps)}
            print(f"[{name}: {time.perf_counter() - start:.0f} s]", flush=True)
            del model
            gc.collect(), torch.cuda.empty_cache()
            write(report, args.output)  # after each model: a run cut short keeps what it did
    if report["measured"]:
        print(format_measured(report["measured"]))
    print(f"wrote {args.output}")


def write(report, path):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=1) + "\n")


def format_rows(name, rows, draft_lengths):
    k = draft_lengths[len(draft_lengths) // 2]
    lines = [f"{name}: ms (floor = weights / bandwidth) ; k = {k} for verify and projection",
             f"{'B':>3} {'E':>3} {'AR':>14} {'AR eager':>8} {'draft':>14} {'verify':>14} "
             f"{'c':>5} {'v':>5} {'v_mod':>5} {'x@0.6':>6} {'x@0.8':>6} {'x@0.9':>6} "
             f"{'kernels/layer':>13}"]
    for r in rows:
        pair = lambda s: f"{r[s + '_ms']:.2f} ({r[s + '_floor_ms']:.2f})"  # noqa: E731
        proj = r[f"projected_k{k}"]
        lines.append(f"{r['batch']:>3} {r['exit_layer']:>3} {pair('ar'):>14} "
                     f"{r['ar_eager_ms']:8.2f} {pair('draft'):>14} {pair(f'verify_k{k}'):>14} "
                     f"{r['c']:5.2f} {r[f'v_k{k}']:5.2f} {r[f'v_model_k{k}']:5.2f} "
                     + " ".join(f"{proj[a]['measured_verify']:6.2f}" for a in ("0.6", "0.8", "0.9"))
                     + f" {r.get('kernels_per_layer', float('nan')):13.1f}")
    notes = {r[key] for r in rows for key in r if key.endswith("_timing")}
    return "\n".join(lines + [f"  timing: {', '.join(sorted(notes))}"])


def format_e2e(rows):
    lines = ["  end to end, generate() autoregressive (ms per decoded token, floor, % of floor):"]
    for r in rows:
        lines.append(f"  B={r['batch']}{' ragged' if r['ragged'] else ''}: "
                     f"{r['decode_ms_per_step']:.2f} ms ({r['floor_ms']:.2f}, "
                     f"{r['pct_of_floor']:.0f}%), {r['per_row_tokens_per_s']:.0f} tok/s per row, "
                     f"prefill {r['prefill_ms']:.0f} ms, capture {r['capture_s']:.1f} s, {r['path']}")
    return "\n".join(lines)


def format_measured(m):
    lines = [f"measured ({m['model']}, layers >= {m['exit_layer']} damped x{m['damp']}, "
             f"batch {m['batch']}, {m['timing']}):"]
    for r in m["results"]:
        projection = (f"  {r['pct_of_projection']:.0f}% of x{r['projected_speedup']:.2f}"
                      if "projected_speedup" in r else "")
        hf = r.get("speedup_vs_transformers_generate")
        lines.append(f"  {r['name']:<45} {r['tokens_per_s']:8.1f} tok/s  x{r['speedup_vs_ours_autoregressive']:.2f}"
                     f"  accept {r.get('acceptance_rate', float('nan')):.2f}"
                     f"  exact {r['same_tokens_as_autoregressive']}"
                     + (f"  x{hf:.2f} vs HF generate" if hf else "") + projection)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
