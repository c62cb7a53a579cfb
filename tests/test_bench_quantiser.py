"""benchmarks/bench_quantiser.py --noise all: one table, every family beside stock."""
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_quantiser  # noqa: E402

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
