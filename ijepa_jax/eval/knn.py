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


@functools.partial(jax.jit, static_argnames=("k", "num_classes"))
def knn_scores(train_x, train_y, test_x, *, k: int, num_classes: int, temperature: float):
    """(num_test, num_classes) vote totals."""
    sims = l2_normalize(test_x) @ l2_normalize(train_x).T
    top_sims, top_idx = jax.lax.top_k(sims, k)
    weights = jnp.exp(top_sims / temperature)
    votes = jax.nn.one_hot(train_y[top_idx], num_classes) * weights[..., None]
    return votes.sum(axis=1)


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    k = min(k, scores.shape[1])
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return float(np.mean(np.any(top == labels[:, None], axis=1)))


def knn_classify(train_x, train_y, test_x, test_y, num_classes: int, k: int = 20, temperature: float = 0.07,
                 chunk: int = 1024) -> dict:
    """Top-1 / top-5 accuracy of the weighted k-NN classifier; test features are processed in chunks."""
    k = min(k, len(train_x))
    train_x, train_y = jnp.asarray(train_x, jnp.float32), jnp.asarray(train_y)
    scores = np.concatenate([
        np.asarray(knn_scores(train_x, train_y, jnp.asarray(test_x[i : i + chunk], jnp.float32), k=k,
                              num_classes=num_classes, temperature=temperature))
        for i in range(0, len(test_x), chunk)
    ])
    return {"top1": topk_accuracy(scores, test_y, 1), "top5": topk_accuracy(scores, test_y, 5),
            "k": k, "temperature": temperature}
