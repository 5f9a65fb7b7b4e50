"""First half of cifar100_gpu_recipe.py (one 9-minute GPU call): the control, the reference recipe, and
fixed EMA 0.99 and 0.996 with the penalty. Same names and overrides as the full file, so both halves can
share one --workdir (the control is then trained once)."""

import os
import runpy

_ALL = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "cifar100_gpu_recipe.py"))
SHARED = _ALL["SHARED"]
POINTS = {name: _ALL["POINTS"][name] for name in ("control", "reference", "ema99", "ema996")}
