"""`fqtc demo --quick` runs every row of the demo table (a few steps each) and prints the table and the site list."""

from fqtc.cli import main


def test_demo_quick_prints_table(capsys):
    assert main(["demo", "--quick"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(("mlp ", "cnn "))]
    assert [r.split()[:2] for r in rows] == [[m, c] for m in ("mlp", "cnn") for c in ("fp32", "W8A8G8", "W4A4G8")]
    assert "GEMM sites of the CNN at W8A8G8" in out
    assert "head     output" in out
