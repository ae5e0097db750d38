"""scripts/gpu_check.py in its CPU smoke mode: the inputs are built, every item that can run on a
CPU runs and reports, and the JSON and markdown reports are written."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_gpu_check_smoke_on_cpu(tmp_path):
    script = f"{ROOT}/scripts/gpu_check.py"
    out = subprocess.run([sys.executable, script, "--prepare"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    items = "sdpa,glue_head,syncs,generate,llama_1b,gpu_tests"            # compile_gc: tests/test_precision.py
    out = subprocess.run([sys.executable, script, "--device", "cpu", "--quick", "--only", items, "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())["items"]
    assert {n: r["status"] for n, r in report.items()} == {
        "sdpa": "ok", "glue_head": "ok", "syncs": "skipped", "generate": "ok", "llama_1b": "ok", "gpu_tests": "skipped"}
    assert report["generate"]["result"] == {"beams=1 identical": True, "beams=4 identical": True}
    assert report["sdpa"]["result"]["llama-7b causal"]["math"] is True
    assert "| glue_head | ok |" in (tmp_path / "gpu_check.md").read_text()
