"""Independent float64 numpy I-JEPA, written from ../shared/notes/ijepa-reference.md (nothing from ijepa_jax).

The primitives (sin-cos table, LayerNorm, exact GELU) are shared with test_step_golden.py, which walks
the Flax parameter tree; `encode` / `predict` here walk a state dict of the REFERENCE code instead
(torch names: Linear weights (out, in), conv weights (out, in, kh, kw), NCHW images), so they check a
weight conversion against the architecture as the reference defines it.
"""

import numpy as np
from scipy.special import erf


def sincos_table(dim, grid_h, grid_w):
    """Fixed 2-D sin-cos table, raster order: channels [0, dim/2) encode the COLUMN, [dim/2, dim) the
    ROW; each half is [sin(pos * w_i), cos(pos * w_i)], w_i = 1 / 10000**(i / (dim/4)), i < dim/4."""
    quarter = dim // 4
    omega = 1.0 / 10000.0 ** (np.arange(quarter) / quarter)
    rows, cols = np.divmod(np.arange(grid_h * grid_w), grid_w)

    def half(pos):
        angle = pos[:, None] * omega[None, :]
        return np.concatenate([np.sin(angle), np.cos(angle)], axis=1)

    return np.concatenate([half(cols), half(rows)], axis=1)


def layer_norm(x, scale=None, bias=None, eps=1e-6):
    mu = x.mean(-1, keepdims=True)
    y = (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps)
    return y if scale is None else y * scale + bias


def gelu(x, exact=True):
    if exact:
        return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


# --------------------------------------------------------------------------- reference state dicts


def _linear(x, sd, name):
    return x @ sd[name + ".weight"].T + sd[name + ".bias"]


def _norm(x, sd, name):
    return layer_norm(x, sd[name + ".weight"], sd[name + ".bias"])


def _block(x, sd, prefix, heads):
    """Pre-norm block of the reference: qkv (N, 3*D) viewed as (N, 3, heads, D/heads), softmax(q k^T / sqrt(hd))."""
    n, d = x.shape
    qkv = _linear(_norm(x, sd, prefix + "norm1"), sd, prefix + "attn.qkv")
    q, k, v = qkv.reshape(n, 3, heads, d // heads).transpose(1, 2, 0, 3)  # each (heads, N, hd)
    logits = q @ k.transpose(0, 2, 1) / np.sqrt(d // heads)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    x = x + _linear((w @ v).transpose(1, 0, 2).reshape(n, d), sd, prefix + "attn.proj")
    h = gelu(_linear(_norm(x, sd, prefix + "norm2"), sd, prefix + "mlp.fc1"))
    return x + _linear(h, sd, prefix + "mlp.fc2")


def _depth(sd, prefix):
    return len({k[len(prefix) :].split(".")[0] for k in sd if k.startswith(prefix)})


def encode(sd, image_chw, heads, keep=None):
    """The reference encoder on one normalised image (C, H, W) -> (N or len(keep), D): a stride-p conv
    written as patch flattening in the weight's (c, kh, kw) order, plus the STORED pos_embed."""
    sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
    w = sd["patch_embed.proj.weight"]  # (D, C, p, p)
    d, c, p, _ = w.shape
    g = image_chw.shape[1] // p
    patches = image_chw.reshape(c, g, p, g, p).transpose(1, 3, 0, 2, 4).reshape(g * g, c * p * p)
    x = patches @ w.reshape(d, -1).T + sd["patch_embed.proj.bias"] + sd["pos_embed"][0]
    if keep is not None:
        x = x[keep]
    for i in range(_depth(sd, "blocks.")):
        x = _block(x, sd, f"blocks.{i}.", heads)
    return _norm(x, sd, "norm")


def predict(sd, z, ctx_idx, tgt_idx, heads):
    """The reference predictor for ONE (image, target block): [embed(z) + pos[ctx], mask + pos[tgt]] through
    the blocks; LayerNorm and projection of the target positions -> (len(tgt_idx), D_enc)."""
    sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
    pos = sd["predictor_pos_embed"][0]
    x = _linear(z, sd, "predictor_embed") + pos[ctx_idx]
    x = np.concatenate([x, sd["mask_token"][0] + pos[tgt_idx]], axis=0)
    for i in range(_depth(sd, "predictor_blocks.")):
        x = _block(x, sd, f"predictor_blocks.{i}.", heads)
    return _linear(_norm(x[len(ctx_idx) :], sd, "predictor_norm"), sd, "predictor_proj")
