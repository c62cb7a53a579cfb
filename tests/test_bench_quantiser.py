"""benchmarks/bench_quantiser.py --noise all: one table, every family beside stock."""
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_quantiser  # noqa: E402

from brevitas_ana.fused import COMPILE_SUPPORTED  # noqa: E402
from brevitas_ana.noise import noise_families  # noqa: E402


@pytest.mark.slow
def test_noise_all_prints_one_row_per_family(capsys):
    bench_quantiser.main(["--noise", "all", "--bits", "1", "2", "--sigmas", "0.5",
                          "--repeats", "1", "--warmup", "0", "--batch-size", "4"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[0] == "| noise | sigma | backward | W1A1 | W2A2 |"
    families = [r.split("|")[1].strip() for r in rows[1:]]
    assert families == list(noise_families())
    for row in rows[1:]:
        cells = row.split("|")[4:6]
        for cell in cells:  # "time / memory", both positive ratios of measured steps
            t, m = (float(x) for x in re.findall(r"[\d.]+", cell))
            assert t > 0 and m > 0


@pytest.mark.slow
def test_profile_counts_launches_and_host_reads(capsys, monkeypatch):
    monkeypatch.setenv("BREVITAS_ANA_COMPILE", "1")  # what users run (the suite runs eagerly)
    bench_quantiser.main(["--noise", "uniform", "normal", "--bits", "2", "--sigmas", "0.5",
                          "--repeats", "1", "--warmup", "1", "--batch-size", "4", "--profile"])
    lines = [line for line in capsys.readouterr().out.splitlines() if "launches per step" in line]
    assert len(lines) == 2
    for line in lines:
        l_stock, l_ana, _, r_stock, r_ana = (float(x) for x in re.findall(r"[\d.]+", line))
        assert l_stock > 100 and l_ana > 100  # a CNV step: hundreds of operators
        # ANA reads no clamp bound from the device, and its rounding is one compiled kernel
        # (where this torch compiles them: >= 2.14)
        assert r_ana <= r_stock, line
        assert l_ana < l_stock or not COMPILE_SUPPORTED, line
