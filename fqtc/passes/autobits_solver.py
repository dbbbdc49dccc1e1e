"""The solver of the automatic bit policy (docs/bit_assignment.md, "Solver"): a multiple-choice knapsack over
gradient quantizers (`Unit`: element count and an objective term per bit width) under an average-bit budget,
solved exactly by dynamic programming over integer weights or greedily past `MAX_DP_CELLS`. Pure Python and NumPy;
`fqtc.passes.autobits` builds the units from the graph and the calibration."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Hashable, Mapping, Sequence

import numpy as np

from fqtc.config import MAX_BITS, MIN_BITS

CHOICES: tuple[int, ...] = tuple(range(MIN_BITS, MAX_BITS + 1))
# DP cells (units x capacity) above which `solve` switches to the greedy solver; 2e7 float64 cells ~ 0.2 s, 160 MB
# worst case for the back-pointers stored as int8.
MAX_DP_CELLS = 20_000_000


# -- pure solver ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Unit:
    """One decision: the bits of one quantizer.

    Args:
        key: identifies the quantizer (``(site, role)`` in fqtc).
        weight: its cost per bit, a positive integer (element count, normalized).
        variance: bits -> estimated added variance, for every bit choice the unit may take.
        fixed: bits fixed by the user (a rule); the unit still spends budget but is not chosen.
    """

    key: Hashable
    weight: int
    variance: Mapping[int, float]
    fixed: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.weight, bool) or not isinstance(self.weight, int) or self.weight <= 0:
            raise ValueError(f"autobits: unit {self.key!r} weight must be a positive int, got {self.weight!r}")
        if self.fixed is None and not self.variance:
            raise ValueError(f"autobits: unit {self.key!r} has no bit choices")


@dataclass
class Solution:
    """The solver's answer. ``gap`` bounds ``total_variance - optimum`` (0 when ``exact``)."""

    bits: dict[Hashable, int]
    total_variance: float
    average_bits: float
    budget: float
    exact: bool
    gap: float = 0.0
    shape_independent: bool = True
    notes: list[str] = field(default_factory=list)

    def share(self, key: Hashable, units: Sequence[Unit]) -> float:
        """Fraction of the total estimated variance contributed by ``key`` at its chosen bits."""
        u = next(u for u in units if u.key == key)
        v = u.variance.get(self.bits[key], 0.0)
        return v / self.total_variance if self.total_variance > 0 else 0.0


def _capacity(units: Sequence[Unit], budget: float) -> tuple[int, int]:
    """(total weight, floor(budget * total weight)) in exact rational arithmetic (4.5 * 7 is 31, never 31.4999)."""
    total = sum(u.weight for u in units)
    b = Fraction(budget).limit_denominator(10**6)
    return total, math.floor(b * total)


def _evaluate(units: Sequence[Unit], bits: Mapping[Hashable, int], budget: float, exact: bool, gap: float = 0.0
              ) -> Solution:
    total_w = sum(u.weight for u in units)
    var = sum(u.variance.get(bits[u.key], 0.0) for u in units)
    avg = sum(bits[u.key] * u.weight for u in units) / total_w if total_w else 0.0
    return Solution(dict(bits), var, avg, budget, exact, gap)


def _free_and_capacity(units: Sequence[Unit], budget: float) -> tuple[list[Unit], list[list[int]], int]:
    """Free units, their sorted choices, and the capacity left for bits above each free unit's minimum."""
    _, cap = _capacity(units, budget)
    free = [u for u in units if u.fixed is None]
    choices = [sorted(u.variance) for u in free]
    used = sum(u.fixed * u.weight for u in units if u.fixed is not None)
    used += sum(c[0] * u.weight for u, c in zip(free, choices))
    left = cap - used
    if left < 0:
        fixed = [(u.key, u.fixed) for u in units if u.fixed is not None]
        raise ValueError(
            f"fqt option 'budget': {budget} average bits cannot be met: the fixed units {fixed} plus every other "
            f"gradient quantizer at its minimum bits already average {used / sum(u.weight for u in units):.3f}; "
            "raise the budget or lower the bits the rules fix")
    return free, choices, left


def solve_exact(units: Sequence[Unit], budget: float) -> Solution:
    """Exact minimum of sum V_u(b_u) s.t. sum b_u w_u <= budget * sum w_u: multiple-choice knapsack DP.

    Costs are the bits above each unit's minimum times its weight, divided by the gcd of the weights; the DP table
    holds, for every spent capacity, the least total variance (numpy over the capacity axis, one pass per unit and
    choice). Ties go to fewer bits.
    """
    free, choices, left = _free_and_capacity(units, budget)
    bits = {u.key: u.fixed for u in units if u.fixed is not None}
    if not free:
        return _evaluate(units, bits, budget, True)
    g = math.gcd(*[u.weight for u in free])
    costs = [[(b - c[0]) * u.weight // g for b in c] for u, c in zip(free, choices)]
    cap = min(left // g, sum(max(c) for c in costs))  # never more than every unit at its maximum
    dp = np.zeros(cap + 1)  # dp[c]: least variance of the units so far with extra cost <= c
    back = np.zeros((len(free), cap + 1), dtype=np.int8)
    for i, (u, c, cost) in enumerate(zip(free, choices, costs)):
        new = np.full(cap + 1, np.inf)
        for j, (b, k) in enumerate(zip(c, cost)):
            if k > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[k:] = dp[: cap + 1 - k] + float(u.variance[b])
            better = cand < new
            new[better], back[i, better] = cand[better], j
        dp = new
    c_left = cap
    for i in range(len(free) - 1, -1, -1):
        j = int(back[i, c_left])
        bits[free[i].key] = choices[i][j]
        c_left -= costs[i][j]
    return _evaluate(units, bits, budget, True)


def solve_greedy(units: Sequence[Unit], budget: float) -> Solution:
    """Greedy by variance saved per budget spent, with an optimality gap.

    Start every free unit at its minimum bits; repeatedly take the one-bit upgrade with the largest
    ``(V(b) - V(b+1)) / weight`` that still fits. When each unit's V is convex in b (true for the uniform
    quantizers: V ~ 1/(2^(b-1)-1)^2), the upgrades taken before the first one that does not fit are the LP
    relaxation's, so ``total - optimum <= `` the variance the first non-fitting upgrade would have saved, which is
    reported as ``gap`` (0 when nothing was left out).
    """
    free, choices, left = _free_and_capacity(units, budget)
    bits = {u.key: u.fixed for u in units if u.fixed is not None}
    level = [0] * len(free)
    gap = 0.0
    blocked: set[int] = set()
    while True:
        best, best_ratio = -1, -1.0
        for i, (u, c) in enumerate(zip(free, choices)):
            if i in blocked or level[i] + 1 >= len(c):
                continue
            dv = u.variance[c[level[i]]] - u.variance[c[level[i] + 1]]
            ratio = dv / ((c[level[i] + 1] - c[level[i]]) * u.weight)
            if ratio > best_ratio:
                best, best_ratio = i, ratio
        if best < 0:
            break
        u, c = free[best], choices[best]
        step_cost = (c[level[best] + 1] - c[level[best]]) * u.weight
        if step_cost <= left:
            left -= step_cost
            level[best] += 1
        else:
            if not blocked:
                gap = u.variance[c[level[best]]] - u.variance[c[level[best] + 1]]
            blocked.add(best)
    for u, c, lv in zip(free, choices, level):
        bits[u.key] = c[lv]
    return _evaluate(units, bits, budget, gap == 0.0, gap)


def solve(units: Sequence[Unit], budget: float, max_cells: int = MAX_DP_CELLS) -> Solution:
    """`solve_exact` when its table fits ``max_cells``, else `solve_greedy` (its gap is in the solution)."""
    free, _, left = _free_and_capacity(units, budget)
    if not free:
        return solve_exact(units, budget)
    g = math.gcd(*[u.weight for u in free])
    if len(free) * (left // g + 1) <= max_cells:
        return solve_exact(units, budget)
    return solve_greedy(units, budget)


def uniform_solution(units: Sequence[Unit], bits: int) -> Solution:
    """Every free unit at ``bits`` (the baseline the automatic policy is compared against)."""
    chosen = {u.key: (u.fixed if u.fixed is not None else bits) for u in units}
    avg = sum(chosen[u.key] * u.weight for u in units) / sum(u.weight for u in units)
    return _evaluate(units, chosen, avg, True)


def integer_weights(sizes: Sequence[Any], at: Mapping[Any, int] | None = None) -> tuple[list[int], bool]:
    """Integer cost weights proportional to symbolic element counts.

    ``sizes`` are sympy expressions (or ints, or strings sympy parses: ``"8*s0*s1"``). If every size is a
    constant multiple of the first, the weights are those constants over a common denominator and hold for every
    value of the symbols (returns ``(weights, True)``); otherwise the sizes are evaluated with ``at`` (symbol ->
    value) and the weights hold at that shape only (``(weights, False)``).
    """
    import sympy

    exprs = [sympy.sympify(s) for s in sizes]
    if not exprs:
        return [], True
    ratios = [sympy.nsimplify(sympy.simplify(e / exprs[0])) for e in exprs]
    if all(r.is_Rational for r in ratios):
        den = math.lcm(*[int(sympy.Rational(r).q) for r in ratios])
        w = [int(sympy.Rational(r) * den) for r in ratios]
        g = math.gcd(*w)
        return [x // g for x in w], True
    if at is None:
        raise ValueError(f"autobits: sizes {sizes} scale differently and no symbol values were given")
    subs = {sympy.Symbol(str(k)): v for k, v in at.items()}
    vals = [int(e.subs(subs)) for e in exprs]
    if any(not isinstance(v, int) or v <= 0 for v in vals):
        raise ValueError(f"autobits: could not evaluate sizes {sizes} at {dict(at)}")
    g = math.gcd(*vals)
    return [v // g for v in vals], False
