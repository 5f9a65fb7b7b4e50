"""Second half of cifar100_gpu_recipe.py (one 9-minute GPU call): the control again (the anchor of this
call's table), fewer and larger targets, more context, predictor depth 4 and 8. Same names and overrides
as the full file, so both halves can share one --workdir (the control is then trained once)."""

import os
import runpy

_ALL = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "cifar100_gpu_recipe.py"))
SHARED = _ALL["SHARED"]
POINTS = {name: _ALL["POINTS"][name] for name in ("control", "targets2", "context28", "pred4", "pred8")}
