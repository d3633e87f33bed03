"""Enrolment- and query-time levers on networks saved by ``benchmarks/omniglot.py --save DIR``.

Usage: python -m benchmarks.enrolment_levers DIR [DIR ...] [--episodes N] [--finetune-episodes N]
Prints one JSON object: 20-way 1-shot and 5-shot accuracy (mean and 95 % interval, the same seeded
episodes for every lever) on the held-out classes of the first DIR, for
- plain embeddings, the nearest support image;
- test-time augmentation (the product's ``evaluate.test_time_views``) on both sides, or on the
  enrolled (support) side only;
- one enrolled image augmented into 16 random affine copies (the training augmentation), averaged;
- class prototypes (the product's ``evaluate.match: class_mean``) for 5 shots;
- k-reciprocal re-ranking (Zhong et al., 2017) of each query against the enrolled images;
- episode-time fine-tuning of the last dense layer on the augmented support set;
- with several DIRs, an ensemble: their unit-length embeddings concatenated;
and the time each adds per query (or per enrolled class) on this machine.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from siamese_core.augment import RandomAffine
from siamese_core.data import scan_folder
from siamese_core.distance import squared_distances
from siamese_core.embed import decode_all, predict_array
from siamese_core.mining import batch_all_loss
from siamese_core.model import load_embedding

WAYS, BATCH = 20, 128
Episode = tuple[np.ndarray, np.ndarray]  # support rows (class-major, k per class), query rows (one per class)


def episodes(labels: np.ndarray, k_shot: int, count: int, seed: int = 0) -> Iterator[Episode]:
    """The episodes :func:`siamese_core.metrics.few_shot_accuracy` draws with the same seed."""
    rng = np.random.default_rng(seed)
    members = {c: np.flatnonzero(labels == c) for c in np.unique(labels)}
    eligible = [c for c, idx in members.items() if len(idx) >= k_shot + 1]
    for _ in range(count):
        classes = rng.choice(eligible, size=WAYS, replace=False)
        picks = [rng.choice(members[c], size=k_shot + 1, replace=False) for c in classes]
        yield np.concatenate([p[:k_shot] for p in picks]), np.array([p[k_shot] for p in picks])


def summary(scores: list[float]) -> dict:
    values = np.asarray(scores)
    return {"mean": round(float(values.mean()), 4), "ci95": round(float(1.96 * values.std(ddof=1) / np.sqrt(len(values))), 4),
            "episodes": len(values)}


def nearest_image(support: np.ndarray, queries: np.ndarray, k_shot: int) -> np.ndarray:
    return squared_distances(queries, support).argmin(axis=1) // k_shot


def nearest_mean(support: np.ndarray, queries: np.ndarray, k_shot: int) -> np.ndarray:
    means = support.reshape(WAYS, k_shot, -1).mean(axis=1)
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    return squared_distances(queries, means).argmin(axis=1)


def k_reciprocal(support: np.ndarray, queries: np.ndarray, k_shot: int, k: int = 6, weight: float = 0.3) -> np.ndarray:
    """Each query alone against the support set: the Jaccard distance of k-reciprocal neighbour
    sets (Gaussian-weighted), blended with the original distance."""
    answers = []
    for query in queries:
        points = np.vstack([query[None], support])
        distances = squared_distances(points, points)
        ranked = np.argsort(distances, axis=1)[:, : k + 1]
        near = np.zeros_like(distances, dtype=bool)
        np.put_along_axis(near, ranked, True, axis=1)
        reciprocal = near & near.T
        vectors = np.where(reciprocal, np.exp(-distances), 0.0)
        vectors /= vectors.sum(axis=1, keepdims=True)
        jaccard = 1 - np.minimum(vectors[0], vectors[1:]).sum(axis=1) / np.maximum(vectors[0], vectors[1:]).sum(axis=1)
        answers.append(((1 - weight) * jaccard + weight * distances[0, 1:]).argmin() // k_shot)
    return np.asarray(answers)


def score(embeddings: np.ndarray, labels: np.ndarray, k_shot: int, count: int,
          decide: Callable = nearest_image, query_embeddings: np.ndarray | None = None) -> dict:
    queries_from = embeddings if query_embeddings is None else query_embeddings
    return summary([float(np.mean(decide(embeddings[s], queries_from[q], k_shot) == np.arange(WAYS)))
                    for s, q in episodes(labels, k_shot, count)])


class HeadTuner:
    """Episode-time fine-tuning of the last dense layer: batch-all triplet loss over augmented copies
    of the support images (each support image its own class), features computed once."""

    def __init__(self, model: keras.Model, augment: RandomAffine, copies: int, steps: int, learning_rate: float,
                 margin: float):
        dense = model.get_layer("embedding")
        self.features = keras.Model(model.input, dense.input)
        self.kernel, self.bias = (w.copy() for w in dense.get_weights())
        self.augment, self.copies, self.steps = augment, copies, steps
        self.learning_rate, self.margin = learning_rate, margin

    def __call__(self, support_images: np.ndarray, query_images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        views = np.concatenate([support_images] + [np.asarray(self.augment(support_images.astype(np.float32), training=True))
                                                   for _ in range(self.copies)])
        feats = predict_array(self.features, views.astype(np.float32), BATCH)
        labels = np.tile(np.arange(len(support_images)), self.copies + 1)
        kernel, bias = tf.Variable(self.kernel), tf.Variable(self.bias)
        optimizer = keras.optimizers.Adam(self.learning_rate)
        self._fit(tf.constant(feats), tf.constant(labels), kernel, bias, optimizer)
        head = lambda x: tf.math.l2_normalize(tf.matmul(x, kernel) + bias, axis=1).numpy()  # noqa: E731
        return head(feats[: len(support_images)]), head(predict_array(self.features, query_images.astype(np.float32), BATCH))

    def _fit(self, feats, labels, kernel, bias, optimizer):
        @tf.function
        def step():
            with tf.GradientTape() as tape:
                out = tf.math.l2_normalize(tf.matmul(feats, kernel) + bias, axis=1)
                loss = batch_all_loss(labels, out, self.margin)
            optimizer.apply_gradients(zip(tape.gradient(loss, [kernel, bias]), [kernel, bias]))

        for _ in range(self.steps):
            step()


def per_query_ms(work: Callable[[], object], repeats: int = 30) -> float:
    work()
    start = time.perf_counter()
    for _ in range(repeats):
        work()
    return round((time.perf_counter() - start) / repeats * 1000, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", type=Path, nargs="+", help="--save folders of benchmarks/omniglot.py (same split)")
    parser.add_argument("--episodes", type=int, default=1000)
    parser.add_argument("--finetune-episodes", type=int, default=100)
    parser.add_argument("--finetune-steps", type=int, default=30)
    args = parser.parse_args()
    held = scan_folder(args.folders[0] / "heldout")
    labels, n = held.labels, args.episodes
    report: dict = {"heldout_classes": len(held.class_names), "episodes": n, "models": [str(f) for f in args.folders]}
    per_model = []
    for folder in args.folders:
        model = load_embedding(folder / "model.keras")
        images = decode_all(held.paths, int(model.input_shape[1]))
        per_model.append((model, images, {views: predict_array(model, images, BATCH, views=views) for views in (1, 5, 9)}))
    model, images, embedded = per_model[0]
    plain, tta = embedded[1], embedded[5]
    report["plain"] = {"1shot": score(plain, labels, 1, n), "5shot": score(plain, labels, 5, n)}
    for views in (5, 9):
        report[f"tta_{views}_views"] = {"1shot": score(embedded[views], labels, 1, n),
                                        "5shot": score(embedded[views], labels, 5, n)}
    report["tta_5_views_enrolled_side_only"] = {"1shot": score(tta, labels, 1, n, query_embeddings=plain)}
    augment = RandomAffine(10, 0.1, 0.1, 0.1, seed=0)
    copies = np.mean([predict_array(model, np.asarray(augment(images.astype(np.float32), training=True)), BATCH)
                      for _ in range(16)] + [plain], axis=0)
    copies /= np.linalg.norm(copies, axis=1, keepdims=True)
    report["one_image_augmented_16x_enrolled_side"] = {"1shot": score(copies, labels, 1, n, query_embeddings=plain)}
    report["class_mean"] = {"5shot": score(plain, labels, 5, n, nearest_mean)}
    report["tta_5_views_class_mean"] = {"5shot": score(tta, labels, 5, n, nearest_mean)}
    report["k_reciprocal_rerank"] = {"1shot": score(plain, labels, 1, n, k_reciprocal),
                                     "5shot": score(plain, labels, 5, n, k_reciprocal)}
    report["tta_5_views_k_reciprocal_rerank"] = {"5shot": score(tta, labels, 5, n, k_reciprocal)}

    tuner = HeadTuner(model, augment, copies=8, steps=args.finetune_steps, learning_rate=1e-3, margin=0.2)
    tuned, baseline, start = [], [], time.perf_counter()
    for support, queries in episodes(labels, 1, args.finetune_episodes):
        support_emb, query_emb = tuner(images[support], images[queries])
        tuned.append(float(np.mean(nearest_image(support_emb, query_emb, 1) == np.arange(WAYS))))
        baseline.append(float(np.mean(nearest_image(plain[support], plain[queries], 1) == np.arange(WAYS))))
    seconds = time.perf_counter() - start
    report["episode_fine_tuning"] = {"1shot": summary(tuned), "plain_on_the_same_episodes": summary(baseline),
                                     "ms_per_enrolled_class": round(seconds / args.finetune_episodes / WAYS * 1000, 1),
                                     "copies": 8, "steps": args.finetune_steps}
    if len(per_model) > 1:
        for views in (1, 5):
            joined = np.hstack([e[views] for _, _, e in per_model]) / np.sqrt(len(per_model))
            report[f"ensemble_{len(per_model)}_models_{views}_views"] = {
                "1shot": score(joined, labels, 1, n), "5shot": score(joined, labels, 5, n)}
    one = images[:1]
    report["ms_per_query"] = {f"{views}_views": per_query_ms(lambda v=views: predict_array(model, one, BATCH, views=v))
                              for views in (1, 5, 9)}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
