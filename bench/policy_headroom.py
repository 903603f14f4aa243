"""How much a per-round choice of (E, k) could gain over the best fixed pair, on this machine:
a trace-driven replay of self-speculative rounds, measured against real ones.

Greedy self-speculation is deterministic given two things, and this measures both:
- per exit E and per generated position t, whether exit E's token at t equals the full
  model's (the agreement trace) and how sure exit E is there (its largest softmax
  probability), from one pass of every layer over each prompt and its autoregressive
  output: a round at t drafting k from E accepts the run of agreements from t, at most k;
- the cost of a round of each (E, k) in autoregressive steps, timed by generate() in
  interleaved repeats (decode seconds / rounds over the step's, median).
A policy's speedup is then its tokens over the summed costs of its replayed rounds. The
fixed pairs' replayed speeds are printed beside their measured ones (the check that the
replay is faithful), with an oracle that knows each round's run of agreements (the ceiling
of any policy), and rules a policy could run: a confidence stop (the draft stops once its
probability, or the product of its probabilities, falls below a threshold; after a
rejection the replay uses the true context's confidence) and a draft length that follows
the last round (longer after a round whose drafts were all accepted).

    python bench/policy_headroom.py --prompts bench/results/default_model/heldout_prompts.json
    python bench/policy_headroom.py --model ../shared/data/stories260K.bin --exits 1,2,3,4
"""
import argparse
import json
import os
import statistics

import torch

import layerskip_kernels as lsk


def traces(model, prompts, max_new_tokens):
    """[{exit: (agreements, confidences)}] per prompt, over its max_new_tokens generated
    positions; exits 1..L-1."""
    L, out = model.config.n_layers, []
    with torch.inference_mode():
        for prompt in prompts:
            new = lsk.generate(model, [prompt], max_new_tokens, eos_token_id=[]).tokens[0]
            hidden = {}

            def keep(i, run, h):
                hidden[i + 1] = run(h)
                return hidden[i + 1]

            ids = torch.tensor([prompt + new])
            model.run_layers(model.embed_tokens(ids), range(L), each=keep)
            first = len(prompt) - 1  # the position whose next token is new[0]
            span = slice(first, first + max_new_tokens)
            full = model.head(hidden[L][0, span]).argmax(-1)
            assert full.tolist() == new, "the full pass disagrees with generate()"
            row = {}
            for e in range(1, L):
                probs = model.head(hidden[e][0, span]).softmax(-1)
                row[e] = ((probs.argmax(-1) == full).tolist(), probs.amax(-1).tolist())
            out.append(row)
    return out


def round_costs(model, prompts, max_new_tokens, pairs, repeats):
    """{(E, k): a round's cost in autoregressive steps}, and the measured speedup of each
    pair: generate() on each prompt alone, every configuration back to back within a repeat,
    each round's host seconds (decode seconds / rounds) over the same prompt's and repeat's
    autoregressive step (the machine drifts: only ratios taken side by side mean anything),
    medians over prompts and repeats, after one warm-up repeat."""
    configs = [(None, {})] + [((e, k), {"strategy": "self_speculative", "exit_layer": e,
                                       "num_speculations": k}) for e, k in pairs]
    per_round = {c: [] for c, _ in configs}
    ratios = {c: [] for c, _ in configs}
    for rep in range(repeats + 1):
        for prompt in prompts:
            seconds, rounds = {}, {}
            for c, kw in configs:
                s = lsk.generate(model, [prompt], max_new_tokens, eos_token_id=[], **kw).stats
                seconds[c] = s["time_s"] - s["prefill_s"]
                rounds[c] = s.get("rounds", max_new_tokens - 1)
            if rep:
                step = seconds[None] / rounds[None]
                for c in seconds:
                    per_round[c].append(seconds[c] / rounds[c] / step)
                    ratios[c].append(seconds[None] / seconds[c])
    return ({c: statistics.median(v) for c, v in per_round.items()},
            {c: statistics.median(v) for c, v in ratios.items()})


def up_to(ks, k):
    """The least of ks at least k (the largest of ks when none is)."""
    return min((x for x in ks if x >= k), default=ks[-1])


def replay(trace, cost, choose):
    """Seconds to generate the trace's tokens with choose(t, history) -> (E, k) rounds
    (history: the (E, k, accepted) of the rounds before)."""
    n, t, seconds, history = len(next(iter(trace.values()))[0]), 0, 0.0, []
    while t < n:
        e, k = choose(t, history)
        agree = trace[e][0]
        m = 0
        while m < k and t + m < n and agree[t + m]:
            m += 1
        seconds += cost[(e, k)]
        history.append((e, k, m))
        t += m + 1
    return seconds


def speed(all_traces, cost, make_choose):
    """Speedup over autoregressive steps: generated tokens / replayed cost (in steps)."""
    tokens = sum(len(next(iter(tr.values()))[0]) for tr in all_traces)
    return tokens / sum(replay(tr, cost, make_choose(tr)) for tr in all_traces)


def oracle(cost, exits, ks):
    """Per round, the (E, k) with the least seconds per token given the true run of
    agreements from t (a policy that knows the future: the ceiling)."""
    def make(trace):
        def choose(t, history):
            def per_token(option):
                e, k = option
                agree, m = trace[e][0], 0
                while m < k and t + m < len(agree) and agree[t + m]:
                    m += 1
                return cost[option] / (m + 1)
            return min(((e, k) for e in exits for k in ks), key=per_token)
        return choose
    return make


def confidence_stop(e, cap, threshold, product, ks):
    """Draft from e while the draft is sure (its probability, or with product the product of
    the round's probabilities, at least threshold), at most cap; k rounded up to ks."""
    def make(trace):
        conf = trace[e][1]

        def choose(t, history):
            k, p = 0, 1.0
            while k < cap and t + k < len(conf):
                p = p * conf[t + k] if product else conf[t + k]
                k += 1
                if p < threshold:
                    break
            return e, up_to(ks, k)
        return choose
    return make


def follow_last(e, start, step_up, ks):
    """k = start, then the last k + step_up after a round that accepted every draft, else the
    last round's accepted count + 1 (clipped to ks)."""
    def make(trace):
        def choose(t, history):
            if not history:
                k = start
            else:
                _, last_k, m = history[-1]
                k = last_k + step_up if m == last_k else m + 1
            return e, up_to(ks, k)
        return choose
    return make


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="default: the embedded default model")
    p.add_argument("--prompts", help="JSON list of token-id lists (default: BOS alone)")
    p.add_argument("--exits", help="E,... (default: the recommendation and its neighbours)")
    p.add_argument("--ks", default="1,2,3,4,5,6,8", help="draft lengths k")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="timed repeats of the round costs")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    lsk.set_num_threads(args.threads)
    model = lsk.load_model(args.model)
    c = model.config
    prompts = json.load(open(args.prompts)) if args.prompts else [[c.bos_token_id or 0]]
    exits = ([int(e) for e in args.exits.split(",")] if args.exits
             else [e for e in (c.exit_layer - 1, c.exit_layer, c.exit_layer + 1)
                   if 1 <= e < c.n_layers])
    ks = sorted(int(k) for k in args.ks.split(","))
    load = os.getloadavg()
    all_traces = traces(model, prompts, args.max_new_tokens)
    pairs = [(e, k) for e in exits for k in ks]
    cost, measured = round_costs(model, prompts, args.max_new_tokens, pairs, args.repeats)
    print(f"load average {load} -> {os.getloadavg()}; {len(prompts)} prompts, each alone, "
          f"{args.max_new_tokens} new tokens; a round's cost in autoregressive steps")
    for e in exits:
        agree = [a for tr in all_traces for a in tr[e][0]]
        print(f"E{e}: agreement with the full model {sum(agree) / len(agree):.3f}; per k: "
              "measured / replayed speedup, round cost")
        for k in ks:
            replayed = speed(all_traces, cost, lambda tr, e=e, k=k: lambda t, h: (e, k))
            print(f"  k{k}: {measured[(e, k)]:.3f} / {replayed:.3f}, "
                  f"{cost[(e, k)]:.2f}")
    best = max(pairs, key=lambda o: speed(all_traces, cost,
                                          lambda tr, o=o: lambda t, h: o))
    best_speed = speed(all_traces, cost, lambda tr: lambda t, h: best)
    print(f"best fixed (replayed): E{best[0]} k{best[1]} {best_speed:.3f}x autoregressive")
    rules = [("oracle (knows each round's agreements)", oracle(cost, exits, ks))]
    rules += [(f"E{best[0]} confidence stop {'product' if product else 'each'} >= {th}, "
               f"at most {cap}", confidence_stop(best[0], cap, th, product, ks))
              for cap in sorted({ks[-1], up_to(ks, best[1] + 1)}) for product in (False, True)
              for th in (0.3, 0.5, 0.7, 0.9)]
    rules += [(f"E{best[0]} follow the last round, up {up}", follow_last(best[0], best[1], up, ks))
              for up in (1, 2, 4)]
    for name, make in rules:
        s = speed(all_traces, cost, make)
        print(f"{name}: {s:.3f}x autoregressive, {s / best_speed:.3f}x the best fixed")


if __name__ == "__main__":
    main()
