"""Convergence: the digits MLP trained under backend="fqt" at W8A8G8 ends within 1 accuracy point of FP32."""

from fqtc.demo import load_digits_split, train


def test_digits_mlp_w8a8g8_within_one_point_of_fp32():
    data = load_digits_split(0)
    fp32, _ = train("mlp", None, epochs=15, data=data)
    fqt, cg = train("mlp", {"bits": "W8A8G8"}, epochs=15, data=data)
    # measured (torch 2.13 CPU, 359 test images): fp32 96.66 %, fqt W8A8G8 97.21 %
    assert fp32.test_acc > 94
    assert fqt.test_acc >= fp32.test_acc - 1.0, (fp32.test_acc, fqt.test_acc)
    assert all(r["status"] == "quantized" for r in cg.records)  # it really trained quantized
    assert fqt.saved_bytes < fp32.saved_bytes
