"""No silent full precision (fqtc/coverage.py): a compiled model whose GEMM modules ran outside every fqt graph
warns once per cause, naming the modules, the reason and the fix; `fqtc.explain` reports them instead of raising."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fqtc
from fqtc.coverage import FullPrecisionWarning


class LSTMAfter(nn.Module):  # Dynamo compiles fc1, breaks the graph at the LSTM and skips the rest of the frame
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.lstm, self.fc2 = nn.Linear(8, 16), nn.LSTM(16, 16, batch_first=True), nn.Linear(16, 4)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        h, _ = self.lstm(h)
        return self.fc2(h)


class LSTMFirst(nn.Module):  # Dynamo compiles no graph at all: the backend never runs
    def __init__(self) -> None:
        super().__init__()
        self.lstm, self.fc = nn.LSTM(8, 16, batch_first=True), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(self.lstm(x)[0])


@torch.compiler.disable
def _eager(layer, h):
    return layer(h)


class Hidden(nn.Module):  # fc2 runs inside a function Dynamo does not trace: a graph break around it
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc3(_eager(self.fc2, torch.relu(self.fc1(x))))


class Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _train(compiled, x, steps=2):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for _ in range(steps):
            compiled(x).sum().backward()
    return [str(m.message) for m in w if issubclass(m.category, FullPrecisionWarning)]


def test_lstm_frame_skip_warns_once_and_explain_reports():
    torch.manual_seed(0)
    model, x = LSTMAfter(), torch.randn(2, 5, 8)
    msgs = _train(torch.compile(model, backend="fqt"), x)
    assert len(msgs) == 1, msgs  # once, not every step
    assert "lstm, fc2" in msgs[0] and "nn.LSTM" in msgs[0] and "Fix:" in msgs[0] and "fc1" not in msgs[0]
    report = fqtc.explain(model, x)
    assert [(o["module"], o["cause"]) for o in report.outside] == [("lstm", "rnn"), ("fc2", "rnn")]
    assert {s.module for s in report.sites} == {"fc1"}
    assert "outside every fqt graph (full precision): fc2 (Linear)" in str(report)
    assert fqtc.inspect.Report.from_json(report.to_json()).outside == report.outside


def test_no_graph_at_all_warns_through_fqtc_compile_and_explain_reports():
    torch.manual_seed(0)
    model, x = LSTMFirst(), torch.randn(2, 5, 8)
    report = fqtc.explain(model, x)  # no graph: a report, not an error
    assert report.sites == [] and {o["module"]: o["cause"] for o in report.outside} == {"lstm": "skipped",
                                                                                        "fc": "skipped"}
    msgs = _train(fqtc.compile(model), x)  # explain left the warn-once state alone
    assert len(msgs) == 1 and "lstm, fc" in msgs[0] and "skipped the frame" in msgs[0]


def test_graph_break_and_module_wrapper_name_their_cause():
    torch.manual_seed(0)
    x = torch.randn(3, 8)
    msgs = _train(torch.compile(Hidden(), backend="fqt"), x)
    assert len(msgs) == 1 and ": fc2. Reason: a graph break" in msgs[0], msgs
    wrapped = Plain()
    wrapped.fc2.forward = torch.compiler.disable(wrapped.fc2.forward)
    msgs = _train(torch.compile(wrapped, backend="fqt"), x)
    assert len(msgs) == 1 and ": fc2. Reason: a torch.compiler.disable wrapper" in msgs[0], msgs


@pytest.mark.parametrize("no_grad", [False, True])
def test_fully_captured_model_does_not_warn(no_grad):
    torch.manual_seed(0)
    model, x = Plain(), torch.randn(3, 8)
    compiled = fqtc.compile(model)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        if no_grad:
            with torch.no_grad():
                compiled(x)
        else:
            compiled(x).sum().backward()
    assert not [m for m in w if issubclass(m.category, FullPrecisionWarning)]
    assert fqtc.coverage.outside(model) == []
