"""Time the official I-JEPA train step (facebookresearch/ijepa, PyTorch) on one device.

    python launch/side_by_side/official_step.py --ijepa_src .ijepa_src [--compile] \
        [--model vit_huge --patch 14 --batch 128 --steps 10 --device cuda]

--ijepa_src: a folder holding the official repository's src/ (none of its code
is in this repository; docs/side_by_side.md says how to extract it). The step is
src/train.py's, on one GPU: its init_model (encoder + predictor), a deep-copied
target encoder, init_opt (AdamW, its four param groups and schedulers, a
GradScaler with bf16), bf16 autocast, target forward + LayerNorm, context
encoder + predictor, smooth L1, backward, optimizer step, grad_logger (it runs
every step there; --no-grad_stats leaves it out), zero_grad and the EMA loop.
No DistributedDataParallel: on one GPU it only adds its own overhead. Masks come
from its MaskCollator with the in1k_vith14_ep300.yaml values, one fresh batch of
masks per step, all drawn and moved to the device before timing (its loader
draws them in worker processes); one synthetic image batch is reused.
--compile wraps the three networks in torch.compile.

Prints one JSON line: median step ms (CUDA events), img/s, peak memory, the
batches' mean context/target lengths and, through this project's
tools.benchmark.analytic_flops at those lengths, model GFLOP/image and MFU.
"""

import argparse
import copy
import json
import logging
import os
import statistics
import sys
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ijepa_src", required=True, help="folder holding the official src/ (or src/ itself)")
    p.add_argument("--model", default="vit_huge")
    p.add_argument("--patch", type=int, default=14)
    p.add_argument("--crop", type=int, default=224)
    p.add_argument("--pred_depth", type=int, default=12)
    p.add_argument("--pred_width", type=int, default=384)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (torch.compile compiles here)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--compile", action="store_true", help="torch.compile the encoder, predictor and target")
    p.add_argument("--grad_stats", action=argparse.BooleanOptionalAction, default=True,
                   help="run the official grad_logger every step (as src/train.py does)")
    p.add_argument("--peak_tflops", type=float, default=None, help="for MFU (default: from the device name)")
    return p.parse_args(argv)


def import_official(src: str):
    """The official modules, from `src` (a folder holding src/, or src/ itself)."""
    root = os.path.abspath(src)
    root = os.path.dirname(root) if os.path.basename(root) == "src" else root
    if not os.path.isfile(os.path.join(root, "src", "helper.py")):
        sys.exit(f"official_step: no src/helper.py under --ijepa_src {src} (docs/side_by_side.md says how to get it)")
    sys.path.insert(0, root)
    from src import helper
    from src.masks.multiblock import MaskCollator
    from src.masks.utils import apply_masks
    from src.utils.logging import grad_logger
    from src.utils.tensors import repeat_interleave_batch

    logging.getLogger().setLevel(logging.WARNING)  # init_model logs the whole encoder
    return SimpleNamespace(helper=helper, MaskCollator=MaskCollator, apply_masks=apply_masks,
                           grad_logger=grad_logger, repeat_interleave_batch=repeat_interleave_batch)


def flops_and_peak(args, context_len: float, target_len: float, npred: int, device_kind: str):
    """Model FLOPs per image (this project's analytic count at these lengths) and the device's bf16 peak."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the count needs no device: keep jax off the GPU
    sys.path.insert(0, REPO)
    try:
        from ijepa_jax.tools.benchmark import analytic_flops, peak_tflops
    except ImportError as e:
        return None, args.peak_tflops, f"ijepa_jax.tools.benchmark: {e}"
    config = SimpleNamespace(model=SimpleNamespace(name=args.model, patch_size=args.patch,
                                                   pred_width=args.pred_width, pred_depth=args.pred_depth))
    spec = SimpleNamespace(num_patches=(args.crop // args.patch) ** 2, context_len=context_len,
                           target_len=target_len, num_targets=npred)
    return analytic_flops(config, spec)["total"], args.peak_tflops or peak_tflops(device_kind), None


def main(argv=None):
    args = parse_args(argv)
    official = import_official(args.ijepa_src)
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True  # as src/train.py
    device = torch.device(args.device)
    cuda = device.type == "cuda"

    encoder, predictor = official.helper.init_model(
        device=device, patch_size=args.patch, model_name=args.model, crop_size=args.crop,
        pred_depth=args.pred_depth, pred_emb_dim=args.pred_width)
    target = copy.deepcopy(encoder)
    for p in target.parameters():
        p.requires_grad = False
    ipe = 1281167 // 2048  # IN-1K at the official global batch: only the schedules' values depend on it
    optimizer, scaler, scheduler, wd_scheduler = official.helper.init_opt(
        encoder=encoder, predictor=predictor, wd=0.04, final_wd=0.4, start_lr=2e-4, ref_lr=1e-3, final_lr=1e-6,
        iterations_per_epoch=ipe, warmup=40, num_epochs=300, ipe_scale=1.0, use_bfloat16=cuda)
    ema = (0.996, 1.0)
    momentum = (ema[0] + i * (ema[1] - ema[0]) / (ipe * 300) for i in range(ipe * 300 + 1))
    if args.compile:
        encoder, predictor, target = (torch.compile(m) for m in (encoder, predictor, target))

    collator = official.MaskCollator(
        input_size=args.crop, patch_size=args.patch, pred_mask_scale=(0.15, 0.2), enc_mask_scale=(0.85, 1.0),
        aspect_ratio=(0.75, 1.5), nenc=1, npred=4, allow_overlap=False, min_keep=10)
    placeholders = [torch.zeros(1)] * args.batch  # the images are one synthetic batch on the device
    masks = []
    for _ in range(args.warmup + args.steps):
        _, m_enc, m_pred = collator(placeholders)
        masks.append(([m.to(device) for m in m_enc], [m.to(device) for m in m_pred]))
    imgs = torch.randn(args.batch, 3, args.crop, args.crop, device=device)

    def train_step(masks_enc, masks_pred):  # src/train.py's train_step, on one device
        scheduler.step()
        wd_scheduler.step()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):  # bf16 on CPU is slow: float32 there
            with torch.no_grad():
                h = target(imgs)
                h = F.layer_norm(h, (h.size(-1),))
                h = official.apply_masks(h, masks_pred)
                h = official.repeat_interleave_batch(h, len(imgs), repeat=len(masks_enc))
            z = predictor(encoder(imgs, masks_enc), masks_enc, masks_pred)
            loss = F.smooth_l1_loss(z, h)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if args.grad_stats:
            official.grad_logger(encoder.named_parameters())
        optimizer.zero_grad()
        with torch.no_grad():
            m = next(momentum)
            for param_q, param_k in zip(encoder.parameters(), target.parameters()):
                param_k.data.mul_(m).add_((1.0 - m) * param_q.detach().data)
        return float(loss.detach())

    t = time.perf_counter()
    for m_enc, m_pred in masks[: args.warmup]:
        loss = train_step(m_enc, m_pred)
    warmup_s = time.perf_counter() - t
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    t0 = time.perf_counter()
    for m_enc, m_pred in masks[args.warmup:]:
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            loss = train_step(m_enc, m_pred)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            loss = train_step(m_enc, m_pred)
            times.append(time.perf_counter() - t)
    total_s = time.perf_counter() - t0

    timed = masks[args.warmup:]
    k = statistics.mean(m_enc[0].shape[1] for m_enc, _ in timed)
    t_len = statistics.mean(m_pred[0].shape[1] for _, m_pred in timed)
    device_kind = torch.cuda.get_device_name(device) if cuda else "cpu"
    flops, peak, flops_error = flops_and_peak(args, k, t_len, len(timed[0][1]), device_kind)
    step_s = statistics.median(times)
    img_per_s = args.batch / step_s
    result = {
        "check": "official torch.compile" if args.compile else "official eager",
        "model": f"{args.model}/{args.patch}", "crop_size": args.crop, "batch_per_device": args.batch,
        "pred": f"{args.pred_depth}x{args.pred_width}", "dtype": "bfloat16 autocast" if cuda else "float32", "grad_stats": args.grad_stats,
        "device_kind": device_kind, "torch": torch.__version__,
        "context_len_mean": round(k, 1), "target_len_mean": round(t_len, 1),
        "warmup_s": round(warmup_s, 2), "steps": args.steps,
        "step_s": round(step_s, 4), "img_per_s": round(img_per_s, 1),
        "img_per_s_mean": round(args.steps * args.batch / total_s, 1),
        "model_gflops_per_image": None if flops is None else round(flops / 1e9, 3),
        "peak_tflops_per_device": peak,
        "mfu": None if not (flops and peak) else round(flops * img_per_s / (peak * 1e12), 4),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if cuda else None,
        "final_loss": loss,
    }
    if flops_error:
        result["flops_error"] = flops_error
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
