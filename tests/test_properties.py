"""Counterexample searches: each fast, vectorised function against a plain loop on many random cases.

The cases are drawn from seeded generators, so a failure names a case that can be replayed.
``CASES`` random cases per function (the miners run each case eagerly and inside tf.function).
"""

import numpy as np
import pytest
import tensorflow as tf

from siamese_core.distance import squared_distances
from siamese_core.distance_ops import pairwise_squared_distances, row_squared_distances
from siamese_core.gallery import Gallery
from siamese_core.metrics import average_precision_at_r
from siamese_core.mining import LOSSES
from siamese_core.openset import fit_threshold
from siamese_core.triplets import pick_negatives

CASES = 40


def _brute_distances(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.array([[float(np.sum((a - b) ** 2)) for b in y] for a in x.astype(np.float64)])


def _pk_batch(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A shuffled P x K label layout (sometimes with a class of one image) and distinct random embeddings."""
    p, k = int(rng.integers(2, 7)), int(rng.integers(1, 5))
    labels = np.repeat(rng.choice(100, size=p, replace=False), k)
    if rng.random() < 0.3:
        labels = np.append(labels, 1000)  # a lone image: an anchor without positives
    labels = rng.permutation(labels)
    return labels.astype(np.int32), rng.normal(size=(len(labels), int(rng.integers(2, 9)))).astype(np.float32)


def _loop_loss(strategy: str, labels: np.ndarray, embeddings: np.ndarray, margin: float) -> float:
    d = _brute_distances(embeddings, embeddings)
    n = len(labels)
    positives = {a: [p for p in range(n) if p != a and labels[p] == labels[a]] for a in range(n)}
    negatives = {a: [q for q in range(n) if labels[q] != labels[a]] for a in range(n)}
    if strategy == "batch_all":
        losses = [max(d[a, p] - d[a, q] + margin, 0.0) for a in range(n) for p in positives[a] for q in negatives[a]]
        active = [loss for loss in losses if loss > 1e-16]
        return sum(active) / max(len(active), 1)
    if strategy == "batch_hard":
        losses = [max(max(d[a, p] for p in positives[a]) - min(d[a, q] for q in negatives[a]) + margin, 0.0)
                  for a in range(n) if positives[a] and negatives[a]]
        return sum(losses) / max(len(losses), 1)
    losses = []  # semihard: every anchor-positive pair
    for a in range(n):
        for p in positives[a]:
            beyond = [d[a, q] for q in negatives[a] if d[a, q] > d[a, p]]
            chosen = min(beyond) if beyond else max((d[a, q] for q in negatives[a]), default=0.0)
            losses.append(max(d[a, p] - chosen + margin, 0.0))
    return sum(losses) / max(len(losses), 1)


@pytest.mark.parametrize("strategy", sorted(LOSSES))
def test_in_batch_miners_match_a_loop_over_every_triplet(strategy):
    rng = np.random.default_rng(["batch_all", "batch_hard", "semihard"].index(strategy))
    graph_loss = tf.function(LOSSES[strategy], reduce_retracing=True)
    for case in range(CASES):
        labels, embeddings = _pk_batch(rng)
        margin = float(rng.choice([0.1, 0.5, 2.0]))
        expected = _loop_loss(strategy, labels, embeddings, margin)
        eager = float(LOSSES[strategy](tf.constant(labels), tf.constant(embeddings), margin))
        graph = float(graph_loss(tf.constant(labels), tf.constant(embeddings), margin))
        assert eager == pytest.approx(expected, rel=1e-4, abs=1e-4), (case, labels.tolist())
        assert graph == pytest.approx(expected, rel=1e-4, abs=1e-4), (case, labels.tolist())


def test_the_numpy_and_keras_distances_agree_with_a_loop():
    rng = np.random.default_rng(1)
    for _ in range(CASES):
        x = rng.normal(size=(int(rng.integers(1, 9)), int(rng.integers(1, 17)))).astype(np.float32)
        y = rng.normal(size=(int(rng.integers(1, 9)), x.shape[1])).astype(np.float32)
        brute = _brute_distances(x, y)
        np.testing.assert_allclose(squared_distances(x, y), brute, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.asarray(pairwise_squared_distances(x)), _brute_distances(x, x), rtol=1e-4, atol=1e-4)
        rows = min(len(x), len(y))
        np.testing.assert_allclose(np.asarray(row_squared_distances(x[:rows], y[:rows])), np.diag(brute[:rows, :rows]),
                                   rtol=1e-4, atol=1e-4)


def test_pick_negatives_matches_a_loop():
    rng = np.random.default_rng(2)
    for _ in range(CASES):
        pairs, negatives = int(rng.integers(1, 12)), int(rng.integers(1, 12))
        ap = rng.uniform(0, 2, size=pairs)
        an = rng.uniform(0, 3, size=(pairs, negatives))
        margin = float(rng.choice([0.2, 0.5, 1.0]))
        for row in range(pairs):
            hard = min(range(negatives), key=lambda n: (abs(an[row, n] - ap[row]), n))
            band = [n for n in range(negatives) if ap[row] < an[row, n] < ap[row] + margin]
            semihard = min(band or range(negatives), key=lambda n: (an[row, n], n))
            assert pick_negatives(ap, an, "hard", margin)[row] == hard
            assert pick_negatives(ap, an, "semihard", margin)[row] == semihard


def test_average_precision_at_r_matches_a_loop_with_ties():
    rng = np.random.default_rng(3)
    for _ in range(CASES):
        queries, references = int(rng.integers(1, 6)), int(rng.integers(1, 15))
        distances = rng.integers(0, 4, size=(queries, references)).astype(float)  # many ties
        query_labels = rng.integers(0, 3, size=queries)
        reference_labels = rng.integers(0, 3, size=references)
        got = average_precision_at_r(distances, query_labels, reference_labels)
        for q in range(queries):
            relevant = [reference_labels[r] == query_labels[q] for r in range(references)]
            r_count = sum(relevant)
            if r_count == 0:
                assert np.isnan(got[q])
                continue
            # ties ranked against the query: references of other classes first
            ranked = sorted(range(references), key=lambda r: (distances[q, r], relevant[r]))
            hits, total = 0, 0.0
            for i, r in enumerate(ranked[:r_count], start=1):
                if relevant[r]:
                    hits += 1
                    total += hits / i
            assert got[q] == pytest.approx(total / r_count)


def _loop_threshold(known, unknown, fit_to, rate):
    """The threshold by trying every candidate: the smallest accepting ``rate`` of known scores, or the
    largest rejecting ``rate`` of unknown ones."""
    if fit_to == "known_accept":
        return min(t for t in known if sum(k <= t for k in known) >= rate * len(known))
    candidates = sorted({*unknown, *(np.nextafter(u, -np.inf) for u in unknown)})
    return max(t for t in candidates if sum(u > t for u in unknown) >= rate * len(unknown))


def test_fit_threshold_matches_a_loop_over_every_threshold():
    rng = np.random.default_rng(4)
    for _ in range(CASES):
        known = rng.integers(0, 8, size=int(rng.integers(1, 20))) / 4.0  # ties on purpose
        unknown = rng.integers(0, 8, size=int(rng.integers(1, 20))) / 4.0
        for fit_to in ("known_accept", "unknown_reject"):
            for rate in (0.1, 0.5, 0.9, 1.0):
                got = fit_threshold(known, unknown, fit_to, rate)
                assert got == _loop_threshold(known.tolist(), unknown.tolist(), fit_to, rate), (known, unknown, fit_to)


def _loop_search(gallery: Gallery, query: np.ndarray, k: int):
    per_class: dict[int, tuple[float, int]] = {}
    for row, (embedding, label) in enumerate(zip(gallery.embeddings, gallery.labels)):
        d = float(np.sum((query.astype(np.float64) - embedding) ** 2))
        if label not in per_class or d < per_class[label][0]:
            per_class[label] = (d, row)
    ranked = sorted(per_class.items(), key=lambda item: item[1][0])[:k]
    return [(gallery.class_names[c], d) for c, (d, _) in ranked], gallery.paths[ranked[0][1][1]]


@pytest.mark.parametrize("approximate", [False, True], ids=["exact", "faiss IVF, every list probed"])
def test_gallery_search_matches_a_loop(approximate):
    rng = np.random.default_rng(5)
    for _ in range(CASES // 2):
        classes, dim = int(rng.integers(1, 6)), int(rng.integers(2, 9))
        labels = np.concatenate([np.arange(classes), rng.integers(0, classes, size=int(rng.integers(0, 60)))])
        embeddings = rng.normal(size=(len(labels), dim)).astype(np.float32)
        gallery = Gallery(embeddings, labels, [f"c{i}" for i in range(classes)], [f"img{i}" for i in range(len(labels))],
                          index_threshold=0 if approximate else 10**9, nprobe=10**6)
        queries = rng.normal(size=(int(rng.integers(1, 6)), dim)).astype(np.float32)
        k = int(rng.integers(1, classes + 2))
        for query, match in zip(queries, gallery.search(queries, k)):
            expected, nearest_path = _loop_search(gallery, query, k)
            assert [label for label, _ in match.top_k] == [label for label, _ in expected]
            assert [d for _, d in match.top_k] == pytest.approx([d for _, d in expected], rel=1e-4, abs=1e-4)
            assert (match.label, match.nearest_path) == (expected[0][0], nearest_path)


def test_the_loops_themselves_catch_a_wrong_answer():
    """The references are not vacuous: batch-all with the margin dropped disagrees with its loop
    on every batch that holds a triplet."""
    rng = np.random.default_rng(6)
    checked = 0
    for _ in range(20):
        labels, embeddings = _pk_batch(rng)
        if len(set(labels.tolist())) == len(labels):
            continue  # no anchor-positive pair: no triplet, both are 0
        wrong = float(LOSSES["batch_all"](tf.constant(labels), tf.constant(embeddings), 0.0))
        assert wrong != pytest.approx(_loop_loss("batch_all", labels, embeddings, 1.0), rel=1e-4)
        checked += 1
    assert checked >= 10
