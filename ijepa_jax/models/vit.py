"""ViT encoder and I-JEPA predictor (Flax Linen), matching the reference code.

Conventions shared by both models:
  * tokens are raster-ordered patches of a (grid_h, grid_w) grid;
  * position embeddings are fixed 2-D sin-cos tables (not parameters);
  * a token subset is given as int32 indices plus a boolean validity mask, so
    every shape is static: padded tokens are excluded as attention keys and
    their outputs are ignored by the loss.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# name -> (embed dim, depth, heads, mlp ratio), as in the reference vision_transformer.py.
# 'vit_micro' is not a reference size: it exists for unit tests and smoke runs.
VIT_SIZES: dict[str, tuple[int, int, int, float]] = {
    "vit_micro": (64, 2, 2, 4.0),
    "vit_tiny": (192, 12, 3, 4.0),
    "vit_small": (384, 12, 6, 4.0),
    "vit_base": (768, 12, 12, 4.0),
    "vit_large": (1024, 24, 16, 4.0),
    "vit_huge": (1280, 32, 16, 4.0),
    "vit_giant": (1408, 40, 16, 48 / 11),
}

# The reference's effective init: trunc_normal_(std=0.02) cut at +-2 *absolute*,
# i.e. a plain normal for all practical purposes (see docs/reference-parity.md).
_weight_init = nn.initializers.normal(stddev=0.02)
_LN_EPS = 1e-6

# model.remat_policy -> what a rematerialised block keeps from its forward pass.
REMAT_POLICIES = {
    "full": None,  # nothing: the whole block is recomputed (least memory)
    "dots": jax.checkpoint_policies.checkpoint_dots,  # every matmul output
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # weight matmuls, not attention's
}


def sincos_1d(embed_dim: int, positions: np.ndarray) -> np.ndarray:
    """[sin(pos * omega), cos(pos * omega)], omega_i = 1 / 10000**(i / (embed_dim/2))."""
    if embed_dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dimension, got {embed_dim}")
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    angles = np.outer(positions.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(embed_dim: int, grid_h: int, grid_w: int) -> np.ndarray:
    """Fixed 2-D table of shape (grid_h * grid_w, embed_dim), raster order.

    As in the reference, the FIRST half of the channels encodes the column (x)
    index and the second half the row (y) index.
    """
    if embed_dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a dimension divisible by 4, got {embed_dim}")
    rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
    table = np.concatenate(
        [sincos_1d(embed_dim // 2, cols), sincos_1d(embed_dim // 2, rows)], axis=1
    )
    return table.astype(np.float32)


def gather_tokens(x: jax.Array, idx: jax.Array) -> jax.Array:
    """x: (B, N, D), idx: (B, K) -> (B, K, D)."""
    return jnp.take_along_axis(x, idx[..., None], axis=1)


class MlpBlock(nn.Module):
    hidden_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        dense = functools.partial(nn.Dense, dtype=self.dtype, kernel_init=_weight_init)
        y = dense(self.hidden_dim, name="fc1")(x)
        y = nn.gelu(y, approximate=False)  # the reference uses the exact erf form
        return dense(x.shape[-1], name="fc2")(y)


class Attention(nn.Module):
    """Multi-head self-attention; `key_mask` (B, N) marks the keys to attend to.

    With `mask_is_prefix` the valid keys are known to be a prefix of each
    sequence (the encoder's context), so cuDNN gets their count as
    `key_value_seq_lengths` instead of a dense mask, which it would turn into
    an additive bias.
    """

    num_heads: int
    dtype: Any = jnp.float32
    implementation: str | None = None  # None/'xla' or 'cudnn'
    mask_is_prefix: bool = False

    @nn.compact
    def __call__(self, x, key_mask):
        b, n, d = x.shape
        head_dim = d // self.num_heads
        dense = functools.partial(nn.Dense, dtype=self.dtype, kernel_init=_weight_init)
        qkv = dense(3 * d, name="qkv")(x).reshape(b, n, 3, self.num_heads, head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        mask, kv_lengths = None, None
        if key_mask is not None and self.implementation == "cudnn" and self.mask_is_prefix:
            kv_lengths = key_mask.sum(-1, dtype=jnp.int32)
        elif key_mask is not None:
            mask = key_mask[:, None, None, :]
            if self.implementation == "cudnn":
                mask = jnp.broadcast_to(mask, (b, 1, n, n))  # cuDNN wants the full (query, key) shape
        out = jax.nn.dot_product_attention(
            q, k, v, mask=mask, key_value_seq_lengths=kv_lengths, implementation=self.implementation
        )
        return dense(d, name="proj")(out.reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm transformer block. Takes and returns (x, key_mask) so it can be scanned."""

    num_heads: int
    mlp_ratio: float
    dtype: Any = jnp.float32
    attention_impl: str | None = None
    mask_is_prefix: bool = False
    activation_sharding: Any = None
    emit_output: bool = False  # also return x as the scan's per-layer output (data2vec-style targets)

    @nn.compact
    def __call__(self, x, key_mask):
        if self.activation_sharding is not None:
            # Keep activations split by example: GSPMD would otherwise follow the FSDP-split weights.
            x = jax.lax.with_sharding_constraint(x, self.activation_sharding)
        norm = functools.partial(nn.LayerNorm, epsilon=_LN_EPS, dtype=self.dtype)
        y = norm(name="norm1")(x)
        attn = Attention(self.num_heads, self.dtype, self.attention_impl, self.mask_is_prefix, name="attn")
        x = x + attn(y, key_mask)
        y = norm(name="norm2")(x)
        x = x + MlpBlock(int(x.shape[-1] * self.mlp_ratio), self.dtype, name="mlp")(y)
        return x, (x if self.emit_output else None)


class BlockStack(nn.Module):
    """`depth` blocks, either unrolled or as one scanned (optionally remat-ed) layer.

    Scanning keeps compile time flat in depth (ViT-H/ViT-g); parameters then
    carry a leading `depth` axis under `blocks/`. `remat_policy` names what a
    rematerialised block saves (see REMAT_POLICIES).
    """

    depth: int
    num_heads: int
    mlp_ratio: float
    dtype: Any = jnp.float32
    attention_impl: str | None = None
    scan: bool = False
    remat: bool = False
    remat_policy: str = "full"
    mask_is_prefix: bool = False
    activation_sharding: Any = None  # a batch sharding to constrain each block's input to (FSDP meshes)

    @nn.compact
    def __call__(self, x, key_mask, keep_layers: int = 0):
        """x after the blocks; with `keep_layers` = k > 0, (x, the last k blocks' outputs stacked (k, ...)).
        Scanned, every block's output is kept and the last k sliced (memory: depth x activations)."""
        block_cls = Block
        if self.remat:
            block_cls = nn.remat(Block, prevent_cse=not self.scan, policy=REMAT_POLICIES[self.remat_policy])
        kwargs = dict(
            num_heads=self.num_heads,
            mlp_ratio=self.mlp_ratio,
            dtype=self.dtype,
            attention_impl=self.attention_impl,
            mask_is_prefix=self.mask_is_prefix,
            activation_sharding=self.activation_sharding,
            emit_output=keep_layers > 0,
        )
        if self.scan:
            scanned = nn.scan(
                block_cls,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=nn.broadcast,
                length=self.depth,
            )
            x, outputs = scanned(**kwargs, name="blocks")(x, key_mask)
        else:
            outputs = []
            for i in range(self.depth):
                x, out = block_cls(**kwargs, name=f"blocks_{i}")(x, key_mask)
                outputs.append(out)
        if keep_layers <= 0:
            return x
        return x, (outputs[-keep_layers:] if self.scan else jnp.stack(outputs[-keep_layers:]))


class Encoder(nn.Module):
    """ViT without CLS token; a final LayerNorm after the blocks.

    __call__(images, token_idx=None, token_valid=None):
      images: (B, H, W, C), already normalised.
      token_idx: optional (B, K) patch indices to keep (the context); the
        encoder then processes only those K tokens, padding marked invalid.
    Returns (B, N or K, D).
    """

    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    dtype: Any = jnp.float32
    attention_impl: str | None = None
    scan: bool = False
    remat: bool = False
    remat_policy: str = "full"
    residual_dtype: Any = jnp.float32
    activation_sharding: Any = None

    @nn.compact
    def __call__(self, images, token_idx=None, token_valid=None, keep_layers: int = 0):
        """With `keep_layers` = k > 0: (output, the last k blocks' outputs before the final norm, (k, B, N, D))."""
        p = self.patch_size
        x = nn.Conv(
            self.embed_dim,
            (p, p),
            strides=(p, p),
            padding="VALID",
            kernel_init=_weight_init,
            dtype=self.dtype,
            name="patch_embed",
        )(images)
        b, gh, gw, d = x.shape
        # A float32 position table promotes the residual stream to float32, as
        # under the reference's bf16 autocast: only the matmuls run in `dtype`.
        x = x.reshape(b, gh * gw, d) + jnp.asarray(sincos_2d(d, gh, gw))[None]
        x = _to_residual_dtype(x, self.residual_dtype)
        if token_idx is not None:
            x = gather_tokens(x, token_idx)
        x = BlockStack(
            self.depth,
            self.num_heads,
            self.mlp_ratio,
            self.dtype,
            self.attention_impl,
            self.scan,
            self.remat,
            self.remat_policy,
            mask_is_prefix=True,  # masks.py packs each context's valid tokens first
            activation_sharding=self.activation_sharding,
            name="stack",
        )(x, token_valid, keep_layers)
        final_norm = nn.LayerNorm(epsilon=_LN_EPS, dtype=jnp.float32, name="norm")
        if keep_layers > 0:
            x, layers = x
            return final_norm(x), layers
        return final_norm(x)


class Predictor(nn.Module):
    """The I-JEPA predictor: a narrow ViT over [context tokens, mask tokens].

    __call__(context, context_idx, context_valid, target_idx, target_valid):
      context: (B, K, D_enc) encoder outputs for the context tokens;
      context_idx / context_valid: (B, K) their patch indices / validity;
      target_idx / target_valid: (B, M, T) patch indices / validity of M target
        blocks, each padded to T tokens.
    Returns (B, M, T, D_enc): one prediction per target token.
    """

    grid_h: int
    grid_w: int
    embed_dim: int  # predictor width
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    dtype: Any = jnp.float32
    attention_impl: str | None = None
    scan: bool = False
    remat: bool = False
    remat_policy: str = "full"
    residual_dtype: Any = jnp.float32
    activation_sharding: Any = None

    @nn.compact
    def __call__(self, context, context_idx, context_valid, target_idx, target_valid):
        b, k, enc_dim = context.shape
        _, m, t = target_idx.shape
        d = self.embed_dim
        pos = jnp.asarray(sincos_2d(d, self.grid_h, self.grid_w))  # float32: see Encoder
        dense = functools.partial(nn.Dense, dtype=self.dtype, kernel_init=_weight_init)

        x = dense(d, name="predictor_embed")(context) + pos[context_idx]
        mask_token = self.param("mask_token", _weight_init, (1, 1, d))
        targets = mask_token + pos[target_idx.reshape(b * m, t)]

        # One sequence per (image, target block): [context, that block's mask tokens].
        x = jnp.repeat(x, m, axis=0)
        x = _to_residual_dtype(jnp.concatenate([x, targets], axis=1), self.residual_dtype)
        key_valid = jnp.concatenate(
            [jnp.repeat(context_valid, m, axis=0), target_valid.reshape(b * m, t)], axis=1
        )
        x = BlockStack(
            self.depth,
            self.num_heads,
            self.mlp_ratio,
            self.dtype,
            self.attention_impl,
            self.scan,
            self.remat,
            self.remat_policy,
            activation_sharding=self.activation_sharding,
            name="stack",
        )(x, key_valid)
        x = nn.LayerNorm(epsilon=_LN_EPS, dtype=self.dtype, name="predictor_norm")(x[:, k:])
        x = dense(enc_dim, name="predictor_proj")(x)
        return x.reshape(b, m, t, enc_dim)


def _to_residual_dtype(x, residual_dtype):
    # float32 (the default) leaves the stream as it is: bit-identical to before the option existed.
    return x if jnp.dtype(residual_dtype) == jnp.float32 else x.astype(residual_dtype)


def _stack_options(model_config, activation_sharding=None) -> dict:
    """Encoder/predictor options read from `config.model` (older saved configs may lack the newer keys)."""
    return dict(
        activation_sharding=activation_sharding,
        attention_impl=model_config.attention_impl or None,
        scan=model_config.scan_layers,
        remat=model_config.remat,
        remat_policy=model_config.get("remat_policy", "full"),
        residual_dtype=jnp.dtype(model_config.get("residual_dtype", "float32")),
    )


def make_encoder(model_config, dtype: Any = None, activation_sharding=None) -> Encoder:
    """Encoder from `config.model` (name, patch_size, dtype, scan_layers, remat, ...)."""
    embed_dim, depth, heads, mlp_ratio = VIT_SIZES[model_config.name]
    return Encoder(
        patch_size=model_config.patch_size,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=heads,
        mlp_ratio=mlp_ratio,
        dtype=dtype or jnp.dtype(model_config.dtype),
        **_stack_options(model_config, activation_sharding),
    )


def make_predictor(model_config, grid_h: int, grid_w: int, dtype: Any = None, activation_sharding=None) -> Predictor:
    """Predictor from `config.model` (pred_depth, pred_width; heads = encoder heads)."""
    _, _, heads, _ = VIT_SIZES[model_config.name]
    return Predictor(
        grid_h=grid_h,
        grid_w=grid_w,
        embed_dim=model_config.pred_width,
        depth=model_config.pred_depth,
        num_heads=heads,
        dtype=dtype or jnp.dtype(model_config.dtype),
        **_stack_options(model_config, activation_sharding),
    )


def count_params(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))

