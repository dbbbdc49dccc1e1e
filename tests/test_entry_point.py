"""The backend is found as backend="fqt" through the torch_dynamo_backends entry point, without importing fqtc."""

import subprocess
import sys
import textwrap


def test_backend_found_by_name_in_fresh_process():
    code = textwrap.dedent("""
        import sys, torch
        m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))
        before = "fqtc" in sys.modules
        out = torch.compile(m, backend="fqt", options={"bits": "W4A8G8", "seed": 0})(torch.randn(4, 8))
        out.sum().backward()
        import fqtc.backend as b
        recs = b.compiled_graphs()[-1].records
        print(before, "fqt" in torch._dynamo.list_backends(exclude_tags=()), len(recs),
              sorted({r["operands"]["weight"]["bits"] for r in recs if "weight" in r["operands"]}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    # fqtc not imported before compile; backend registered; 5 GEMMs (2 output, 2 grad_weight, 1 grad_input); W4
    assert out.stdout.split()[-4:] == ["False", "True", "5", "[4]"], out.stdout
