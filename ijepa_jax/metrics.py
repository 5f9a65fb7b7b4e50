"""Run logging: one JSON object per logged step, TensorBoard scalars, console progress.

Only process 0 writes. The files (often on a shared filesystem) and the
console are written by a background thread, so the train loop only queues a
record; each record is flushed as it is written, and `close()` (called in a
`finally`) writes everything still queued, so an exception loses nothing.
On object storage (gs://), which cannot append, metrics.jsonl is uploaded
whole after each record, and TensorBoard files go through tensorboardX's own
gs:// writer (it needs `google-cloud-storage`).
"""

from __future__ import annotations

import json
import logging
import math
import queue
import threading
import time

import jax

from ijepa_jax import files


def route_library_logs(workdir: str, show_info: bool) -> str | None:
    """Python/absl log records of INFO and below (orbax's dozens of lines per save, grain's, jax's)
    go to WORKDIR/logs/process_<i>.log instead of the console, which keeps warnings, errors and our
    own lines. `show_info` (the `--verbosity` flag given) leaves the console as absl set it.
    Returns the log file's path (None for a remote work dir: object stores cannot append)."""
    if show_info:
        return None
    from absl import logging as absl_logging

    absl_logging.get_absl_handler().setLevel(logging.WARNING)
    if files.is_remote(workdir):
        return None
    path = files.path(workdir) / "logs" / f"process_{jax.process_index()}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(filename)s:%(lineno)d] %(message)s"))
    logging.getLogger().addHandler(handler)
    if logging.getLogger().getEffectiveLevel() > logging.INFO:
        logging.getLogger().setLevel(logging.INFO)
    return str(path)


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}"


class MetricsWriter:
    """metrics.jsonl, TensorBoard and console lines, written in order by one background thread.

    `write` only formats and queues; close it (in a `finally`) to write what is queued.
    """

    def __init__(self, workdir: str, total_steps: int, resume_step: int = 0, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.total_steps = total_steps
        self._start = time.time()
        self._first_step = None
        self._jsonl = None  # metrics.jsonl open for appending (local work dirs)
        self._remote_lines = None  # or its lines, uploaded whole after each record (object stores)
        self._tb = None
        self._queue = queue.Queue()
        self._error = None
        self._thread = None
        if self.enabled:
            self.path = files.path(workdir) / "metrics.jsonl"
            self.path.parent.mkdir(parents=True, exist_ok=True)
            kept = _drop_records_after(self.path, resume_step)
            if files.is_remote(self.path):
                self._remote_lines = kept
            else:
                self._jsonl = self.path.open("a")
            from tensorboardX import SummaryWriter  # writes event files without TensorFlow

            self._tb = SummaryWriter(str(files.path(workdir) / "tensorboard"))
            self._thread = threading.Thread(target=self._drain, name="metrics_writer", daemon=True)
            self._thread.start()

    def write(self, step: int, metrics: dict) -> None:
        """Log the training metrics of `step` (1-based count of completed steps)."""
        if self.enabled:
            record = _record(step, metrics)
            self._submit(record, "train/", self._progress_line(step, record))

    def write_eval(self, step: int, metrics: dict) -> None:
        """Log evaluation results ('eval/...' keys) at `step`, beside the training records."""
        if self.enabled:
            line = f"eval at step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
            self._submit(_record(step, metrics), "", line)

    def console(self, line: str) -> None:
        """A console line, in order with the progress lines (printed at once where nothing is queued); only
        process 0's writer prints (each process saves its part of the same checkpoint: one line, not N)."""
        if not self.enabled:
            return
        if self._thread is None:
            print(line, flush=True)
        else:
            self._submit(None, "", line)

    def flush(self) -> None:
        """Waits until everything queued so far is written."""
        if self._thread is not None:
            self._queue.join()
        self._raise_error()

    def _submit(self, record: dict | None, tb_prefix: str, line: str) -> None:
        self._raise_error()
        self._queue.put((record, tb_prefix, line))

    def _drain(self) -> None:
        """The writer thread: one JSON line, its TensorBoard scalars and its console line per item, until None."""
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if self._error is None:  # after a failed write, drop the rest; the loop raises the error
                    self._append(*item)
            except BaseException as e:  # e.g. a full disk: raised in the loop thread by the next call
                self._error = e
            finally:
                self._queue.task_done()

    def _append(self, record: dict | None, tb_prefix: str, line: str) -> None:
        if record is not None:
            line_json = json.dumps(record) + "\n"
            if self._remote_lines is not None:
                self._remote_lines.append(line_json)
                files.write_text(self.path, "".join(self._remote_lines))
            else:
                self._jsonl.write(line_json)
                self._jsonl.flush()
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(tb_prefix + k, v, record["step"])
            self._tb.flush()
        print(line, flush=True)

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _progress_line(self, step: int, record: dict) -> str:
        now = time.time()
        if self._first_step is None:
            self._first_step, self._first_time = step, now
        done = step - self._first_step
        eta = (now - self._first_time) / done * (self.total_steps - step) if done > 0 else float("nan")
        eta_s = format_duration(eta) if math.isfinite(eta) else "?"
        if "img_per_s" in record:
            speed = f"img/s {record['img_per_s']:.1f}"
        elif "first_step_time_s" in record:  # compilation included: no throughput yet
            speed = f"first step {record['first_step_time_s']:.1f}s"
        else:
            speed = "img/s ?"
        line = (
            f"step {step}/{self.total_steps} epoch {record.get('epoch', 0):.2f} "
            f"loss {record['loss']:.4f} lr {record['lr']:.3g} {speed} "
            f"elapsed {format_duration(now - self._start)} eta {eta_s}"
        )
        if record.get("bad_images_skipped"):
            line += f" (unreadable images skipped so far: {record['bad_images_skipped']})"
        return line

    def close(self) -> None:
        """Writes everything queued, then closes the files; raises if a write failed."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb:
            self._tb.close()
            self._tb = None
        self._raise_error()


def _drop_records_after(path, step: int) -> list[str]:
    """On resume, drop records of steps past the checkpoint (the resumed run writes them again);
    returns the lines kept."""
    if not path.exists():
        return []
    lines = path.read_text().splitlines(keepends=True)
    steps = [_step_of(line) for line in lines]
    keep = [line.rstrip("\n") + "\n" for line, s in zip(lines, steps) if s is not None and s <= step]
    if len(keep) != len(lines):
        files.write_text(path, "".join(keep))  # whole: a crash here leaves the old file intact
    return keep


def _step_of(line: str) -> int | None:
    """The step of a metrics line; None for a blank or partly written one (a crash mid-write)."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def _record(step: int, metrics: dict) -> dict:
    return {"step": int(step), **{k: _to_python(v) for k, v in metrics.items()}}


def _to_python(v):
    if hasattr(v, "item"):
        v = v.item()
    return v
