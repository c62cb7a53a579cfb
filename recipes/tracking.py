"""The recipe's metrics file as an accelerate tracker, beside TensorBoard: one
``accelerator.log(row, step)`` call feeds both.

``metrics.csv`` gets one row per epoch; a column that appears later (a new metric) rewrites the
file with the wider header. A resumed run keeps the rows of the epochs it does not redo."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional

from accelerate.tracking import GeneralTracker, on_main_process

from brevitas_ana.export.export_qnn import atomic_write


class CSVTracker(GeneralTracker):
    """``metrics.csv`` in ``run_dir``. ``keep_epochs``: rows of epochs up to this one survive
    a resume; later ones (and every row when None) are dropped when the tracker starts."""

    name = "csv"
    requires_logging_directory = False

    def __init__(self, run_dir, keep_epochs: Optional[int] = None):
        # not @on_main_process: built before the Accelerator, it must not create the process
        # state itself (that state would not know the launch is distributed)
        super().__init__()
        self.path = Path(run_dir) / "metrics.csv"
        self.keep_epochs = keep_epochs
        self.rows = []
        self.started = False

    @property
    def tracker(self):
        return self.path

    @on_main_process
    def store_init_configuration(self, values: dict):
        self._start()

    def _start(self):
        if self.started:
            return
        self.started = True
        if self.path.exists() and self.keep_epochs:
            with open(self.path, newline="") as f:
                self.rows = [r for r in csv.DictReader(f)
                             if int(r["epoch"]) <= self.keep_epochs]
        self._write()

    @on_main_process
    def log(self, values: dict, step: Optional[int] = None, **kwargs):
        self._start()
        self.rows.append(dict(values))
        self._write()

    def _write(self):
        if not self.rows:
            self.path.unlink(missing_ok=True)
            return
        fields = list(dict.fromkeys(k for r in self.rows for k in r))

        def write(tmp):
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=fields)
                writer.writeheader()
                writer.writerows(self.rows)
        atomic_write(self.path, write)

    @on_main_process
    def finish(self):
        pass
