"""ONNX export of fqt training graphs: checker(full_check), onnxruntime runs the forward and backward
graphs and matches the PyTorch graphs exactly on integer paths with nearest rounding; SR paths: the standard
RandomUniformLike translation is measured by SQNR, the com.fqt counter translation is bit-exact."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn

from benchmarks.models import MLP
from fqtc.export import onnx as fx_onnx
from fqtc.inspect import sqnr_db
from fqtc.inspect.driver import preserve_step

aten = torch.ops.aten


def _mlp():
    torch.manual_seed(0)
    return MLP(in_features=32, hidden=(24,), num_classes=8)


def _x():
    return torch.randn(6, 32, generator=torch.Generator().manual_seed(1))


def _uses_sum(gm, out_node) -> bool:
    """Does this output depend on an fp32 reduction (aten.sum: the bias gradients)? ORT's ReduceSum may add in
    another order than torch, so those outputs are compared with tolerances; everything else must be exact."""
    seen, todo = set(), [out_node]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.target in (aten.sum.dim_IntList, aten.sum.default):
            return True
        todo.extend(n.all_input_nodes)
    return False


def _export_and_run(tmp_path, options, sr="random", model=None, x=None):
    """Export forward and backward; return [(which, name, torch value, ORT value, exact expected)], op counts."""
    graphs = fx_onnx.graph_inputs(model or _mlp(), (_x() if x is None else x,), options)
    assert len(graphs) == 1
    rows, ops = [], {}
    for which in ("forward", "backward"):
        gm, args, names = graphs[0][which]
        path = str(tmp_path / f"{which}.onnx")
        fx_onnx.export_graph(gm, args, path, which, names, sr)
        model = onnx.load(path)
        onnx.checker.check_model(model, full_check=True)
        ops[which] = collections.Counter(n.op_type for n in model.graph.node)
        prepared, _ = fx_onnx._prepare(gm)
        with preserve_step():  # on copies: a forward graph updates BatchNorm buffers in place
            ref = prepared(*[a.clone() if isinstance(a, torch.Tensor) else a for a in args])
        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        assert [i.name for i in sess.get_inputs()] == names
        got = sess.run(None, {n: a.numpy() for n, a in zip(names, args)})
        outs = prepared.graph.output_node().args[0]
        assert len(got) == len(ref) == len(outs)
        for node, r, g in zip(outs, ref, got):
            rows.append((which, node.name, r.detach(), torch.from_numpy(np.asarray(g)), not _uses_sum(prepared, node)))
    return rows, ops


def test_nearest_rounding_matches_pytorch_exactly(tmp_path):
    rows, ops = _export_and_run(tmp_path, {"grad_rounding": "nearest"})
    # standard ops only: QuantizeLinear for the 8-bit per-tensor/per-channel quantizers, MatMulInteger GEMMs
    assert ops["forward"]["MatMulInteger"] == 2 and ops["forward"]["QuantizeLinear"] == 4
    assert ops["backward"]["MatMulInteger"] == 3
    assert not any(t.startswith(("Random", "Mix32", "CounterUniform")) for c in ops.values() for t in c)
    exact = 0
    for which, name, ref, got, must_be_exact in rows:
        assert got.dtype == ref.dtype and got.shape == ref.shape, (which, name)
        if must_be_exact:  # int8 codes, scales, every GEMM output and what follows it without a reduction
            torch.testing.assert_close(got, ref, rtol=0, atol=0, msg=f"{which} {name}")
            exact += 1
        else:  # bias gradients: fp32 ReduceSum vs torch.sum, one rounding apart (max diff measured: 4.8e-7)
            torch.testing.assert_close(got, ref, msg=f"{which} {name}")
    assert exact >= 8  # forward: output, codes and scales of x and h, relu mask; backward: both weight grads
    assert any(r.dtype == torch.int8 for _, _, r, _, _ in rows)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("sr", ["nearest", "counter"])
def test_non_finite_input_matches_pytorch(tmp_path, sr):
    """A NaN in one sample: the exported quantizers follow fqtc's non-finite policy (NaN scale, zero codes; also on
    the QuantizeLinear path) and ONNX Runtime reproduces the PyTorch graphs, NaNs included."""
    x = _x()
    x[2, 5] = float("nan")
    options = {"grad_rounding": "nearest"} if sr == "nearest" else {}
    rows, _ = _export_and_run(tmp_path, options, sr="counter", x=x)
    saw_nan = False
    for which, name, ref, got, must_be_exact in rows:
        assert got.dtype == ref.dtype and got.shape == ref.shape, (which, name)
        if must_be_exact:
            torch.testing.assert_close(got, ref, rtol=0, atol=0, equal_nan=True, msg=f"{which} {name}")
        else:
            torch.testing.assert_close(got, ref, equal_nan=True, msg=f"{which} {name}")
        saw_nan |= bool(ref.is_floating_point() and torch.isnan(ref).any())
    assert saw_nan  # the NaN reached the graphs' outputs instead of being hidden


class _GroupedCNN(torch.nn.Module):
    """Plain, depthwise (dilated) and grouped (strided) convs, a Linear head: every conv translation path."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 4, 3, padding=1)
        self.dw = torch.nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=4, bias=False)
        self.grouped = torch.nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2)
        self.fc = torch.nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.dw(torch.relu(self.conv(x))))
        return self.fc(torch.relu(self.grouped(x)).flatten(1))


def test_conv_model_matches_pytorch_exactly(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    rows, ops = _export_and_run(tmp_path, {"grad_rounding": "nearest"}, model=_GroupedCNN(), x=x)
    assert ops["forward"]["ConvInteger"] == 3 and ops["forward"]["MatMulInteger"] == 1
    assert ops["backward"]["ConvInteger"] == 3  # grad_weight of the convs: exact int32 sums over N*Ho*Wo
    assert ops["backward"]["ConvTranspose"] == 2  # grad_input of dw and grouped (conv's input needs no grad)
    for which, name, ref, got, must_be_exact in rows:
        if must_be_exact:
            torch.testing.assert_close(got, ref, rtol=0, atol=0, msg=f"{which} {name}")
        else:  # conv bias gradients: fp32 ReduceSum (max diff measured: 6e-8)
            torch.testing.assert_close(got, ref, msg=f"{which} {name}")


def test_stochastic_rounding_random_uniform_sqnr(tmp_path):
    rows, ops = _export_and_run(tmp_path, {"grad_rounding": "stochastic"}, sr="random")
    assert ops["backward"]["RandomUniformLike"] >= 2 and ops["backward"]["Floor"] >= 2
    for which, name, ref, got, _ in rows:
        if which == "forward":  # forward rounding is nearest: still exact
            torch.testing.assert_close(got, ref, rtol=0, atol=0)
        else:
            # other random draws than PyTorch's counter stream: two independent unbiased SR estimates of the same
            # gradient. Measured here (8-bit): weight grads 40.8 and 42.1 dB, first bias grad 44.6 dB, last bias
            # grad 143 dB (a sum of the unquantized tangent: only ReduceSum order differs).
            assert sqnr_db(ref, got) > 30, (name, sqnr_db(ref, got))


@pytest.mark.parametrize("grad_quantizer", ["uniform", "psq"])
def test_stochastic_rounding_counter_stream_is_bit_exact(tmp_path, grad_quantizer):
    rows, ops = _export_and_run(tmp_path, {"grad_rounding": "stochastic", "grad_quantizer": grad_quantizer},
                                sr="counter")
    if grad_quantizer == "psq":  # fqt::grad_quantize, with gradq's NaN policy (IsNaN) translated too
        assert ops["backward"]["IsNaN"] >= 2
    assert ops["backward"]["CounterUniform"] >= 2 and "RandomUniformLike" not in ops["backward"]
    model = onnx.load(str(tmp_path / "backward.onnx"))
    assert {f.name for f in model.functions} == {"Mix32", "CounterUniform"}
    assert {f.domain for f in model.functions} == {"com.fqt"}
    assert ("com.fqt", 1) in {(o.domain, o.version) for o in model.opset_import}
    for which, name, ref, got, must_be_exact in rows:
        if must_be_exact:
            torch.testing.assert_close(got, ref, rtol=0, atol=0, msg=f"{which} {name}")
        else:
            torch.testing.assert_close(got, ref, msg=f"{which} {name}")


def test_counter_uniform_function_matches_rng():
    """com.fqt::CounterUniform alone vs fqtc.quant.rng.uniform_like, including a step above 2^32."""
    from onnx import TensorProto, helper

    from fqtc.quant.rng import stream_key, uniform_from_index

    key = int(stream_key(3, 2**33 + 5, 12345))
    like = np.zeros((4, 5, 3), dtype=np.float32)
    node = helper.make_node("CounterUniform", ["like", "key"], ["u"], domain="com.fqt")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("like", TensorProto.FLOAT, like.shape),
                                            helper.make_tensor_value_info("key", TensorProto.UINT32, [])],
                              [helper.make_tensor_value_info("u", TensorProto.FLOAT, like.shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.fqt", 1)],
                              functions=fx_onnx.fqt_functions())
    onnx.checker.check_model(model, full_check=True)
    u = ort.InferenceSession(model.SerializeToString()).run(None, {"like": like, "key": np.array(key, np.uint32)})[0]
    idx = torch.arange(like.size, dtype=torch.int64).view(like.shape)
    want = uniform_from_index(idx, torch.tensor(key, dtype=torch.int64))
    torch.testing.assert_close(torch.from_numpy(u), want, rtol=0, atol=0)


def test_unknown_fqt_op_fails_naming_it(tmp_path, monkeypatch):
    monkeypatch.delitem(fx_onnx.TRANSLATIONS, torch.ops.fqt.qgemm.default)
    with pytest.raises(NotImplementedError, match=r"forward graph uses fqt op\(s\) with no ONNX translation: "
                                                  r"fqt::qgemm \(nodes qgemm"):
        fx_onnx.export_onnx(_mlp(), _x(), str(tmp_path / "m.onnx"))
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("rules", [[], [{"role": "grad_input", "operand": "weight", "granularity": "channel"}]],
                         ids=["defaults", "weight_scales_folded"])
def test_graphs_are_wired_by_name(tmp_path, rules):
    """The forward's saved outputs and the backward's inputs carry the same names, one to one (a saved parameter
    keeps its input name, the step is fqt_step, other saved tensors saved.<fx name>); gradients are named
    grad.<param> (grad.<input> for a data input). ONNX Runtime runs forward then backward, fed only by name, and
    reproduces the compiled model's gradients (with the weight scales folded into grad_input's gradient, too)."""
    from tests.helpers import compile_fqt

    options = {"grad_rounding": "nearest", "rules": rules}
    x = _x().requires_grad_()
    paths = fx_onnx.export_onnx(_mlp(), (x,), str(tmp_path / "m.onnx"), options)
    fwd, bwd = (onnx.load(p) for p in paths)
    f_in, f_out = [i.name for i in fwd.graph.input], [o.name for o in fwd.graph.output]
    b_in, b_out = [i.name for i in bwd.graph.input], [o.name for o in bwd.graph.output]
    saved = [n for n in b_in if not n.startswith("tangents")]
    assert saved and f_out[len(f_out) - len(saved):] == saved  # the last forward outputs, in the backward's order
    assert len(set(saved)) == len(saved) and "fqt_step" in saved
    assert all(n in f_in or n == "fqt_step" or n.startswith("saved.") for n in saved), saved
    data = [n for n in f_in if not n.startswith("param.") and n != "fqt_step"]
    params = [n for n, _ in _mlp().named_parameters()]
    assert b_out == [f"grad.{n}" for n in data] + [f"grad.{n}" for n in params]

    torch.manual_seed(2)
    tangent = torch.randn(6, 8)
    model = _mlp()
    compiled = compile_fqt(model, options)
    with preserve_step():
        xr = x.detach().clone().requires_grad_()
        ref_out = compiled(xr)
        ref_out.backward(tangent)
    ref = {f"grad.{n}": p.grad for n, p in model.named_parameters()} | {f"grad.{data[0]}": xr.grad}
    feeds = {f"param.{n}": p.detach().numpy() for n, p in model.named_parameters()}
    feeds |= {data[0]: x.detach().numpy(), "fqt_step": np.array(0, np.int64)}
    fsess, bsess = (ort.InferenceSession(p, providers=["CPUExecutionProvider"]) for p in paths)
    values = dict(zip(f_out, fsess.run(None, {n: feeds[n] for n in f_in})))
    torch.testing.assert_close(torch.from_numpy(values[f_out[0]]), ref_out.detach(), rtol=0, atol=0)
    values |= feeds | {"tangents_1": tangent.numpy()}
    grads = dict(zip(b_out, bsess.run(None, {n: values[n] for n in b_in})))
    for name, r in ref.items():
        exact = name.endswith(".weight")  # bias gradients: fp32 ReduceSum vs torch.sum, one rounding apart
        torch.testing.assert_close(torch.from_numpy(grads[name]), r, rtol=0 if exact else None,
                                   atol=0 if exact else None, msg=name)


def test_export_onnx_inference_and_cli(tmp_path, capsys):
    """End to end through the CLI: the inference graph (training=False) matches the compiled model's output."""
    from fqtc.cli import main

    out = tmp_path / "mlp.onnx"
    assert main(["export", "benchmarks.models:MLP", "--input-shape", "4,64", "--kwargs", '{"hidden": [16]}',
                 "--out", str(out), "--inference"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["fqt.graph"] == "inference" and '"role": "output"' in meta["fqt.records"]
    torch.manual_seed(0)  # the CLI builds the model and input from seed 0 in this order
    m = MLP(hidden=(16,))
    x = torch.randn(4, 64)
    from tests.helpers import compile_fqt

    with torch.no_grad():
        ref = compile_fqt(m)(x)
    sess = ort.InferenceSession(str(out))
    feeds = {}
    params = dict(m.named_parameters())
    for i in sess.get_inputs():
        if i.name.startswith("param."):
            feeds[i.name] = params[i.name[len("param."):]].detach().numpy()
        elif i.name == "fqt_step":
            feeds[i.name] = np.array(0, np.int64)
        else:
            feeds[i.name] = x.numpy()
    got = torch.from_numpy(sess.run(None, feeds)[0])
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_cli_exports_latent_weight_model_with_update_graph(tmp_path, capsys):
    """Latent bits on the command line: the CLI prepares the model, asks for --optimizer, and with it writes the
    update graph beside forward and backward."""
    from fqtc.cli import main

    out = tmp_path / "lwq.onnx"
    base = ["export", "benchmarks.models:MLP", "--input-shape", "4,64", "--kwargs", '{"hidden": [16]}',
            "--options", '{"bits": "W8A8G8L4"}', "--out", str(out)]
    with pytest.raises(SystemExit, match="--optimizer sgd"):
        main(base)
    assert main(base + ["--optimizer", "sgd", "--momentum", "0.9", "--lr", "0.01"]) == 0
    printed = capsys.readouterr().out
    for which in ("forward", "backward", "update"):
        path = tmp_path / f"lwq.{which}.onnx"
        assert f"wrote {path}" in printed
        onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    update_inputs = [i.name for i in onnx.load(str(tmp_path / "lwq.update.onnx")).graph.input]
    assert "lwq.net.1.weight.q" in update_inputs and "grad.net.1.weight" in update_inputs
    # the backward's gradient outputs are the update graph's gradient inputs, by name
    grads = [o.name for o in onnx.load(str(tmp_path / "lwq.backward.onnx")).graph.output]
    assert grads == [n for n in update_inputs if n.startswith("grad.")]


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="path must end with .onnx"):
        fx_onnx.export_onnx(_mlp(), _x(), str(tmp_path / "m.txt"))
    gm = fx_onnx.graph_inputs(_mlp(), (_x(),))[0]["forward"]
    with pytest.raises(ValueError, match="sr='exact'; allowed: random, counter"):
        fx_onnx.export_graph(gm[0], gm[1], str(tmp_path / "f.onnx"), sr="exact")


def test_translations_refuse_a_precomputed_amax():
    """Graphs lowered for CUDA pass the producer's amax to the quantizers (docs/kernels.md); the ONNX translations
    compute the statistic themselves and refuse such a graph with a clear error instead of ignoring the input."""
    from fqtc.export import onnx_gradq, onnx_ops

    amax = torch.ones(1)
    with pytest.raises(NotImplementedError, match="precomputed amax.*export the model itself"):
        onnx_ops._quantize(None, 8, [0], "nearest", 0, 0, None, amax)
    with pytest.raises(NotImplementedError, match="fqt::grad_quantize with a precomputed amax"):
        onnx_ops._grad_quantize(None, "psq", 8, [0], "stochastic", 0, 0, None, amax)
    with pytest.raises(NotImplementedError, match="fqt::bhq with a precomputed amax"):
        onnx_gradq.bhq(None, 4, [-1], "stochastic", 0, 0, None, amax)


def test_rotated_model_matches_pytorch(tmp_path):
    """rotate="hadamard": fqt::rotate exports as constant signs and Hadamard blocks (Mul, MatMul); codes, scales and
    GEMM outputs equal the compiled graphs' (the float rotation itself within fp32 rounding of the block sums)."""
    rows, ops = _export_and_run(tmp_path, {"grad_rounding": "nearest", "rotate": "hadamard"},
                                model=nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4)),
                                x=torch.randn(6, 64, generator=torch.Generator().manual_seed(3)))
    assert ops["forward"]["MatMul"] >= 4 and ops["backward"]["MatMul"] >= 2  # rotations (forward: x and W per site)
    mismatched = 0
    for which, name, ref, got, _ in rows:
        assert got.dtype == ref.dtype and got.shape == ref.shape, (which, name)
        if ref.is_floating_point():
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * max(ref.abs().max().item(), 1e-30),
                                       msg=f"{which} {name}")
        else:  # int8 codes (0 differ at this seed): a rotated value within fp32 rounding of a boundary may flip
            mismatched += int((got != ref).sum())
    assert mismatched <= 2
