"""Weighted k-NN on frozen features equals a brute-force reference, however the features are chunked."""

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


def test_scores_equal_a_brute_force_loop_for_any_chunking():
    """Streaming the training features in chunks (smaller than k, uneven, or all at once) keeps the exact top-k."""
    rng = np.random.default_rng(0)
    train_x, test_x = rng.normal(size=(60, 8)), rng.normal(size=(13, 8))
    train_y = rng.integers(0, 5, 60)
    expected = brute_force_knn(train_x, train_y, test_x, 5, 7, 0.1)
    for chunk, train_chunk in ((1024, 65536), (5, 4), (13, 7), (1, 60)):
        ours = knn.knn_scores(train_x, train_y, test_x, k=7, num_classes=5, temperature=0.1, chunk=chunk,
                              train_chunk=train_chunk)
        np.testing.assert_allclose(ours, expected, rtol=1e-4, err_msg=f"chunks {chunk} x {train_chunk}")


def test_ties_go_to_the_earlier_training_feature_across_chunks():
    """Duplicated training features of different classes: the first ones win, as in one top_k."""
    train_x = np.tile(np.eye(2), (4, 1))  # rows 0, 2, 4, 6 identical; rows 1, 3, 5, 7 identical
    train_y = np.arange(8)
    scores = knn.knn_scores(train_x, train_y, np.array([[1.0, 0.0]]), k=2, num_classes=8, temperature=1.0,
                            train_chunk=3)
    assert np.flatnonzero(scores[0]).tolist() == [0, 2]


def test_accuracy_matches_the_reference_and_chunking_changes_nothing():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(4, 16)) * 3
    train_y, test_y = rng.integers(0, 4, 200), rng.integers(0, 4, 50)
    train_x = centres[train_y] + rng.normal(size=(200, 16))
    test_x = centres[test_y] + rng.normal(size=(50, 16))
    a = knn.knn_classify(train_x, train_y, test_x, test_y, 4, k=20, temperature=0.07, chunk=7, train_chunk=33)
    b = knn.knn_classify(train_x, train_y, test_x, test_y, 4, k=20, temperature=0.07, chunk=1000)
    ref = brute_force_knn(train_x, train_y, test_x, 4, 20, 0.07)
    assert a == b
    assert a["top1"] == np.mean(ref.argmax(1) == test_y) and a["top1"] > 0.9


def test_topk_accuracy():
    scores = np.array([[0.1, 0.5, 0.4], [0.9, 0.05, 0.05]])
    assert knn.topk_accuracy(scores, np.array([2, 0]), 1) == 0.5
    assert knn.topk_accuracy(scores, np.array([2, 0]), 2) == 1.0
    assert knn.topk_accuracy(scores, np.array([2, 1]), 5) == 1.0  # k above the class count: all classes
