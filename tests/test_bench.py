"""bench.py runs and reports (a smoke run; speed targets live in bench.py's own output, not in tests)."""
import os
import pathlib
import platform
import subprocess
import sys

import pytest
import torch

import bench

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_bench_quick_runs_and_reports(capsys):
    rows = bench.main(["--quick", "--device", "cpu"])
    names = [r[0] for r in rows]
    assert any("LoRA" in n for n in names) and any("DoRA" in n for n in names)
    assert any("LMAM" in n for n in names) and any("generate" in n for n in names)
    assert all(r[1] > 0 and r[2] > 0 for r in rows)
    out = capsys.readouterr().out
    assert "| benchmark | ours (s) | reference (s) |" in out and "fp32 matmul peak measured" in out


def test_peak_memory_and_page_faults_see_a_fresh_64mb_tensor():
    touch = lambda: torch.ones(16 * 2 ** 20)                        # 64 MB: above glibc's mmap threshold
    if platform.libc_ver()[0] != "glibc" or not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("the CPU peak needs glibc's malloc_trim and a writable /proc/self/clear_refs (Linux)")
    peak = bench.peak_memory_mb(touch, "cpu")
    assert peak is not None and 60 <= peak < 200, peak               # None: the measurement failed
    faults = bench.page_faults()
    touch()
    assert bench.page_faults() - faults >= 64 // 2                  # one per page written: 4 KB, or 2 MB if huge


@pytest.mark.slow
def test_bench_keep_memory_runs_in_its_own_process():
    # --keep-memory changes glibc's malloc for the whole process: not in pytest's
    out = subprocess.run([sys.executable, "bench.py", "--quick", "--keep-memory"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "freed memory kept (--keep-memory)" in out.stdout and "page faults per run ours / ref" in out.stdout


def test_bench_inference_quick_reports_tables_2_and_3(capsys):
    rows = bench.main(["--inference", "--quick", "--device", "cpu"])
    assert len(rows) == 4 and all(ta > 0 and tb > 0 for _, ta, tb in rows)
    out = capsys.readouterr().out
    assert "h·min(n,N)² = 524,288 additions per layer" in out                      # Table 2 at LLaMA-7B's shapes
    # Table 3: the paper's numbers, from the formula and from the bytes of real tensors (bench asserts they agree)
    assert "| LLaMA-7B (h=32, n=128, r=2) | LMAM | 2hn(12r+n) = 1.19 MB |" in out
    assert "= 1.19 MB | 2hnn = 1 MB | 1 MB |" in out
    assert "| LLaMA2-70B (h=64, n=128, r=2) | LMAM | 2hn(12r+n) = 2.38 MB |" in out and "12hnn = 12 MB" in out


def test_bench_decoding_profile_accounts_for_each_step(capsys):
    """--decoding: the four decoding rows, then where a step's time goes on each side; the kinds
    of operators and the time outside them add up to the profiled total."""
    rows = bench.main(["--quick", "--decoding", "--device", "cpu"])
    assert [r[0] for r in rows] == ["generate, greedy, batch 1", "generate, 4 beams, batch 1",
                                    "generate, greedy, padded batch of 4", "generate, 4 beams, padded batch of 4"]
    out = capsys.readouterr().out
    assert out.startswith("machine: ") and "Where the time goes" in out
    profile = [line for line in out.splitlines() if line.startswith("| ") and " / " in line and "benchmark" not in line
               and "generate" not in line]
    kinds = [line.split(" | ")[0][2:] for line in profile]
    assert kinds[0] == "weight products" and kinds[-1] == "total (profiled)"
    assert "attention kernel (and its backward)" in kinds
    cells = [[[float(x) for x in cell.split(" / ")] for cell in line.strip("| ").split(" | ")[1:]] for line in profile]
    for column in range(4):
        for side in range(2):
            parts = sum(c[column][side] for c in cells[:-1])
            assert abs(parts - cells[-1][column][side]) < 0.02 + 0.01 * parts      # rounding to 0.01 ms only
            assert cells[0][column][side] > 0                                       # products were seen
