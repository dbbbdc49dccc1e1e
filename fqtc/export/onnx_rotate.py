"""ONNX translation of ``fqt::rotate`` (the randomized Hadamard rotation, `fqtc.quant.rotate`).

The signs and the Hadamard block are pure functions of (seed, stream, block), so they become constants of the ONNX
graph: ``x -> (x * d) H`` (``Mul``, ``Reshape`` into blocks, ``MatMul``, ``Reshape``) and the inverse
``y -> (y H) * d``; a rotation along a dimension other than the last is wrapped in two ``Transpose``. Shapes must be
static (the exporter traces with concrete example inputs).
"""

from __future__ import annotations

import onnx

from fqtc.export._common import _op, _static_shape
from fqtc.quant import rotate as _rot


def _const(name: str, values, dims: list[int]):
    return _op().Constant(value=onnx.helper.make_tensor(name, onnx.TensorProto.FLOAT, dims, values))


def rotate(x, dim: int, block: int, seed: int, stream: int, inverse: bool):
    op = _op()
    shape = _static_shape(x)
    if shape is None:
        raise NotImplementedError("fqtc.export_onnx: fqt::rotate needs a static input shape")
    nd = len(shape)
    d = dim % nd
    perm = list(range(nd))
    perm[d], perm[-1] = perm[-1], perm[d]
    tshape = [shape[i] for i in perm]
    k = tshape[-1]
    signs = _const("rotate_signs", _rot.random_signs(k, seed, stream).tolist(), [k])
    h = _const("rotate_hadamard", _rot.hadamard(block).flatten().tolist(), [block, block])
    y = op.Transpose(x, perm=perm) if d != nd - 1 else x
    if not inverse:
        y = op.Mul(y, signs)
    y = op.MatMul(op.Reshape(y, op.Constant(value_ints=[*tshape[:-1], k // block, block])), h)
    y = op.Reshape(y, op.Constant(value_ints=tshape))
    if inverse:
        y = op.Mul(y, signs)
    return op.Transpose(y, perm=perm) if d != nd - 1 else y
