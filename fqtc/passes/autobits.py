"""Automatic per-GEMM gradient bits (docs/bit_assignment.md): spend bits where the gradient variance is.

With ``options={"bits": "auto", "budget": 4.5, "calibration": fqtc.calibrate(...)}`` the bits of every
``grad_output`` quantizer (one per backward GEMM: ``grad_input`` and ``grad_weight`` of each site) are chosen to

    minimize   sum_u J_u(b_u)                       (the objective, below)
    subject to sum_u b_u n_u <= budget * sum_u n_u  (average bits per quantized gradient element)
               b_u in {auto_min_bits..8}, b_u fixed where a rule or keep_fp set it

with ``J_u`` one of two objectives (option ``auto_objective``):

- ``"relative"`` (default): ``J_u(b) = sum_p V_{u->p}(b) / ||g_p||^2``, the variance quantizer u adds to the
  gradient of parameter tensor p relative to that gradient's squared norm (both calibrated), summed over parameter
  tensors: the sum of per-tensor noise-to-signal ratios. It is scale-invariant per tensor, so a small layer whose
  gradient is small in absolute terms cannot be starved (with "absolute", the Fashion-MNIST CNN's first conv got 2
  bits, benchmarks/README.md), and it matches Adam-style optimizers, which normalize each element's step by its
  own gradient scale, so what a tensor's update feels is its noise relative to its signal.
- ``"absolute"``: ``J_u(b) = V_u(b)``, the added variance summed over all parameter-gradient elements.

This is the variance decomposition of the statistical framework (Chen et al., NeurIPS 2020, Sec. 3): with unbiased
(stochastic-rounding) gradient quantizers the FQT gradient is the QAT gradient plus one independent zero-mean term
per quantizer, so variances add. ``V_u(b)`` comes from `fqtc.calibrate`: the quantizer's per-element variance at
``b`` bits on the calibrated ``grad_output`` (exact s^2 f(1-f) for SR, s^2/12 for nearest), pushed through the GEMM
(a noise of variance v on element (m, k) of ``A`` in ``A @ B`` adds v * ||B[k, :]||^2 to the product), and, for
GEMMs whose product is an activation gradient (``grad_input``; ``grad_weight`` of a bmm), carried to the parameter
gradients of the sites upstream (`propagation_weights`, networkx over the forward graph, or measured by
``fqtc.calibrate(..., propagation="measured")``).

Costs ``n_u`` are element counts of the quantized ``grad_output``, kept symbolic in the batch/sequence sizes
(sympy): when every ``n_u`` is the same symbolic size times a constant (all Linear sites of an MLP/CNN head, all
projections of a transformer), the constraint divides out and **one solution holds for every shape**; when they
scale differently (attention's ``B*T*T`` against ``B*T*C``) the solution is exact at the calibration shapes and
`Solution.shape_independent` is False.

The solver is exact: a multiple-choice knapsack solved by dynamic programming over the integer cost
(`solve_exact`), with a greedy fallback for very large capacities whose optimality gap is bounded and reported
(`solve_greedy`). Pure solver functions come first (no graph code); the graph side (`plan_auto`) builds the
problem from the GEMM sites and the calibration.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Hashable, Mapping, Sequence

from fqtc.config import MIN_BITS
from fqtc.passes.autobits_solver import (  # noqa: F401  (re-exported: the solver's names are autobits' API)
    CHOICES,
    MAX_DP_CELLS,
    Solution,
    Unit,
    integer_weights,
    solve,
    solve_exact,
    solve_greedy,
    uniform_solution,
)


# -- graph side ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class SiteView:
    """What the policy needs of one GEMM site of any kind (`fqtc.passes.sites.Site`).

    Args:
        name: site name (unique in the graph); key: the module path rules match (site name when no module).
        module_type: class name of the module. forward: the forward product node.
        grads_into: backward role with a quantized ``grad_output`` -> the forward tensor (fx node) whose gradient
            that GEMM produces. param_role: the role whose product is a parameter gradient (None for bmm).
    """

    name: str
    key: str
    module_type: str
    forward: Any
    grads_into: dict[str, Any]
    param_role: str | None


def site_views(sites: Sequence[Any]) -> list[SiteView]:
    """`SiteView`s of the sites of every kind (`fqtc.passes.sites.find_sites`), in graph order."""
    views = []
    for s in sites:
        if s.kind == "conv":
            into = {}
            if s.backward is not None and 0 in s.getitems:
                into["grad_input"] = s.forward.args[0]
            if s.backward is not None and 1 in s.getitems:
                into["grad_weight"] = s.forward.args[1]
            views.append(SiteView(s.name, s.module or s.name, s.module_type, s.forward, into, "grad_weight"))
            continue
        into = {}
        if "grad_input" in s.gemms and "g" in s.operand_pos.get("grad_input", {}):
            into["grad_input"] = s.a_base
        if "grad_weight" in s.gemms and "g" in s.operand_pos.get("grad_weight", {}):
            into["grad_weight"] = s.b_base
        views.append(SiteView(s.name, s.module or s.name, s.module_type, s.forward, into,
                              "grad_weight" if s.b_is_weight else None))
    if views:
        order = {n: i for i, n in enumerate(views[0].forward.graph.nodes)}
        views.sort(key=lambda v: order[v.forward])
    return views


def forward_dataflow(fx_graph: Any) -> "Any":
    """networkx DiGraph of the forward part of a joint graph: an edge from each input node to its user."""
    import networkx as nx

    from fqtc.passes.common import is_backward

    data = nx.DiGraph()
    for n in fx_graph.nodes:
        if is_backward(n):
            continue
        data.add_node(n)
        for inp in n.all_input_nodes:
            if not is_backward(inp):
                data.add_edge(inp, n)
    return data


def site_feeds(sites: Sequence[Any], data: Any = None) -> "Any":
    """networkx DiGraph over site names: an edge i -> j when site i's forward product reaches site j's forward
    product through the forward part of the joint graph (backward nodes are left out)."""
    import networkx as nx

    g = nx.DiGraph()
    g.add_nodes_from(s.name for s in sites)
    if not sites:
        return g
    data = forward_dataflow(sites[0].forward.graph) if data is None else data
    fwd_of = {s.forward: s.name for s in sites}
    for s in sites:
        for anc in nx.ancestors(data, s.forward):
            if anc in fwd_of:
                g.add_edge(fwd_of[anc], s.name)
    return g


def upstream_param_sites(tensor: Any, views: Sequence[SiteView], data: Any) -> list[str]:
    """Sites with a parameter gradient that the gradient of ``tensor`` flows into: the sites whose forward product
    is ``tensor`` or one of its ancestors in ``data``."""
    import networkx as nx

    anc = (nx.ancestors(data, tensor) if tensor in data else set()) | {tensor}
    return [v.name for v in views if v.param_role and v.forward in anc]


def propagation_weights(views: Sequence[SiteView], out_sq: Mapping[tuple[str, str], float],
                        objective: str = "absolute") -> dict[tuple[str, str], float]:
    """Factor carrying a GEMM's added variance to the objective, per (site, role).

    ``objective="absolute"`` (the parameter gradients' total added variance): a parameter gradient (``grad_weight``
    of a Linear/conv) gets 1. A product that is an activation gradient (``grad_input``, and ``grad_weight`` of an
    activation-activation bmm) is summed with the other gradients of the same tensor into that tensor's gradient,
    which flows back to the parameter sites upstream. We carry the noise there at the *relative* level it has in
    that summed gradient, ``rho = V / sum_j ||product_j||^2`` (first order: the backward maps scale the noise like
    the signal they carry; j over the products that are gradients of the same tensor, their squared norms added,
    i.e. taken as uncorrelated; calibrated ``out_sq``), so its variance is multiplied by
    ``sum_i ||dW_i||^2 / sum_j ||product_j||^2``, i over the parameter sites upstream. With no parameter site
    upstream (e.g. the gradient flows into an embedding) the factor is 1: the variance is counted in the gradient
    it lands in.

    ``objective="relative"`` (the sum of per-parameter-tensor noise-to-signal ratios): a parameter gradient gets
    ``1 / ||dW||^2`` (its module's ``grad_weight`` products added when the module is called at several sites, as
    rules and units address modules; 0 when that norm is 0: no signal to protect). An activation gradient adds the
    relative noise ``rho`` to every upstream parameter tensor, so its factor is ``k / sum_j ||product_j||^2`` with
    k the number of parameter modules upstream (at least 1: with none upstream it counts once, in the gradient it
    lands in).
    """
    if objective not in ("absolute", "relative"):
        raise ValueError(f"autobits: objective {objective!r}; allowed: 'absolute', 'relative'")
    w: dict[tuple[str, str], float] = {}
    if not views:
        return w
    data = forward_dataflow(views[0].forward.graph)
    grads_of: dict[Any, list[tuple[str, str]]] = {}  # tensor (fx node) -> products that are its gradient
    param_sq: dict[str, float] = {}  # module key -> squared norm of its parameter gradient
    key_of = {v.name: v.key for v in views}
    for v in views:
        for role, tensor in v.grads_into.items():
            if role != v.param_role:
                grads_of.setdefault(tensor, []).append((v.name, role))
            else:
                param_sq[v.key] = param_sq.get(v.key, 0.0) + out_sq.get((v.name, role), 0.0)
    for v in views:
        for role, tensor in v.grads_into.items():
            if role == v.param_role:
                if objective == "absolute":
                    w[(v.name, role)] = 1.0
                else:
                    s = param_sq[v.key]
                    w[(v.name, role)] = 1.0 / s if s > 0 else 0.0
                continue
            ups = upstream_param_sites(tensor, views, data)
            den = sum(out_sq.get(k, 0.0) for k in grads_of.get(tensor, []))
            if objective == "absolute":
                num = sum(out_sq.get((u, "grad_weight"), 0.0) for u in ups)
                w[(v.name, role)] = num / den if ups and den > 0 and num > 0 else 1.0
            else:
                w[(v.name, role)] = max(1, len({key_of[u] for u in ups})) / den if den > 0 else 0.0
    return w


@dataclass
class AutoPlan:
    """What the automatic policy decided for one graph: bits and reason per (module key, role), the units it
    solved over (their ``variance`` is the objective's ``J_u``) and the solution (``total_variance`` is the
    objective's value). ``variance_units`` are the same units with the absolute added variance of the parameter
    gradients, whatever the objective, so that any assignment's estimated variance can be compared
    (``uniform_solution(plan.variance_units, 4).total_variance``)."""

    decisions: dict[tuple[str, str], tuple[int, str]]
    solution: Solution | None
    units: list[Unit]
    objective: str = "absolute"
    variance_units: list[Unit] = field(default_factory=list)

    def estimated_variance(self, bits: Mapping[Hashable, int]) -> float:
        """Estimated absolute added variance of the parameter gradients with ``bits`` per unit key."""
        return sum(u.variance.get(bits[u.key], 0.0) for u in self.variance_units)


def plan_auto(views: Sequence[SiteView], config: Any) -> AutoPlan:
    """Build the knapsack over this graph's ``grad_output`` quantizers from ``config.calibration`` and solve it.

    One unit per (module path, role): sites of one module called several times (shared weights) are one unit, as
    rules address modules (their objective terms and element counts add). Units whose bits a rule or ``keep_fp``
    fixed spend budget at their fixed bits (full precision: outside the budget); the others choose from
    ``config.auto_min_bits`` to 8 bits. The objective is ``config.auto_objective`` (module docstring); a unit's
    factor to it is the calibration's measured one when ``fqtc.calibrate`` ran with ``propagation="measured"``,
    else `propagation_weights`. Raises when a backward GEMM has no calibration statistics or was calibrated for
    another quantizer spec.
    """
    import sympy

    cal = config.calibration
    if cal is None:
        raise ValueError("fqt: bits='auto' needs gradient statistics: pass options['calibration'] = "
                         "fqtc.calibrate(model, batches, loss_fn), or compile through the fqt backend, which "
                         "calibrates online on the first calibration_steps training steps")
    objective = getattr(config, "auto_objective", "absolute")
    floor = getattr(config, "auto_min_bits", MIN_BITS)
    out_sq = {k: st.out_sq for k, st in cal.units.items()}
    prop = {obj: propagation_weights(views, out_sq, obj) for obj in ("absolute", objective)}
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    at: dict[str, int] = {}
    for v in views:
        for role in v.grads_into:
            spec, _ = config.resolve(v.key, role, "grad_output", v.module_type)
            if spec is None:
                continue  # full precision: outside the budget
            st = cal.units.get((v.name, role))
            if st is None:
                raise ValueError(
                    f"fqt: bits='auto' has no calibration for GEMM site {v.name!r} ({role}); calibrated: "
                    f"{sorted(cal.units)[:6]}... Run fqtc.calibrate on the same model and options, or fix its bits "
                    f"with a rule, e.g. {{'module': {v.key!r}, 'role': {role!r}, 'operand': 'grad_output', "
                    "'bits': 8}")
            want = (spec.quantizer, spec.rounding, "tensor" if spec.granularity == "tensor" else "group")
            if tuple(st.spec) != want:
                raise ValueError(
                    f"fqt: the calibration of site {v.name!r} ({role}) was computed for quantizer/rounding/"
                    f"grouping {tuple(st.spec)}, but this compile uses {want}; calibrate with the same options")
            fixed = spec.bits if config.bits_set_by_user(v.key, role, "grad_output", v.module_type) else None
            m = merged.setdefault((v.key, role), {"obj": dict.fromkeys(st.variance, 0.0),
                                                  "var": dict.fromkeys(st.variance, 0.0), "size": 0,
                                                  "fixed": fixed})
            measured = {"absolute": getattr(st, "propagation", None),
                        "relative": getattr(st, "propagation_relative", None)}
            f_abs = measured["absolute"] if measured["absolute"] is not None else prop["absolute"][(v.name, role)]
            f_obj = measured[objective] if measured[objective] is not None else prop[objective][(v.name, role)]
            for b, x in st.variance.items():
                m["var"][b] += x * f_abs
                m["obj"][b] += x * f_obj
            m["size"] = m["size"] + sympy.sympify(st.numel_expr)
            at.update(st.symbols)
    if not merged:
        return AutoPlan({}, None, [], objective)
    keys = list(merged)
    weights, independent = integer_weights([merged[k]["size"] for k in keys], at)

    def choices(curve: dict[int, float], fixed: int | None) -> dict[int, float]:
        return curve if fixed is not None else {b: x for b, x in curve.items() if b >= floor}

    units = [Unit(k, w, choices(merged[k]["obj"], merged[k]["fixed"]), merged[k]["fixed"])
             for k, w in zip(keys, weights)]
    var_units = [Unit(k, w, merged[k]["var"], merged[k]["fixed"]) for k, w in zip(keys, weights)]
    sol = solve(units, config.budget)
    sol.shape_independent = independent
    if not independent:
        sol.notes.append(f"element counts scale differently with the shape: budget exact at {at}")
    how = "exact" if sol.exact else f"greedy, gap <= {sol.gap:.3g}"
    decisions = {}
    for u in units:
        if u.fixed is None:
            b = sol.bits[u.key]
            decisions[u.key] = (b, f"auto: G{b}, variance share {100 * sol.share(u.key, units):.1f}% "
                                   f"({objective} objective, budget {config.budget} avg bits, {how})")
    return AutoPlan(decisions, sol, units, objective, var_units)


def apply_auto(gm: Any, config: Any, sites: Sequence[Any]) -> Any:
    """``bits="auto"``: solve for this graph and return the config with the decisions as rules.

    Runs after preset expansion, before assign reads the rules. The decisions become rules *in
    front of* the user's rules (``Rule(module=<path>, role=..., operand="grad_output", bits=b, label="auto:
    ...")``), so user rules still win and the label is the recorded reason. The `AutoPlan` is kept in
    ``gm.meta["fqt_auto"]``. Other configs pass through.
    """
    if not config.bits.auto:
        return config
    import dataclasses

    from fqtc.config import Rule, _glob_escape

    plan = plan_auto(site_views(sites), config)
    gm.meta["fqt_auto"] = plan  # inspection: the units, the solution and its gap (CompiledGraph.joint.meta)
    auto_rules = tuple(Rule(module=_glob_escape(key), role=role, operand="grad_output", bits=b, label=why)
                       for (key, role), (b, why) in plan.decisions.items())
    return dataclasses.replace(config, rules=auto_rules + config.rules)
