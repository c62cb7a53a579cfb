import atexit
import os
import pickle
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

# The quantisers' closed forms run eagerly in the suite (compiling each of the hundreds of
# configurations the tests build would take longer than the tests); tests/test_fused.py checks the
# compiled kernels against the eager ones. BREVITAS_ANA_COMPILE=1 runs the whole suite compiled.
os.environ.setdefault("BREVITAS_ANA_COMPILE", "0")

# The compiled kernels' cache (C++ sources, shared objects; /tmp/torchinductor_<user> by default)
# would outlive the run and grow with every torch release the suite meets: this run's own
# folder, removed at exit (subprocesses inherit it)
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="brevitas_ana_inductor_")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], True)


def run_process(cmd, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)`` that
    stops the whole process tree on a timeout: ``accelerate launch``'s workers and the
    benchmarks' runs live in process sessions of their own, which ``subprocess.run``'s kill of
    the direct child leaves running. SIGTERM first (the launcher and the benchmarks pass it on
    to theirs), SIGKILL 30 s later."""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True, **kwargs) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def write_tiny_cifar(root: Path, per_batch: int = 24, test_size: int = 40, seed: int = 0) -> Path:
    """A CIFAR-10 folder in torchvision's python layout with a few images per batch. Each class
    has its own mean colour, so a network can learn something in a few steps."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    colours = rng.integers(30, 225, size=(10, 3))

    def batch(n, name):
        labels = rng.integers(0, 10, size=n)
        images = colours[labels][:, :, None, None] + rng.normal(0, 25, size=(n, 3, 32, 32))
        data = np.clip(images, 0, 255).astype(np.uint8).reshape(n, 3072)
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels.tolist(),
                         b"batch_label": name.encode()}, f)

    for i in range(1, 6):
        batch(per_batch, f"data_batch_{i}")
    batch(test_size, "test_batch")
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"class{i}".encode() for i in range(10)]}, f)
    return Path(root)


@pytest.fixture
def tiny_cifar(tmp_path):
    return write_tiny_cifar(tmp_path / "data")
