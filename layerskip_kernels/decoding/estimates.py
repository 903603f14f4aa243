"""What the adaptive self-speculation policy (policy.py) knows, and what it expects of each
option: an exit's acceptance, a round's cost, a round's tokens, so tokens per second; and
what a call learned, kept for the model's next call of the same shape."""
import contextlib
import math
import weakref
from collections import Counter

# Verification over q positions costs about 1 + VERIFY_SLOPE * (q - 1) of one position (2
# CPU cores: 4 positions cost ~1.3x one; on a GPU ~1x): the shape of the cost model
# (units), whose scale is fitted to the measured rounds.
VERIFY_SLOPE = 0.1
COST_MEMORY = 0.3  # weight of the newest stint in tokens per round (an exponential average)
# A call starts from what the model's last call of the same shape learned (recall): its
# exits' counts, scaled down to at most MEMORY observations each (enough to start at the
# right option, few enough that the call's own rounds soon outweigh them), its round costs,
# its exploration schedule and the option it exploited.
MEMORY = 256
_LEARNED = weakref.WeakKeyDictionary()  # model -> {call shape: AdaptivePolicy.learned()}


def recall(model, shape):
    """What the model's last adaptive call of this shape learned, or None."""
    return _LEARNED.get(model, {}).get(shape)


def remember(model, shape, learned):
    _LEARNED.setdefault(model, {})[shape] = learned


@contextlib.contextmanager
def without_memory(model):
    """Within it, the model's adaptive calls start as its first would (nothing recalled),
    and what they learn is dropped on leaving (the model's memory is as it was): what one
    call costs with its exploration, for a benchmark."""
    kept = _LEARNED.pop(model, None)
    try:
        yield
    finally:
        _LEARNED.pop(model, None)
        if kept is not None:
            _LEARNED[model] = kept


class Estimates:
    """Per exit E, its acceptance alpha_E: the chance that a draft is accepted given the one
    before it was, counted over every row of every round drafted from E (m accepted of k is
    m successes and, when m < k, one failure) and over every shadowed position (where the
    exit's token equals the full model's at a position whose input was the true prefix: a
    success; else a failure: the same chance, observed without drafting), with a Beta prior
    (recommended exit 3:1, others 1:3: an exit of a model not trained for early exit is
    rarely accepted), and at most the upper bound of a deeper exit observed more (alpha).
    A row drafting k expects (1 - alpha^(k+1)) / (1 - alpha) tokens.
    Per option ((E, k), or None: a plain step), a round's cost: measured for options that
    ran (host seconds between the round's syncs, averaged over a stint's timed rounds, the
    least over stints: on a shared machine the noise only slows a stint down); for the
    others, predicted by a line fixed + per_unit * units() fitted to the measured ones
    (cost_line, scores).
    With confidence (num_speculations="auto"), each option's k is the cap of a round that
    stops drafting when unsure, and its expected tokens are those it measured (tokens)."""

    def __init__(self, n_layers, exits, ks, recommended=None, confidence=None, learned=None):
        self.n_layers, self.confidence = n_layers, confidence
        self.exits, self.ks = list(exits), list(ks)
        self.prior = {e: (3.0, 1.0) if recommended and e == recommended[0] else (1.0, 3.0)
                      for e in self.exits}
        self.hits, self.misses = Counter(), Counter()
        self.cost, self.tokens = {}, {}
        self.options = [None] + [(e, k) for e in self.exits for k in self.ks]
        self.unit = {o: self.units(o) for o in self.options}
        if learned is not None:
            self.hits.update(learned["hits"])
            self.misses.update(learned["misses"])
            self.cost.update(learned["cost"])
            self.tokens.update(learned["tokens"])

    def known(self):
        """The estimates for a later call (Estimates' `learned`): each exit's counts scaled
        to at most MEMORY observations, the measured costs and tokens."""
        scale = {e: min(1.0, MEMORY / max(self.hits[e] + self.misses[e], 1)) for e in self.exits}
        return {"hits": {e: self.hits[e] * scale[e] for e in self.exits},
                "misses": {e: self.misses[e] * scale[e] for e in self.exits},
                "cost": dict(self.cost), "tokens": dict(self.tokens)}

    def alpha(self, e, optimistic=False):
        """Exit e's acceptance estimate (optimistic: its upper bound, mean + 2 sd), at most
        the upper bound of a deeper exit observed more often: a shallower exit is usually
        accepted less, which spares probing it, but not always (a model trained to exit at
        one layer), so an exit's own observations prevail once it has more."""
        seen = self.hits[e] + self.misses[e]
        return min([self._alpha(e, optimistic)] + [
            self._alpha(d, True) for d in self.exits
            if d > e and self.hits[d] + self.misses[d] > seen])

    def _alpha(self, e, optimistic):
        a, b = self.prior[e]
        n = self.hits[e] + self.misses[e] + a + b
        mean = (self.hits[e] + a) / n
        return min(1.0, mean + 2 * math.sqrt(mean * (1 - mean) / (n + 1))) if optimistic else mean

    def units(self, option):
        """The cost model's work of a round, in layer-positions (a head counts as a layer):
        an autoregressive step is L layers and a head; a round drafts through E layers and
        a head k times, runs E layers once more on the last draft, then L - E layers and the
        head over k + 1 positions."""
        L = self.n_layers
        if option is None:
            return L + 1.0
        e, k = option
        return (k + 1) * e + k + (L - e + 1) * (1 + VERIFY_SLOPE * k)

    def expected_tokens(self, option, alpha):
        if option is None:
            return 1.0
        if self.confidence is not None:
            return self.tokens.get(option, 1 + alpha)
        k = option[1]
        return k + 1 if alpha >= 1 else (1 - alpha ** (k + 1)) / (1 - alpha)

    def cost_line(self):
        """(fixed, per_unit): a round's seconds as fixed + per_unit * units, fitted (least
        squares) to the measured options: the fixed part is what every round pays whatever
        its work (a call, the host sync, the loop's Python), large on a small model. With
        one measured size, or a fit that comes out negative: no fixed part."""
        points = [(self.unit[o], c) for o, c in self.cost.items()]
        if not points:
            return 0.0, 1.0  # nothing timed: only ratios matter
        mean_u = sum(u for u, _ in points) / len(points)
        mean_c = sum(c for _, c in points) / len(points)
        var = sum((u - mean_u) ** 2 for u, _ in points)
        if var > 0:
            slope = sum((u - mean_u) * (c - mean_c) for u, c in points) / var
            fixed = mean_c - slope * mean_u
            if slope > 0 and fixed >= 0:
                return fixed, slope
        return 0.0, mean_c / mean_u

    def scores(self, options, optimistic=False):
        """{option: expected tokens per row per second} (optimistic: at each exit's
        acceptance upper bound). A round's seconds: measured; else the same exit's
        measured round of the nearest k plus the fitted cost of the units between; else
        the fitted line (cost_line)."""
        fixed, per_unit = self.cost_line()
        alpha = {e: self.alpha(e, optimistic) for e in {o[0] for o in options if o}}
        measured = {}  # exit: [(k, seconds)]
        for o, c in self.cost.items():
            if o is not None:
                measured.setdefault(o[0], []).append((o[1], c))
        scores = {}
        for o in options:
            cost = self.cost.get(o)
            if cost is None and o is not None and o[0] in measured:
                k, c = min(measured[o[0]], key=lambda kc: abs(kc[0] - o[1]))
                cost = c + per_unit * (self.unit[o] - self.unit[(o[0], k)])
            if cost is None:
                cost = fixed + per_unit * self.unit[o]
            tokens = 1.0 if o is None else self.expected_tokens(o, alpha[o[0]])
            scores[o] = tokens / cost
        return scores


def candidate_exits(n_layers, recommended_exit):
    """The exits the adaptive policy may draft from: the recommendation and its neighbours,
    or, on a model without one, a quarter, half and three quarters of the depth and the
    last layer but one (a deep exit drafts slowly but is accepted most)."""
    if recommended_exit is not None:
        exits = {recommended_exit - 1, recommended_exit, recommended_exit + 1}
    else:
        exits = {n_layers // 4, n_layers // 2, 3 * n_layers // 4, n_layers - 1}
    return sorted(e for e in exits if 1 <= e <= n_layers - 1)


def candidate_ks(recommended_k, cap):
    """Draft lengths the policy may choose: 1, 2, 3, 4, 6 and the recommendation, at most
    cap."""
    ks = {1, 2, 3, 4, 6} | ({recommended_k} if recommended_k else set())
    return sorted(k for k in ks if k <= cap)
