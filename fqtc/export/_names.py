"""ONNX names that wire the exported graphs: the tensors the forward saves for backward and the backward's
gradients (docs/inspect_export.md, `fqtc.export_onnx`)."""

from __future__ import annotations

from typing import Any, Sequence

import torch.fx as fx


def graph_outputs(gm: fx.GraphModule) -> list[Any]:
    """The output values of ``gm`` as a list."""
    vals = gm.graph.output_node().args[0]
    return list(vals) if isinstance(vals, (tuple, list)) else [vals]


def saved_names(fwd: fx.GraphModule, bwd: fx.GraphModule, input_names: Sequence[str], step_names: set[str]
                ) -> dict[str, str]:
    """ONNX names of the tensors the forward saves for backward, keyed by their FX name (the partitioner gives a
    saved forward output and the backward input that reads it the same name). A saved forward input keeps its
    input name (``param.<name>``, ``fqt_step``, a data input's name), any other saved tensor is ``saved.<fx name>``;
    the forward output and the backward input carry that one name, so a runtime wires the graphs by name."""
    phs = {n.name: i for i, n in enumerate(fwd.graph.find_nodes(op="placeholder"))}
    wanted = {n.name for n in bwd.graph.find_nodes(op="placeholder") if not n.name.startswith("tangents")}
    names = {}
    for o in graph_outputs(fwd):
        if not isinstance(o, fx.Node) or o.name not in wanted:
            continue
        if o.name in step_names:
            names[o.name] = "fqt_step"
        elif o.name in phs and phs[o.name] < len(input_names):
            names[o.name] = input_names[phs[o.name]]
        else:
            names[o.name] = f"saved.{o.name}"
    return names


def grad_names(bwd: fx.GraphModule, input_names: Sequence[str]) -> list[str | None]:
    """ONNX names of the backward graph's (non-None) outputs: ``grad.<name>`` for the forward input ``param.<name>``
    (``lwq.<name>.{q,r,s,mu}``, the inner tensors of one latent weight, have one gradient, ``grad.<name>``, the
    update graph's input), ``grad.<input>`` for a data input. The backward returns one gradient per forward input
    before tensor subclasses are flattened; ``None`` (the exporter's name) if the counts disagree."""
    logical: list[str] = []
    for name in input_names:
        if name.startswith("lwq."):
            base = name[len("lwq."):].rsplit(".", 1)[0]
            if logical and logical[-1] == base:
                continue
            logical.append(base)
        else:
            logical.append(name[len("param."):] if name.startswith("param.") else name)
    outs = graph_outputs(bwd)
    if len(outs) != len(logical):
        return [None for o in outs if isinstance(o, fx.Node)]
    return [f"grad.{name}" for name, o in zip(logical, outs) if isinstance(o, fx.Node)]
