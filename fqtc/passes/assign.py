"""Pass 2: choose a QuantSpec for every operand of every GEMM of every site kind, and record it.

Preconditions: `fqtc.passes.sites.find_sites` found the sites and linked their GEMMs. The spec of each (site, role,
operand) comes from `FQTConfig.resolve`: ``keep_fp`` first, then the bit string's default, then the rules in order
(later wins). One counter of rule hits spans every kind, so a rule that matched only a convolution is not
reported as matching nothing. Linear and bmm GEMMs get a `GemmPlan` and their ``node.meta["fqt"]`` record now;
a convolution site keeps its decisions in ``site.specs`` (its GEMMs are two nodes, the backward one computing
both gradients, so `fqtc.passes.conv` writes its records when it splits them).

The granularity is turned into the dims of the operand's *base* tensor (the node after stripping transposes) over
which one scale is shared: ``tensor`` -> all dims; ``token``/``sample`` (activations, gradients) and ``channel``
(weights: output channels = rows of W) -> the last dim; ``channel`` (activations, gradients: feature columns) ->
every dim but the last; ``block`` -> the dims that are blocked (`block_dims`): b x b tiles over the two matrix dims
for a forward operand (input, weight) whose other GEMM (``grad_input`` for the weight, ``grad_weight`` for the input)
is also configured with blocks of the same size and so reads the same codes along the other dim; 1 x b groups along
this GEMM's reduction dim for a gradient, and for a forward operand that only one GEMM reads in blocks (docs/options.md,
"Block scaling"). The scales then follow the codes through the replayed transposes; a scale that varies
along the GEMM's reduction axis cannot sit in the epilogue, so that GEMM multiplies dequantized operands (same
product of the quantized values, no integer GEMM) and the record says so.

Before::  addmm.meta["fqt"] = {"site": "fc1", "role": "output"}
After::   addmm.meta["fqt"] = {..., "status": "quantized", "operands": {"input": {"bits": 8, "granularity":
          "tensor", "rounding": "nearest", "reason": "default W8A8G8"}, "weight": {...}}, "integer_gemm": True}

``status`` and ``integer_gemm`` here are the plan; `fqtc.passes.verify` replaces them with what the rewritten graph
shows (the fqt GEMM op and the int8 codes it reads).
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

import torch
import torch.fx as fx

from fqtc.config import DEFAULT_GRANULARITY, FQTConfig, QuantSpec
from fqtc.passes.common import strip_operand, tensor_shape
from fqtc.passes.records import GemmRecord, OperandRecord, gemm_record
from fqtc.passes.sites import CONV_ROLES, ConvSite, GemmSite, Site, gemm_operands


@dataclass
class OperandPlan:
    key: str  # "a" | "b" | "g"
    arg_index: int  # position among the GEMM's (a, b) operands
    spec: QuantSpec | None
    reason: str
    reduce_dims: list[int]


@dataclass
class GemmPlan:
    site: GemmSite
    role: str
    node: fx.Node
    operands: list[OperandPlan]
    integer_gemm: bool

    @property
    def status(self) -> str:
        n = sum(op.spec is not None for op in self.operands)
        return "quantized" if n == len(self.operands) else ("full_precision" if n == 0 else "partial")


def reduce_dims_for(spec: QuantSpec, operand: str, ndim: int, where: str) -> list[int]:
    if spec.granularity == "tensor":
        return list(range(ndim))
    if operand == "weight":
        if spec.granularity != "channel":
            raise ValueError(
                f"fqt: granularity {spec.granularity!r} does not apply to the weight operand ({where}); "
                "weights allow 'tensor' or 'channel' (per output channel); target activations with operand='input'"
            )
        return [ndim - 1]
    if spec.granularity in ("token", "sample"):
        return [ndim - 1]
    return list(range(ndim - 1))  # channel of an activation/gradient: one scale per feature column


def block_dims(base: fx.Node, chain: list[fx.Node], arg_index: int, tiles: bool) -> list[int]:
    """The base dims a block spec blocks (docs/options.md, "Block scaling"): the GEMM operand's two matrix dims
    (b x b tiles, ``tiles``: codes two GEMMs read along different dims) or its reduction dim alone (1 x b groups).
    Found by replaying the transposes on a meta tensor whose dim ``i`` has size ``i + 2``."""
    nd = base.meta["val"].dim()
    t = torch.empty([i + 2 for i in range(nd)], device="meta")
    for c in chain:
        t = c.target(t, *c.args[1:], **c.kwargs)
    red, other = (t.shape[-1], t.shape[-2]) if arg_index == 0 else (t.shape[-2], t.shape[-1])
    return sorted([red - 2, other - 2]) if tiles else [red - 2]


# The other GEMM reading a forward operand: the weight (key "b") is read by ``output`` and ``grad_input``, the
# forward input (key "a") by ``output`` and ``grad_weight`` (docs/architecture.md).
_PARTNER = {("output", "a"): "grad_weight", ("grad_weight", "a"): "output",
            ("output", "b"): "grad_input", ("grad_input", "b"): "output"}


def _shares_tiles(site: GemmSite, role: str, key: str, spec: QuantSpec, peek) -> bool:
    """Does the other GEMM reading this forward operand ask for blocks of the same size, so that both read one set
    of b x b tiles? Decided from the configuration, not from the GEMMs present in this graph, so an inference graph
    (no backward GEMMs) quantizes the operand exactly as the training graph's forward does."""
    partner = _PARTNER.get((role, key))
    if partner is None:
        return False
    other, _ = peek(site, partner, site.operand_name(key))
    return other is not None and other.granularity == "block" and other.block_size == spec.block_size


def _scale_ok(base: fx.Node, chain: list[fx.Node], reduce_dims: list[int], arg_index: int) -> bool:
    """Does the scale, after replaying the transposes, stay constant along the GEMM's reduction axis?"""
    shape = list(base.meta["val"].shape)
    dims = {d % len(shape) for d in reduce_dims}
    s = torch.empty([1 if i in dims else 2 for i in range(len(shape))], device="meta")
    for t in chain:
        s = t.target(s, *t.args[1:], **t.kwargs)
    return s.shape[-1] == 1 if arg_index == 0 else s.shape[-2] == 1


def assign(sites: list[Site], config: FQTConfig) -> list[GemmPlan]:
    """Resolve specs for every GEMM of every site; warn about rules that matched nothing. Returns the plans of the
    linear and bmm GEMMs (convolution sites hold theirs in ``site.specs``).

    ``run_passes`` hands in a config whose presets are expanded over all sites and whose ``bits="auto"``
    decisions are rules (`fqtc.passes.autobits.apply_auto`); presets left unexpanded (assign called on
    its own) are expanded here over the sites.
    """
    plans: list[GemmPlan] = []
    config = config.expand_presets([s.module or s.name for s in sites])
    rule_hits = [0] * len(config.rules)

    def resolve(site: Site, role: str, operand: str) -> tuple[QuantSpec | None, str]:
        key = site.module or site.name
        for i, rule in enumerate(config.rules):
            if rule.matches(key, role, operand, site.module_type):
                rule_hits[i] += 1
        return peek(site, role, operand)

    def peek(site: Site, role: str, operand: str) -> tuple[QuantSpec | None, str]:
        """``resolve`` without counting rule hits (the spec of a GEMM this graph may not hold)."""
        return config.resolve(site.module or site.name, role, operand, site.module_type)

    for site in sites:
        if isinstance(site, ConvSite):
            _assign_conv(site, resolve)
        else:
            plans.extend(_assign_gemm(site, resolve, peek))
    # a graph without a role (an inference graph has no backward GEMMs) gives the rules naming it nothing to match
    roles_here = {role for site in sites for role in site.roles}
    for i, hits in enumerate(rule_hits):
        if hits == 0 and config.rules[i].warn_unmatched and (config.rules[i].role is None
                                                             or config.rules[i].role in roles_here):
            warnings.warn(
                f"fqt: {config.rules[i].describe()} matched no GEMM operand; check the module glob and "
                "module_type against the module paths and types shown by fqtc.explain()",
                stacklevel=2,
            )
    return plans


def _assign_conv(site: ConvSite, resolve) -> None:
    for role in site.roles:
        for operand in CONV_ROLES[role]:
            spec, reason = resolve(site, role, operand)
            if spec is not None and spec.granularity == "block":
                # block scaling exists for the linear/bmm integer GEMM (fqtc.quant.block), not for the implicit
                # GEMM of a convolution: the operand keeps its default layout, and its recorded reason says so
                g = DEFAULT_GRANULARITY.get((role, operand), "tensor")
                spec = dataclasses.replace(spec, granularity=g)
                reason = f"{reason}; block scaling applies to linear and bmm GEMMs, this convolution keeps {g!r}"
            site.specs[(role, operand)] = (spec, reason)


def _assign_gemm(site: GemmSite, resolve, peek) -> list[GemmPlan]:
    plans = []
    for role, node in site.gemms.items():
        args = gemm_operands(node)
        ops: list[OperandPlan] = []
        integer = True
        for key, idx in sorted(site.operand_pos[role].items(), key=lambda kv: kv[1]):
            operand = site.operand_name(key)
            spec, reason = resolve(site, role, operand)
            base, chain = strip_operand(args[idx])
            dtype = base.meta["val"].dtype
            if spec is not None and not dtype.is_floating_point:
                raise TypeError(
                    f"fqt: cannot quantize the {operand} operand of GEMM site {site.name!r} ({role}): its dtype "
                    f"is {dtype}, not floating point. fqt quantizes float GEMMs; cast the tensor to float32/"
                    f"bfloat16, or keep the site in full precision with options={{'keep_fp': [{site.name!r}]}}"
                )
            dims: list[int] = []
            if spec is not None and spec.granularity == "block":
                dims = block_dims(base, chain, idx, key != "g" and _shares_tiles(site, role, key, spec, peek))
            elif spec is not None:
                where = f"site {site.name!r}, role {role!r}"
                dims = reduce_dims_for(spec, operand, base.meta["val"].dim(), where)
                if not _scale_ok(base, chain, dims, idx):
                    integer = False
            else:
                integer = False
            ops.append(OperandPlan(key, idx, spec, reason, dims))
        blocks = {op.spec.block_size for op in ops if op.spec is not None and op.spec.granularity == "block"}
        if len(blocks) > 1:
            raise ValueError(f"fqt: the operands of GEMM site {site.name!r} ({role}) ask for block sizes "
                             f"{sorted(blocks)}; both operands of one GEMM share its K-blocks, so give them one "
                             "block_size")
        plan = GemmPlan(site, role, node, ops, integer)
        node.meta["fqt"] = record(plan)
        plans.append(plan)
    return plans


def record(plan: GemmPlan) -> GemmRecord:
    """The ``node.meta["fqt"]`` record of one GEMM (`fqtc.passes.records.gemm_record`): the single source of truth
    read by inspect and export."""
    site, node = plan.site, plan.node
    a, b = gemm_operands(node)
    operands: dict[str, OperandRecord] = {}
    for op in plan.operands:
        entry: OperandRecord = {"bits": None, "reason": op.reason}
        if op.spec is not None:
            dims_key = "block_dims" if op.spec.granularity == "block" else "reduce_dims"
            entry = {**op.spec.to_dict(), "reason": op.reason, dims_key: op.reduce_dims}  # type: ignore[misc]
        operands[site.report_name(op.key)] = entry
    return gemm_record(site=site.name, module=site.module, module_type=site.module_type, role=plan.role,
                       op=str(node.target).replace("aten.", "").replace(".default", ""), node=node.name,
                       operands=operands, integer_gemm=plan.integer_gemm,
                       shapes={"a": tensor_shape(a), "b": tensor_shape(b), "out": tensor_shape(node)})
