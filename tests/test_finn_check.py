"""export/finn_check.py: FINN's own front end on the QONNX files this project writes.

FINN (finn-plus) lives in a virtual environment of its own (it pins its own torch, brevitas,
onnx and onnxruntime); the flow test runs where that environment exists
(``python export/finn_check.py`` creates it on first use), the rest everywhere."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from brevitas_ana.export import export_qnn, finn_check, graphs

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "export" / "finn_check.py"
HAVE_FINN = finn_check.finn_importable(finn_check.DEFAULT_VENV)
needs_finn = pytest.mark.skipif(not HAVE_FINN, reason=f"FINN's environment not at "
                                f"{finn_check.DEFAULT_VENV}: run export/finn_check.py once")


def trained_cnv(w: int, a: int, seed: int = 0):
    """bnn_pynq's CNV with a few training steps on colour-coded images (activation statistics
    and BN running statistics as training leaves them)."""
    from brevitas_examples.bnn_pynq.models.CNV import CNV
    torch.manual_seed(seed)
    model = CNV(num_classes=10, weight_bit_width=w, act_bit_width=a, in_bit_width=8, in_ch=3)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    model.train()
    g = torch.Generator().manual_seed(seed)
    for _ in range(3):
        labels = torch.randint(0, 10, (32,), generator=g)
        x = (labels.view(-1, 1, 1, 1).float() / 10 + 0.1 * torch.rand(32, 3, 32, 32,
                                                                     generator=g)).clamp(0, 1)
        loss = torch.nn.functional.cross_entropy(model(x), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def pixels(n: int, seed: int = 1):
    """Images as the recipes give them: uint8 pixels / 255."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), generator=g).float() / 255


def test_cli_names_missing_files(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "nope")],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 1
    assert f"--qonnx: {tmp_path / 'nope' / 'model_qonnx.onnx'} does not exist" in proc.stderr
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 2 and "give an export folder" in proc.stderr


def test_table_names_the_failing_stage():
    report = {"qonnx": "m.onnx", "num_images": 2, "finn_version": "1.6.1", "passed": False,
              "failed_stage": "to_hw", "hw_layers": {"MVAU": 9},
              "stages": [{"stage": "qonnx", "nodes": 44, "agreement": 100.0,
                          "max_diff_quanta": 0.0, "passed": True},
                         {"stage": "to_hw", "nodes": 23, "agreement": 100.0,
                          "max_diff_quanta": 0.0, "passed": False,
                          "error": "ValueError: hardware layers: Thresholding_0: "
                                   "numInputVectors = [0, 32, 32]"}]}
    text = finn_check.table(report)
    assert "FAILED at to_hw" in text and "numInputVectors = [0, 32, 32]" in text
    assert "MVAU x9" in text


@pytest.mark.slow
@needs_finn
@pytest.mark.parametrize("w,a", [(1, 1), (2, 2)])
def test_finn_flow_takes_the_exported_qonnx(w, a, tmp_path):
    model = trained_cnv(w, a)
    images = pixels(24)
    report = export_qnn(model, images, tmp_path / "export", formats=["qonnx"])
    assert report["passed"] and report["finn_ready"]["ready"]
    finn = finn_check.run_check(tmp_path / "export" / "model_qonnx.onnx",
                                tmp_path / "export" / "reference.npz", num_images=3,
                                keep=tmp_path / "finn", quiet=True)
    assert finn["passed"], finn_check.table(finn)
    assert [s["stage"] for s in finn["stages"]] == list(finn_check.STAGES)
    assert all(s["agreement"] == 100.0 and s["max_diff_quanta"] <= 1.0 for s in finn["stages"])
    # every quantised layer became a hardware layer, shapes are real
    assert finn["hw_layers"]["MVAU"] == 9 and finn["hw_layers"]["Thresholding"] == 1
    assert finn["hw_layers"]["ConvolutionInputGenerator"] == 6
    assert json.loads((tmp_path / "finn" / "finn_report.json").read_text())["passed"]
    assert (tmp_path / "finn" / "8_to_hw.onnx").exists()


@pytest.mark.slow
@needs_finn
def test_finn_flow_fails_on_a_symbolic_batch_naming_the_stage(tmp_path):
    """The file this project wrote before: batch 'N'. FINN's executor refuses it at the first
    stage, and the check says so."""
    import onnx
    model = trained_cnv(2, 2)
    images = pixels(4)
    export_qnn(model, images, tmp_path, formats=["qonnx"])
    dynamic = graphs.qonnx_from_torch(model, images[:1], dynamic_batch=True)
    onnx.save(dynamic, tmp_path / "model_qonnx.onnx")
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "--num-images", "2"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 1
    assert "FAILED at qonnx" in proc.stdout
    report = json.loads((tmp_path / "finn_report.json").read_text())
    assert report["failed_stage"] == "qonnx" and not report["passed"]
    assert np.load(tmp_path / "reference.npz")["logits"].shape == (4, 10)
