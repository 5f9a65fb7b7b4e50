"""Weighted k-nearest-neighbour classification on frozen features (cosine similarity).

Each of the k most similar training features votes for its class with weight
exp(similarity / temperature), as in DINO's k-NN evaluation.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def l2_normalize(x):
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@functools.partial(jax.jit, static_argnames=("k",))
def merge_top_k(top_sims, top_labels, train_x, train_y, test_x, *, k: int):
    """The running k best (similarity, label) of each test feature, updated with one chunk of
    training features. Earlier chunks win ties, as in one top_k over all of them."""
    sims = l2_normalize(test_x) @ l2_normalize(train_x).T
    sims = jnp.concatenate([top_sims, sims], axis=1)
    labels = jnp.concatenate([top_labels, jnp.broadcast_to(train_y, sims.shape[:1] + train_y.shape)], axis=1)
    top_sims, idx = jax.lax.top_k(sims, k)
    return top_sims, jnp.take_along_axis(labels, idx, axis=1)


@functools.partial(jax.jit, static_argnames=("num_classes",))
def vote(top_sims, top_labels, *, num_classes: int, temperature: float):
    """(num_test, num_classes) vote totals: each neighbour adds exp(similarity / temperature)."""
    weights = jnp.exp(top_sims / temperature)
    return (jax.nn.one_hot(top_labels, num_classes) * weights[..., None]).sum(axis=1)


def knn_scores(train_x, train_y, test_x, *, k: int, num_classes: int, temperature: float,
               chunk: int = 1024, train_chunk: int = 65536) -> np.ndarray:
    """(num_test, num_classes) vote totals. Features stay on the host and go to the device in
    chunks (`chunk` test x `train_chunk` training features at a time), so neither set has to fit
    in device memory; the running top-k is exact."""
    k = min(k, len(train_x))
    scores = []
    for i in range(0, len(test_x), chunk):
        queries = jnp.asarray(test_x[i : i + chunk], jnp.float32)
        top_sims = jnp.full((len(queries), k), -jnp.inf, jnp.float32)
        top_labels = jnp.zeros((len(queries), k), jnp.int32)
        for j in range(0, len(train_x), train_chunk):
            top_sims, top_labels = merge_top_k(
                top_sims, top_labels, jnp.asarray(train_x[j : j + train_chunk], jnp.float32),
                jnp.asarray(train_y[j : j + train_chunk], jnp.int32), queries, k=k,
            )
        scores.append(np.asarray(vote(top_sims, top_labels, num_classes=num_classes, temperature=temperature)))
    return np.concatenate(scores)


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    k = min(k, scores.shape[1])
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return float(np.mean(np.any(top == labels[:, None], axis=1)))


def knn_classify(train_x, train_y, test_x, test_y, num_classes: int, k: int = 20, temperature: float = 0.07,
                 chunk: int = 1024, train_chunk: int = 65536) -> dict:
    """Top-1 / top-5 accuracy of the weighted k-NN classifier (features streamed in chunks)."""
    k = min(k, len(train_x))
    scores = knn_scores(train_x, np.asarray(train_y), test_x, k=k, num_classes=num_classes,
                        temperature=temperature, chunk=chunk, train_chunk=train_chunk)
    return {"top1": topk_accuracy(scores, test_y, 1), "top5": topk_accuracy(scores, test_y, 5),
            "k": k, "temperature": temperature}
