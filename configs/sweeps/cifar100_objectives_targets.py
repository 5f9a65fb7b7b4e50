"""First half of cifar100_objectives.py for one 9-minute GPU call (docs/gpu_sweep.md): the control and
the target options (data2vec targets, the pooled term, both, CAPI's clustering targets). Same names and overrides as the full
file, so both halves can share one --workdir (the control is then trained once)."""

import os
import runpy

_ALL = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "cifar100_objectives.py"))
SHARED = _ALL["SHARED"]
POINTS = {name: _ALL["POINTS"][name] for name in ("control", "d2v4_pooled", "d2v4", "pooled", "capi1024")}
