"""Run logging: one JSON object per logged step, TensorBoard scalars, console progress.

Only process 0 writes. Files are opened in append mode and flushed per
record, so a crash never loses what was already logged.
"""

from __future__ import annotations

import json
import math
import os
import time

import jax


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}"


class MetricsWriter:
    def __init__(self, workdir: str, total_steps: int, resume_step: int = 0, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.total_steps = total_steps
        self._start = time.time()
        self._first_step = None
        self._jsonl = None
        self._tb = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            path = os.path.join(workdir, "metrics.jsonl")
            _drop_records_after(path, resume_step)
            self._jsonl = open(path, "a")
            from tensorboardX import SummaryWriter  # writes event files without TensorFlow

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict) -> None:
        """Log the training metrics of `step` (1-based count of completed steps)."""
        record = self._append(step, metrics, tb_prefix="train/")
        if record:
            print(self._progress_line(step, record), flush=True)

    def write_eval(self, step: int, metrics: dict) -> None:
        """Log evaluation results ('eval/...' keys) at `step`, beside the training records."""
        record = self._append(step, metrics, tb_prefix="")
        if record:
            print(f"eval at step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()), flush=True)

    def _append(self, step: int, metrics: dict, tb_prefix: str) -> dict | None:
        """One JSON line and its TensorBoard scalars, flushed at once; None on processes that do not write."""
        if not self.enabled:
            return None
        record = {"step": int(step), **{k: _to_python(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)):
                self._tb.add_scalar(tb_prefix + k, v, step)
        self._tb.flush()
        return record

    def _progress_line(self, step: int, record: dict) -> str:
        now = time.time()
        if self._first_step is None:
            self._first_step, self._first_time = step, now
        done = step - self._first_step
        eta = (now - self._first_time) / done * (self.total_steps - step) if done > 0 else float("nan")
        eta_s = format_duration(eta) if math.isfinite(eta) else "?"
        line = (
            f"step {step}/{self.total_steps} epoch {record.get('epoch', 0):.2f} "
            f"loss {record['loss']:.4f} lr {record['lr']:.3g} "
            f"img/s {record.get('img_per_s', float('nan')):.1f} "
            f"elapsed {format_duration(now - self._start)} eta {eta_s}"
        )
        if record.get("bad_images_skipped"):
            line += f" (unreadable images skipped so far: {record['bad_images_skipped']})"
        return line

    def close(self) -> None:
        if self._jsonl:
            self._jsonl.close()
        if self._tb:
            self._tb.close()


def _drop_records_after(path: str, step: int) -> None:
    """On resume, drop records of steps past the checkpoint: the resumed run writes them again."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    keep = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    if len(keep) != len(lines):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, path)  # atomic: a crash here leaves the old file whole


def _to_python(v):
    if hasattr(v, "item"):
        v = v.item()
    return v
