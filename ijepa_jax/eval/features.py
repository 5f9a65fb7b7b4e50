"""Frozen-encoder features: centre-cropped images -> average-pooled tokens of the last layers.

Features are extracted once per (encoder, dataset, split, image size),
batched, jit-compiled and sharded over the batch axis, and cached as .npz so
that every probe, k-NN and low-shot run afterwards costs seconds. The
attentive probe's patch tokens (pooled_features_and_tokens, float16, (N, T, D))
come from the same forward pass and loop but stay in host memory: they are
not cached on disk.
"""

from __future__ import annotations

import hashlib
import io
import json
import time

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np

from ijepa_jax import files, sharding
from ijepa_jax.data import transforms
from ijepa_jax.models import vit
from ijepa_jax.step import normalize

NUM_LAYERS = 4  # the paper's "last 4 layers" probe


def pooled_layer_features(encoder: vit.Encoder, params, images: jax.Array, num_layers: int = NUM_LAYERS):
    """(B, H, W, 3) normalised images -> (B, num_layers, D): the mean over tokens of each of the
    last `num_layers` blocks' outputs, each passed through the encoder's final LayerNorm (as the
    last layer is), the last entry being the encoder's own output. Needs an unrolled encoder."""
    return pooled_features_and_tokens(encoder, params, images, num_layers)[0]  # (jit drops the tokens)


def pooled_features_and_tokens(encoder: vit.Encoder, params, images: jax.Array, num_layers: int = NUM_LAYERS):
    """(pooled_layer_features, (B, T, D) float16 patch tokens of the last layer after the final LayerNorm,
    i.e. the encoder's output) from one forward pass; the tokens are the attentive probe's. float16
    halves the host memory they take (CIFAR-100 at ViT-Ti/4: 50,000 x 64 x 192 x 2 bytes = 1.2 GB)."""
    out, state = encoder.apply(
        {"params": params},
        images,
        capture_intermediates=lambda module, _: isinstance(module, vit.Block),
        mutable=["intermediates"],
    )
    blocks = state["intermediates"]["stack"]
    depth = len(blocks)
    final_norm = nn.LayerNorm(epsilon=1e-6, dtype=jnp.float32)
    layers = []
    for i in range(max(depth - num_layers, 0), depth - 1):  # shallower models give what they have
        x = blocks[f"blocks_{i}"]["__call__"][0][0]
        layers.append(final_norm.apply({"params": params["norm"]}, x).mean(axis=1))
    layers.append(out.mean(axis=1))
    return jnp.stack(layers, axis=1).astype(jnp.float32), out.astype(jnp.float16)


class CentreCrop(grain.transforms.Map):
    def __init__(self, size: int):
        self.size = size

    def map(self, element):
        return {"image": transforms.center_crop(element["image"], self.size), "label": np.int32(element["label"])}


def make_extractor(encoder: vit.Encoder, mean, std, mesh, tokens: bool = False):
    """A jitted (params, uint8 images) -> pooled features (with `tokens`: (pooled features, patch
    tokens), pooled_features_and_tokens), batch-sharded over `mesh`. The parameters keep the sharding
    they come with (a sharded train state's, or replicated)."""
    features_fn = pooled_features_and_tokens if tokens else pooled_layer_features

    def extract(params, images):
        return features_fn(encoder, params, normalize(images, mean, std))

    return jax.jit(
        extract,
        in_shardings=(None, sharding.batch_sharding(mesh)),
        out_shardings=sharding.replicated(mesh),  # every process gets all features back (they are small)
    )


def centre_crops(source, image_size: int) -> tuple:
    """(uint8 images (N, S, S, 3), labels (N,) int32) of every record of `source`, in order: what the
    features are computed from, in host memory (the fine-tuning protocol trains on them)."""
    ds = grain.MapDataset.source(source).map(CentreCrop(image_size)).batch(1024, drop_remainder=False)
    batches = list(ds.to_iter_dataset(grain.ReadOptions(num_threads=4, prefetch_buffer_size=4)))
    return (np.concatenate([b["image"] for b in batches]),
            np.concatenate([b["label"] for b in batches]).astype(np.int32))


def extract_features(extractor, params, source, image_size: int, batch_size: int, mesh, name: str = "") -> tuple:
    """(features, labels (N,) int32) for every record of `source`, in order: features (N, L, D)
    float32, or from a tokens extractor the pair (those, (N, T, D) float16 tokens)."""
    ds = grain.MapDataset.source(source).map(CentreCrop(image_size)).batch(batch_size, drop_remainder=False)
    it = iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=4, prefetch_buffer_size=4)))
    features, labels = [], []
    t0, done, num_batches = time.time(), 0, -(-len(source) // batch_size)
    for i, batch in enumerate(it):
        n = len(batch["label"])
        images = batch["image"]
        if n < batch_size:  # one static shape: pad the last batch, drop the padding after
            images = np.concatenate([images, np.zeros((batch_size - n,) + images.shape[1:], images.dtype)])
        out = extractor(params, sharding.put_shared_batch(images, mesh))  # every process reads every batch
        features.append(jax.tree.map(lambda a: np.asarray(a)[:n], out))
        labels.append(batch["label"])
        done += n
        if jax.process_index() == 0 and ((i + 1) % 20 == 0 or i + 1 == num_batches):
            rate = done / max(time.time() - t0, 1e-9)
            print(f"features {name}: {i + 1}/{num_batches} batches, {rate:.0f} img/s", flush=True)
    return jax.tree.map(lambda *parts: np.concatenate(parts), *features), np.concatenate(labels).astype(np.int32)


def cache_key(**parts) -> str:
    """A short stable name for what determines a feature set."""
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def params_digest(params) -> str:
    """The identity of an encoder: a hash of every parameter's path, shape, dtype and bytes (about a
    second per GB), so two encoders share cached features only if they are the same weights."""
    digest = hashlib.sha1()
    for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(params), key=lambda pl: jax.tree_util.keystr(pl[0])):
        value = np.asarray(leaf)
        digest.update(f"{jax.tree_util.keystr(path)}:{value.shape}:{value.dtype}".encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()[:12]


def cached(path: str, compute) -> tuple:
    """Load (features, labels) from `path`, or compute and save them (atomically). Returns (f, y, hit)."""
    if files.path(path).exists():
        with files.path(path).open("rb") as f, np.load(f) as z:
            return z["features"], z["labels"], True
    features, labels = compute()
    buffer = io.BytesIO()
    np.savez(buffer, features=features, labels=labels)
    files.write_bytes(path, buffer.getvalue())
    return features, labels, False
