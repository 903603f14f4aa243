"""Who decides a self-speculative round: its drafter and draft length k, or no draft (one
autoregressive step of every layer). decode_self_speculative asks a policy once per round
(choose) and tells it what the round did (record), from what the round's one host sync
already brought back: each live row's accepted count, the agreement of the shadow exits it
asked for (exits whose tokens a greedy round also reads from hidden states it computes
anyway), and host timestamps. A policy never touches the device, so it adds no sync.

One choice serves the whole batch: a round is one kernel launch sequence (one CUDA graph,
one C++ call) over every row, and rows drafting different (E, k) would split it into
several passes over the weights, which is what the round saves.
"""
import math
import time
from collections import Counter

from .estimates import COST_MEMORY, Estimates
from .state import MAX_SHADOW

FIRST_REPROBE = 32  # rounds before an option not chosen is tried again; the gap doubles
# A choice holds for a stint of rounds, timed as one: a round of a small model takes a
# fraction of a millisecond, too short to time alone on a busy machine, and scoring every
# option each round would cost as much as the round. An option chosen again gets a stint
# twice as long, up to MAX_STINT: fewer decisions while nothing changes.
STINT, PROBE_STINT, MAX_STINT = 16, 2, 64
# ... and at least long enough that the policy's own time (its decisions, measured) stays
# within POLICY_SHARE of the stint's: on a small model a round takes ~0.1 ms and a decision
# ~0.05 ms, which stints of 16 would pay several percent for. At most LONGEST_STINT rounds.
POLICY_SHARE, LONGEST_STINT = 0.005, 256
# The policy leaves the option it exploits (at first the recommendation, else the plain
# step) only for one that promises SWITCH times its tokens/s: timings on a shared machine
# vary by more than the differences between neighbouring options.
SWITCH = 1.15
# A shadow stint: SHADOW_STINT rounds of the option exploited that also head other exits
# (shadow tokens): their acceptance, observed without drafting from them, for a few heads.
SHADOW_STINT = 4
PROBE_ACCEPTANCE = 0.5  # an exit accepted this often is worth timing once (_explore)


class FixedPolicy:
    """The same drafter and k every round: self-speculation as the caller configured it."""

    def __init__(self, drafter, k):
        self.drafter, self.k = drafter, k

    def choose(self):
        return self.drafter, self.k, ()

    def record(self, accepted, seconds, made=None, shadow=None):
        pass

    def stats(self):
        return {}


def option_name(option):
    return "autoregressive" if option is None else f"E{option[0]} k{option[1]}"


class AdaptivePolicy(Estimates):
    """Per stint of rounds (STINT, doubling up to MAX_STINT while the choice stays, longer
    where the policy's own time would pass POLICY_SHARE of the stint's; a probe
    PROBE_STINT), the option (exit E, draft length k) or None (an autoregressive step) with
    the most expected tokens per second, from the estimates of its rounds (estimates.py:
    acceptance per exit, from drafts and shadow tokens; a round's cost, measured or
    predicted); it leaves the option it exploits only for one that promises SWITCH times
    its tokens/s. A shadow stint also heads other
    candidate exits (at most MAX_SHADOW, nearest the drafted one; in a plain step, nearest
    the last layer) from the hidden states its rounds compute anyway. A shadowed round is
    not timed (its heads are extra work): the call's tokens/s pays for them, and stats'
    shadow_rounds counts them. A call starts from what the model's last call of the same
    shape learned (recall; stats' recalled), else as below.

    Exploration is cheap and bounded. A model's recommended (E, k) runs first, a whole
    stint; without one, a shadow stint of plain steps observes every candidate exit (where
    rounds cannot shadow: sampling, or a confidence stop, a probe stint of PROBE_STINT
    rounds drafting at k = 1 from the deepest exit that could pay instead). Then each kind
    of option not exploited is explored when due (at once, then after FIRST_REPROBE
    rounds, then twice as many each time) and only while it could beat the best: the plain
    step by a short stint (its cost); exits whose acceptance's upper bound could pay, by a
    shadow stint of the option exploited; the exploited exit's neighbouring draft lengths
    never timed, by a short stint. An option whose cost is only predicted runs a short
    stint before it is exploited.
    """

    def __init__(self, make_drafter, n_layers, exits, ks, recommended=None, confidence=None,
                 shadow=True, learned=None):
        super().__init__(n_layers, exits, ks, recommended, confidence, learned)
        self.make_drafter, self.drafters = make_drafter, {}
        self.next_probe, self.gap = {}, {}
        self.choices, self.round, self.overhead_s = Counter(), 0, 0.0
        self.decisions = 0  # stints chosen from the statistics (_pick past the start)
        self.shadow_rounds = 0  # rounds that shadowed
        self.shadow = shadow
        self.shadows = {e: self._shadows(e) for e in [None] + self.exits}
        self.stints = []  # (option name, rounds) in order: the choices over time
        self.left, self.stint_rounds = 0, 0
        # The recommendation (a sweep measured it), else plain steps, shadowing the exits.
        self.recommended = tuple(recommended) if recommended else None
        self.current = self.recommended  # the option exploited (None: the plain step)
        self.exploit_stint = STINT // 2  # doubled when the first pick keeps it
        if recommended:
            self.start = [(self.recommended, STINT, ())]
        elif shadow:  # shadowed rounds are not timed: then a timed stint of plain steps
            self.start = [(None, SHADOW_STINT, self.shadows[None]), (None, PROBE_STINT, ())]
        else:  # the plain step's cost, then the likeliest accepted exit's
            self.start = [(None, PROBE_STINT, ()), ((self.exits[-1], ks[0]), PROBE_STINT, ())]
        self.recalled = learned is not None
        if learned is not None:  # a former call's: start where it left off
            for kind, (due_in, gap) in learned["due"].items():
                self.next_probe[kind], self.gap[kind] = max(due_in, 0), gap
            self.current = learned["current"]
            self.start = [(self.current, STINT, ())]
        self.chosen = None

    # ---------------------------------------------------------------------- the two calls

    def choose(self):
        """(drafter, k, shadow) of the next round ((None, None, shadow): an autoregressive
        step); shadow: the exits the round also heads (a shadow stint's), or ()."""
        if self.left:
            self.left -= 1
            return self.answer
        begin = time.perf_counter()
        option, self.left, shadow = self._pick()
        self.left -= 1
        self.chosen, self.stint_s, self.stint_rounds, self.timed_rounds = option, 0.0, 0, 0
        self.stint_rows = self.stint_hits = self.stint_misses = 0
        self.stint_shadow_hits, self.stint_shadow_misses = Counter(), Counter()
        drafter = None if option is None else self._drafter(option[0])
        self.answer = (drafter, None if option is None else option[1], shadow)
        self.overhead_s += time.perf_counter() - begin
        return self.answer

    def _shadows(self, drafted):
        """The exits a round drafting from `drafted` (None: a plain step) may shadow: the
        other candidates, at most MAX_SHADOW, the nearest first (in a plain step, nearest
        the last layer)."""
        near = drafted if drafted is not None else self.n_layers
        others = sorted((e for e in self.exits if e != drafted), key=lambda e: abs(e - near))
        return tuple(sorted(others[:MAX_SHADOW]))

    def record(self, accepted, seconds, made=None, shadow=None):
        """accepted: each live row's accepted drafts (Python ints); seconds: the round's host
        time (None where it is not a steady cost: the call's first round, or one that
        captured a graph); made: the drafts the round made (a confidence-stopped round's;
        else the chosen k); shadow: {exit: (hits, misses)} of the exits the round shadowed
        (None: none; then the round is timed). Sums only: the estimates are updated once
        per stint."""
        if self.chosen is not None:
            for m in accepted:
                self.stint_hits += m
                self.stint_misses += m < made
        self.stint_rows += len(accepted)
        if shadow:
            for e, (hits, misses) in shadow.items():
                self.stint_shadow_hits[e] += hits
                self.stint_shadow_misses[e] += misses
            self.shadow_rounds += 1
            seconds = None
        self._count(1, seconds)

    def rounds_left(self):
        """The rounds the current choice still holds after the one choose() just answered
        (a stint of plain steps runs them in one go: record_steps)."""
        return self.left

    def record_steps(self, steps, seconds):
        """record() of `steps` plain steps without shadows run in one go (the stint's rest,
        or fewer where the call ended): seconds, their host time (None: not a steady cost)."""
        self.left -= steps - 1
        self._count(steps, seconds)

    def _count(self, rounds, seconds):
        self.stint_rounds += rounds
        if seconds is not None:
            self.stint_s += seconds
            self.timed_rounds += rounds
        if self.left == 0:
            self._end_stint()

    def _end_stint(self):
        begin = time.perf_counter()
        option, rounds = self.chosen, self.stint_rounds
        if option is not None:
            self.hits[option[0]] += self.stint_hits
            self.misses[option[0]] += self.stint_misses
        self.hits.update(self.stint_shadow_hits)
        self.misses.update(self.stint_shadow_misses)
        per_row = 1 + self.stint_hits / max(self.stint_rows, 1)
        old = self.tokens.get(option)
        self.tokens[option] = per_row if old is None else old + COST_MEMORY * (per_row - old)
        if self.timed_rounds:
            seconds = self.stint_s / self.timed_rounds
            self.cost[option] = min(seconds, self.cost.get(option, seconds))
        self.choices[option] += rounds
        name = option_name(option)
        if self.stints and self.stints[-1][0] == name:  # consecutive stints of one choice
            self.stints[-1] = (name, self.stints[-1][1] + rounds)
        else:
            self.stints.append((name, rounds))
        self.round += rounds
        self.stint_rounds = 0
        self.overhead_s += time.perf_counter() - begin

    def learned(self):
        """What this call learned, for the model's next call of the same shape (the
        __init__ argument `learned`, through recall): the estimates (Estimates.known), when
        each kind is due for exploring again, and the option exploited."""
        if self.stint_rounds:  # the call ended within a stint
            self._end_stint()
        return {**self.known(), "current": self.current,
                "due": {kind: (due - self.round, self.gap[kind])
                        for kind, due in self.next_probe.items()}}

    def stats(self):
        if self.stint_rounds:  # the call ended within a stint
            self._end_stint()
        return {"choices": {option_name(o): n for o, n in self.choices.most_common()},
                "fallback_rounds": self.choices[None], "policy_s": self.overhead_s,
                "stints": self.stints, "shadow_rounds": self.shadow_rounds,
                "recalled": self.recalled,
                "exit_acceptance": {e: round(self._alpha(e, False), 3) for e in self.exits
                                    if self.hits[e] + self.misses[e]}}

    def _pick(self):
        """The next stint: (option, rounds, shadow exits)."""
        if self.start:
            return self.start.pop(0)
        self.decisions += 1
        scores = self.scores(self.options)
        best = max(scores, key=scores.get)
        if scores[best] < SWITCH * scores[self.current]:
            best = self.current
        if best != self.current and best not in self.cost:
            return best, PROBE_STINT, ()  # promising, its cost only predicted: measure it
        kept = best == self.current
        self.current = best
        self.exploit_stint = min(2 * self.exploit_stint, MAX_STINT) if kept else STINT
        return self._explore(best, scores[best]) or (best, self._stint(best), ())

    def _stint(self, option):
        """The exploit stint's rounds: exploit_stint, or more where the policy's time per
        decision (overhead_s over the decisions so far) would exceed POLICY_SHARE of the
        stint's measured seconds."""
        seconds = self.cost.get(option)
        if not seconds or not self.decisions:
            return self.exploit_stint
        per_stint = self.overhead_s / self.decisions
        return min(max(self.exploit_stint, math.ceil(per_stint / (POLICY_SHARE * seconds))),
                   LONGEST_STINT)

    def _due(self, kind):
        """Whether exploring `kind` is due: at its first asking, then FIRST_REPROBE rounds
        later, then twice as many each time (a kind that keeps losing costs less and less)."""
        if self.round < self.next_probe.get(kind, self.round):
            return False
        self.gap[kind] = 2 * self.gap.get(kind, FIRST_REPROBE // 2)
        self.next_probe[kind] = self.round + self.gap[kind]
        return True

    def _explore(self, best, best_score):
        """A stint that learns what exploiting `best` does not, where a kind is due and
        could beat it, else None: the plain step by a short stint (its cost); an exit seen
        at fewer than SHADOW_STINT positions, never seen or promising, by a shadow stint
        of `best` (where rounds can shadow); a promising exit seen enough by a short stint
        at its most promising k (its cost). Promising: its score's upper bound beats the
        best, or it is accepted at least PROBE_ACCEPTANCE and its cost is a prediction (a
        cost line through one measured option cannot tell a round's fixed part from its
        work: it misjudges drafting on small models both ways). Then the exploited exit's
        untimed neighbouring k, by a short stint, if predicted within SWITCH of the best."""
        drafted = None if best is None else best[0]
        if best is not None and self._due(None) and self.scores([None])[None] > best_score:
            return None, PROBE_STINT, ()
        due = [e for e in self.exits if e != drafted and self._due(e)]
        if due:
            optimistic = self.scores([(e, k) for e in due for k in self.ks], optimistic=True)
            timed = {o[0] for o in self.cost if o is not None}
            top = {e: max(((e, k) for k in self.ks), key=optimistic.get) for e in due}
            promising = [e for e in due if optimistic[top[e]] > best_score or (
                e not in timed and self.alpha(e) >= PROBE_ACCEPTANCE)]
            seen = {e: self.hits[e] + self.misses[e] for e in due}
            look = [e for e in due if seen[e] < SHADOW_STINT and (e in promising or not seen[e])]
            if self.shadow and look:
                return best, SHADOW_STINT, tuple(e for e in self.shadows[drafted] if e in look)
            if promising:
                e = max(promising, key=lambda e: optimistic[top[e]])
                return top[e] if self.shadow else (e, self.ks[0]), PROBE_STINT, ()
        if best is not None and self._due(("k", best[0])):
            i = self.ks.index(best[1])
            near = [(best[0], k) for k in self.ks[max(i - 1, 0):i + 2]
                    if (best[0], k) not in self.cost]
            scores = self.scores(near)
            if near and max(scores.values()) * SWITCH >= best_score:
                return max(near, key=scores.get), PROBE_STINT, ()
        return None

    def _drafter(self, e):
        if e not in self.drafters:
            self.drafters[e] = self.make_drafter(e)
        return self.drafters[e]
