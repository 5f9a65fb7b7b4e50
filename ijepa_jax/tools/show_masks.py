"""Render a batch's crops with their context and target blocks to a PNG.

    python -m ijepa_jax.tools.show_masks --config configs/cifar100.py:vit_tiny \
        --config.data.root=../shared/data --out masks.png

Each image gets three panels: the crop; the context the encoder sees (other
patches greyed, padding never shown); the target blocks, one colour each.
"""

from __future__ import annotations

import ml_collections
import numpy as np
from absl import flags
from ml_collections import config_flags
from PIL import Image, ImageDraw

from ijepa_jax import bad_input, config_lib, masks
from ijepa_jax.data import pipeline, sources

FLAGS = flags.FLAGS

TARGET_COLOURS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240)]


def patch_mask(indices: np.ndarray, valid: np.ndarray, grid: int) -> np.ndarray:
    """Valid patch indices -> (grid, grid) boolean mask."""
    m = np.zeros(grid * grid, bool)
    m[indices[valid]] = True
    return m.reshape(grid, grid)


def render(batch: dict, grid: int, num_images: int, panel: int) -> Image.Image:
    """One row per image: crop | context | targets."""
    rows = min(num_images, len(batch["images"]))
    canvas = Image.new("RGB", (3 * panel, rows * panel), "white")
    cell = panel / grid
    for r in range(rows):
        crop = np.asarray(Image.fromarray(batch["images"][r]).resize((panel, panel), Image.NEAREST), np.float32)
        ctx = patch_mask(batch["context_idx"][r], batch["context_valid"][r], grid)
        ctx_px = np.kron(ctx, np.ones((int(np.ceil(cell)),) * 2))[:panel, :panel, None]
        context_panel = crop * ctx_px + (0.25 * crop + 0.75 * 200) * (1 - ctx_px)
        target_panel = Image.fromarray((0.35 * crop + 0.65 * 255).astype(np.uint8))
        draw = ImageDraw.Draw(target_panel, "RGBA")
        for m in range(batch["target_idx"].shape[1]):
            colour = TARGET_COLOURS[m % len(TARGET_COLOURS)]
            idx = batch["target_idx"][r, m][batch["target_valid"][r, m]]
            for i in idx:
                y, x = divmod(int(i), grid)
                box = [x * cell, y * cell, (x + 1) * cell - 1, (y + 1) * cell - 1]
                draw.rectangle(box, fill=colour + (110,), outline=colour + (255,))
        canvas.paste(Image.fromarray(crop.astype(np.uint8)), (0, r * panel))
        canvas.paste(Image.fromarray(context_panel.astype(np.uint8)), (panel, r * panel))
        canvas.paste(target_panel, (2 * panel, r * panel))
    return canvas


def define_flags(fv) -> None:
    """The command's flags (on flags.FLAGS from __main__, or a test's FlagValues)."""
    config_flags.DEFINE_config_file("config", None, "Config file, optionally CONFIG:ARG.", lock_config=True,
                                    flag_values=fv)
    flags.DEFINE_string("out", "masks.png", "Output PNG.", flag_values=fv)
    flags.DEFINE_integer("num_images", 8, "Images to show (rows).", flag_values=fv)
    flags.DEFINE_integer("panel_size", 160, "Pixel size of each panel.", flag_values=fv)
    flags.mark_flags_as_required(["config"], flag_values=fv)


def main(argv) -> None:
    """Through bad_input.run_command: a bad flag, config, dataset or --out is one line."""
    del argv
    if FLAGS.num_images < 1 or FLAGS.panel_size < 8:
        raise ValueError(f"--num_images={FLAGS.num_images} must be >= 1 and --panel_size={FLAGS.panel_size} >= 8.")
    bad_input.path_to_write(FLAGS.out, "--out", folder=False)
    config = ml_collections.ConfigDict(FLAGS.config.to_dict())
    config.data.batch_size = FLAGS.num_images  # one batch: target sizes are drawn per batch
    config.data.augment_on = "host"  # the same pixels as the device path, without devices
    config_lib.validate_on_host(config)
    spec = masks.resolve_spec(config)
    source = sources.make_source(config.data)
    ds = pipeline.pretrain_dataset(source, config.data, spec, seed=config.seed)
    batch = next(iter(ds))
    image = render(batch, spec.grid_h, FLAGS.num_images, FLAGS.panel_size)
    image.save(FLAGS.out)
    print(
        f"wrote {FLAGS.out}: {FLAGS.num_images} images, mode {spec.mode}, grid {spec.grid_h}x{spec.grid_w}, "
        f"{spec.context_tokens} context tokens, {spec.num_targets} targets of <= {spec.target_tokens}"
    )


if __name__ == "__main__":
    bad_input.run_command(main, define_flags)
