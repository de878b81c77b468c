"""The GPU kernel benchmark's wiring (tests/benchmarks/kernels_gpu.py): its --smoke run on tiny CPU shapes through
Triton's interpreter must time every case without an error, so the script is ready when a GPU is lent."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.triton
def test_gpu_benchmark_smoke_run_times_every_case(tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "kernels_gpu.json"
    script = REPO / "tests" / "benchmarks" / "kernels_gpu.py"
    subprocess.run([sys.executable, str(script), "--smoke", "--out", str(out)], check=True,
                   capture_output=True, env={**os.environ, "TRITON_INTERPRET": "1"}, timeout=600)
    result = json.loads(out.read_text())
    cases = [*result["selective_scan"], *result["ssd"]]
    assert cases and all("error" not in case for case in cases), cases
    for case in cases:
        for key in ("forward_triton", "forward_torch"):
            assert case[key]["seconds"] > 0 and case[key]["bytes"] > 0 and case[key]["fraction_of_bandwidth_bound"] > 0
        assert case["forward_backward_triton"]["seconds"] > 0
    ce = result["linear_cross_entropy"]
    assert all(ce[b]["fraction_of_compute_bound"] > 0 for b in ("triton", "torch", "plain")), ce
