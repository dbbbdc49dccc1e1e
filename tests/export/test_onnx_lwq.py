"""ONNX export of latent-weight models: the training graphs read LWQ storage through ``fqt::lwq_unpack`` /
``fqt::lwq_dequantize``, and ``export_onnx(..., optimizer=opt)`` writes the optimizer step as ``<stem>.update.onnx``.
With ``sr="counter"`` onnxruntime's step equals ``opt.step()`` bit for bit (codes, residuals, scales, importance
level, states, plain parameters); the statistics are fp32 means (another summation order)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import fqtc
from benchmarks.models import MLP
from fqtc.export import onnx as fx_onnx
from fqtc.export import onnx_lwq
from fqtc.inspect import sqnr_db
from tests.export.test_onnx import _export_and_run, _x


def _model(bits):
    torch.manual_seed(0)
    return fqtc.prepare(MLP(in_features=32, hidden=(24,), num_classes=8), {"bits": bits})


def _trained(bits, make_opt, steps=2):
    """A prepared MLP and its optimizer after ``steps - 1`` steps, with the gradients of one more backward."""
    model = _model(bits)
    opt = make_opt(model.parameters())
    for i in range(steps):
        model(_x()).square().mean().backward()
        if i < steps - 1:
            opt.step()
            opt.zero_grad()
    return model, opt


def _reference(name: str, model, opt):
    """The tensor that update-graph output ``name`` stands for, read from the model / optimizer after a step."""
    params = dict(model.named_parameters())
    if name == "found_inf":
        return opt.found_inf
    base = name[: -len(".new")] if name.endswith(".new") else name
    kind, rest = base.split(".", 1)
    if kind == "lwq":
        pname, inner = rest.rsplit(".", 1)
        return getattr(params[pname], inner)
    if kind == "param":
        return params[rest].detach()
    if kind == "stats":
        return opt.state[params[rest]]["stats"]
    if ".step" in rest and rest.endswith("step"):
        return opt.state[params[rest[: -len(".step")]]]["step"]
    pname, idx = rest.split(".buffers.")
    return opt.state[params[pname]]["buffers"][int(idx)]


def _run_update(tmp_path, model, opt, bits, sr="counter", full=False):
    """Export the update graph (``full``: all three graphs through `export_onnx`), run it in ORT on the
    optimizer's tensors. Returns (output names, ORT outputs by name, inputs by name)."""
    gm, args, names, out_names = onnx_lwq.update_graph(opt, model)
    path = str(tmp_path / "m.update.onnx")
    if full:
        paths = fx_onnx.export_onnx(model, (_x(),), str(tmp_path / "m.onnx"), {"bits": bits}, sr=sr, optimizer=opt)
        assert [p.rsplit("/", 1)[1] for p in paths] == ["m.forward.onnx", "m.backward.onnx", "m.update.onnx"]
    else:
        fx_onnx.export_graph(gm, args, path, "update", names, sr, None, out_names)
    proto = onnx.load(path)
    onnx.checker.check_model(proto, full_check=True)
    sess = ort.InferenceSession(path)
    assert [i.name for i in sess.get_inputs()] == names
    assert [o.name for o in sess.get_outputs()] == out_names
    got = sess.run(None, {n: a.numpy() for n, a in zip(names, args)})
    return out_names, {n: torch.from_numpy(np.asarray(g)) for n, g in zip(out_names, got)}, dict(zip(names, args))


@pytest.mark.parametrize("bits,make_opt", [
    # W8 + L4 (packed residual), fp32 momentum, mu re-selected every step with the paper's thresholds (small
    # steps: mu 3 -> 2 measured) and with fqtc's at a 12.5x smaller rate
    ("W8A8G8L4", lambda p: fqtc.optim.SGD(p, lr=1e-3, momentum=0.9, mu_interval=1, mu_rule="paper")),
    ("W8A8G8L4", lambda p: fqtc.optim.SGD(p, lr=8e-5, momentum=0.9, mu_interval=1)),
    # W4 (packed integer weight), 8-bit momentum, weight decay, Nesterov
    ("W4A8G8L4", lambda p: fqtc.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3,
                                          state_bits=8)),
    # L6 (int8 residual), AdamW with fp32 moments
    ("W8A8G8L6", lambda p: fqtc.optim.AdamW(p, lr=1e-3)),
    # L3, AdamW with 8-bit m and sqrt(v)
    ("W8A8G8L3", lambda p: fqtc.optim.AdamW(p, lr=1e-3, state_bits=8)),
], ids=["sgd-w8l4-paper", "sgd-w8l4", "sgd8-w4l4", "adamw-w8l6", "adamw8-w8l3"])
def test_update_graph_matches_optimizer_step(tmp_path, bits, make_opt):
    model, opt = _trained(bits, make_opt)
    out_names, got, inputs = _run_update(tmp_path, model, opt, bits, full=bits == "W8A8G8L4")
    opt.step()  # the reference: the optimizer's own fused fqt::lwq_update step
    changed = 0
    for name in out_names:
        ref = _reference(name, model, opt)
        assert got[name].dtype == ref.dtype and got[name].shape == ref.shape, name
        if name.startswith("stats."):  # fp32 means: ReduceMean vs torch.mean order (max diff measured: 1.9e-9)
            torch.testing.assert_close(got[name], ref, msg=name)
        else:
            torch.testing.assert_close(got[name], ref, rtol=0, atol=0, msg=name)
        if name.startswith("lwq.") and name.endswith((".q.new", ".r.new")):
            changed += int((ref != inputs[name[: -len(".new")]]).sum())
    assert changed > 0  # the step moved codes: the comparison is not of unchanged inputs
    if opt.defaults["mu_interval"] == 1:  # the importance level was re-selected, and differently per layer
        assert {int(got[n]) for n in out_names if n.endswith(".mu.new")} == {2, 3}
    assert got["found_inf"].item() is False


def test_update_graph_skips_a_step_with_nonfinite_gradients(tmp_path):
    model, opt = _trained("W8A8G8L4", lambda p: fqtc.optim.SGD(p, lr=0.05, momentum=0.9))
    model.net[3].bias.grad[0] = float("inf")
    out_names, got, inputs = _run_update(tmp_path, model, opt, "W8A8G8L4")
    assert got["found_inf"].item() is True
    for name in out_names:
        if name.endswith(".new"):  # every stored tensor unchanged, as opt.step() leaves them
            torch.testing.assert_close(got[name], inputs[name[: -len(".new")]], rtol=0, atol=0, msg=name)
    opt.step()
    assert bool(opt.found_inf)
    for name in out_names:
        torch.testing.assert_close(got[name], _reference(name, model, opt), rtol=0, atol=0, msg=name)


def test_update_graph_random_sr_is_close(tmp_path):
    """sr="random": RandomUniformLike rounds the residuals; the decoded latent weights agree to the residual's
    stochastic rounding error (measured 65.8 and 66.8 dB for the two L4 weights)."""
    model, opt = _trained("W8A8G8L4", lambda p: fqtc.optim.SGD(p, lr=0.05, momentum=0.9))
    out_names, got, _ = _run_update(tmp_path, model, opt, "W8A8G8L4", sr="random")
    assert "CounterUniform" not in {n.op_type for n in onnx.load(str(tmp_path / "m.update.onnx")).graph.node}
    opt.step()
    for pname in ("net.1.weight", "net.3.weight"):
        p = dict(model.named_parameters())[pname]
        w_onnx = torch.ops.fqt.lwq_dequantize.default(
            *[got[f"lwq.{pname}.{i}.new"] for i in ("q", "r", "s", "mu")], list(p.shape), p.wbits, p.lbits)
        assert sqnr_db(p.dequantize(), w_onnx) > 55, (pname, sqnr_db(p.dequantize(), w_onnx))


@pytest.mark.parametrize("bits", ["W8A8G8L4", "W4A8G8L4"])
def test_latent_model_training_graphs_match_pytorch(tmp_path, bits):
    """Forward (stored integer codes; W4 through fqt::lwq_unpack) and backward (fqt::lwq_dequantize for the
    per-tensor grad_input weight) of a prepared model: exact but for the fp32 bias-gradient sums."""
    rows, ops = _export_and_run(tmp_path, {"bits": bits, "grad_rounding": "nearest"}, model=_model(bits))
    assert ops["backward"]["Gather"] >= 1  # the residual codebook lookup of lwq_dequantize
    if bits.startswith("W4"):
        assert ops["forward"]["Concat"] >= 1  # the two nibbles of each byte
    inputs = [i.name for i in ort.InferenceSession(str(tmp_path / "forward.onnx")).get_inputs()]
    assert {"lwq.net.1.weight.q", "lwq.net.1.weight.s", "lwq.net.3.weight.q"} <= set(inputs)
    for which, name, ref, got, must_be_exact in rows:
        if must_be_exact:
            torch.testing.assert_close(got, ref, rtol=0, atol=0, msg=f"{which} {name}")
        else:
            torch.testing.assert_close(got, ref, msg=f"{which} {name}")


def test_latent_model_needs_the_optimizer(tmp_path):
    model = _model("W8A8G8L4")
    with pytest.raises(ValueError, match=r"latent weights \(net.1.weight, net.3.weight\).*pass optimizer="):
        fx_onnx.export_onnx(model, (_x(),), str(tmp_path / "m.onnx"))
    with pytest.raises(TypeError, match="optimizer must be a fqtc.optim optimizer"):
        fx_onnx.export_onnx(model, (_x(),), str(tmp_path / "m.onnx"),
                            optimizer=torch.optim.SGD([model.net[1].bias], lr=0.1))
    assert not list(tmp_path.iterdir())
    # the inference graph needs no optimizer
    assert fx_onnx.export_onnx(model, (_x(),), str(tmp_path / "m.onnx"), training=False) == [str(tmp_path / "m.onnx")]


def test_lwq_step_op_schema_and_fake():
    """fqt::lwq_step (the functional fqt::lwq_update the update graph is traced with): schema, fake impl, no
    mutation of its inputs."""
    model, opt = _trained("W4A8G8L4", lambda p: fqtc.optim.SGD(p, lr=0.05, momentum=0.9), steps=1)
    p = model.net[1].weight
    bufs = fqtc.ops.lwq.state_tensors("sgd", [0.05, 0.9, 0.0, 0.0, 0.0], list(p.shape), 32)
    args = (p.q, p.r, p.s, p.mu, p.grad, bufs, "sgd", [0.05, 0.9, 0.0, 0.0, 0.0], list(p.shape), p.wbits, p.lbits,
            0, p.stream, torch.tensor(1), torch.tensor(False), True, 100)
    before = [t.clone() for t in (p.q, p.r, p.s, p.mu)]
    torch.library.opcheck(torch.ops.fqt.lwq_step.default, args)
    for b, t in zip(before, (p.q, p.r, p.s, p.mu)):
        assert torch.equal(b, t)
