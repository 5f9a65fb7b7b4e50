"""Third part of cifar100_objectives.py for one GPU call (docs/gpu_sweep.md): the control and CAPI's
clustering targets (1,024 clusters; a second seed; without the variance/covariance penalty), the
control's second seed, CAPI with flips, and CAPI at batch 64 and 32 with two seeds each (and at batch 32
with a fixed EMA of 0.99, with flips, with 256 clusters, with the other options, at twice the lr, with
fewer, larger targets, with a 12-block predictor, with a warmer clustering teacher, with a fixed EMA of
0.97 and with Adam's b2 at 0.95) and at batch 16 (four, eight and sixteen times the steps: last, as the
longest). Same names and overrides as the full file, so all parts can share one --workdir (the control is
then trained once)."""

import os
import runpy

_ALL = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "cifar100_objectives.py"))
SHARED = _ALL["SHARED"]
NAMES = ("control", "capi1024", "capi1024_seed1", "capi1024_novarcov", "control_seed1", "capi1024_flip",
         "capi1024_batch64_lr25", "capi1024_batch64_lr25_seed1", "capi1024_batch32_lr125",
         "capi1024_batch32_lr125_seed1", "capi1024_batch32_lr125_ema99_seed1",
         "capi1024_batch32_lr125_flip_seed1", "capi1024_batch32_lr125_k256_seed1",
         "capi1024_batch32_lr125_d2v4_seed1", "capi1024_batch32_lr125_pooled_seed1",
         "capi1024_batch32_lr125_sets4_seed1", "capi1024_batch32_lr25_seed1",
         "capi1024_batch32_lr125_targets2_seed1", "capi1024_batch32_lr125_pred12_seed1",
         "capi1024_batch32_lr125_tt10_seed1", "capi1024_batch32_lr125_ema97_seed1",
         "capi1024_batch32_lr125_b295_seed1", "capi1024_batch32_lr125_crop50_seed1",
         "capi1024_batch16_lr0625")
POINTS = {name: _ALL["POINTS"][name] for name in NAMES}
