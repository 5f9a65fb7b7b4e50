"""Weighted k-NN on frozen features equals a brute-force reference."""

import numpy as np

from ijepa_jax.eval import knn


def brute_force_knn(train_x, train_y, test_x, num_classes, k, temperature):
    def unit(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    sims = unit(test_x) @ unit(train_x).T
    scores = np.zeros((len(test_x), num_classes))
    for i, row in enumerate(sims):
        for j in np.argsort(-row)[:k]:
            scores[i, train_y[j]] += np.exp(row[j] / temperature)
    return scores


def test_scores_equal_a_brute_force_loop():
    rng = np.random.default_rng(0)
    train_x, test_x = rng.normal(size=(60, 8)), rng.normal(size=(13, 8))
    train_y = rng.integers(0, 5, 60)
    ours = np.asarray(knn.knn_scores(train_x, train_y, test_x, k=7, num_classes=5, temperature=0.1))
    np.testing.assert_allclose(ours, brute_force_knn(train_x, train_y, test_x, 5, 7, 0.1), rtol=1e-4)


def test_accuracy_matches_the_reference_and_chunking_changes_nothing():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(4, 16)) * 3
    train_y, test_y = rng.integers(0, 4, 200), rng.integers(0, 4, 50)
    train_x = centres[train_y] + rng.normal(size=(200, 16))
    test_x = centres[test_y] + rng.normal(size=(50, 16))
    a = knn.knn_classify(train_x, train_y, test_x, test_y, 4, k=20, temperature=0.07, chunk=7)
    b = knn.knn_classify(train_x, train_y, test_x, test_y, 4, k=20, temperature=0.07, chunk=1000)
    ref = brute_force_knn(train_x, train_y, test_x, 4, 20, 0.07)
    assert a == b
    assert a["top1"] == np.mean(ref.argmax(1) == test_y) and a["top1"] > 0.9


def test_topk_accuracy():
    scores = np.array([[0.1, 0.5, 0.4], [0.9, 0.05, 0.05]])
    assert knn.topk_accuracy(scores, np.array([2, 0]), 1) == 0.5
    assert knn.topk_accuracy(scores, np.array([2, 0]), 2) == 1.0
    assert knn.topk_accuracy(scores, np.array([2, 1]), 5) == 1.0  # k above the class count: all classes
