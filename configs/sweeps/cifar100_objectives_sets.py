"""Second half of cifar100_objectives.py for one 9-minute GPU call (docs/gpu_sweep.md): the control again
(the anchor of its table), 4 mask sets per image alone and with the target options, and the frozen
target. The mask-set points cost more a step (about 2.5x on a CPU; not measured on a GPU), so they
come first and the frozen target last."""

import os
import runpy

_ALL = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "cifar100_objectives.py"))
SHARED = _ALL["SHARED"]
POINTS = {name: _ALL["POINTS"][name] for name in ("control", "sets4", "d2v4_pooled_sets4", "frozen_target")}
