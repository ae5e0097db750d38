"""bench.py runs and reports (a smoke run; speed targets live in bench.py's own output, not in tests)."""
import bench


def test_bench_quick_runs_and_reports(capsys):
    rows = bench.main(["--quick", "--device", "cpu"])
    names = [r[0] for r in rows]
    assert any("LoRA" in n for n in names) and any("DoRA" in n for n in names)
    assert any("LMAM" in n for n in names) and any("generate" in n for n in names)
    assert all(r[1] > 0 and r[2] > 0 for r in rows)
    out = capsys.readouterr().out
    assert "| benchmark | ours (s) | reference (s) |" in out and "fp32 matmul peak measured" in out
