"""Test-time levers on a trained network and a held-out split (``benchmarks/omniglot.py --save DIR``).

``python benchmarks/test_time.py DIR`` prints one JSON object: 20-way one-shot and five-shot
accuracy (mean ± 95 % interval over the same seeded episodes) with plain embeddings, with
test-time augmentation (the mean embedding of the image and four shifted copies), and, for
five shots, with class prototypes (the mean of the support embeddings) instead of the nearest
support image; and the time each adds per query on this machine.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from siamese_core.data import scan_folder
from siamese_core.distance import squared_distances
from siamese_core.embed import decode_all, predict_array
from siamese_core.metrics import few_shot_accuracy
from siamese_core.model import load_embedding


def shifted_views(images: np.ndarray, step: int) -> list[np.ndarray]:
    """The images and four copies shifted by ``step`` pixels (edges repeated), as the TTA views."""
    views = [images]
    padded = np.pad(images, ((0, 0), (step, step), (step, step), (0, 0)), mode="edge")
    side = images.shape[1]
    for dy, dx in ((0, 0), (0, 2 * step), (2 * step, 0), (2 * step, 2 * step)):
        views.append(padded[:, dy : dy + side, dx : dx + side])
    return views


def tta_embeddings(model, images: np.ndarray, step: int) -> np.ndarray:
    mean = np.mean([predict_array(model, view.astype(np.float32), 128) for view in shifted_views(images, step)], axis=0)
    return mean / np.linalg.norm(mean, axis=1, keepdims=True)


def prototype_accuracy(embeddings: np.ndarray, labels: np.ndarray, n_way: int, k_shot: int, episodes: int,
                       seed: int = 0) -> dict:
    """N-way k-shot accuracy with each class's support mean as its only gallery row (same episodes as
    :func:`~siamese_core.metrics.few_shot_accuracy` draws with the same seed)."""
    rng = np.random.default_rng(seed)
    members = {c: np.flatnonzero(labels == c) for c in np.unique(labels)}
    eligible = [c for c, idx in members.items() if len(idx) >= k_shot + 1]
    scores = np.empty(episodes)
    for episode in range(episodes):
        classes = rng.choice(eligible, size=n_way, replace=False)
        picks = [rng.choice(members[c], size=k_shot + 1, replace=False) for c in classes]
        prototypes = np.stack([embeddings[p[:k_shot]].mean(axis=0) for p in picks])
        queries = embeddings[[p[k_shot] for p in picks]]
        scores[episode] = np.mean(squared_distances(queries, prototypes).argmin(axis=1) == np.arange(n_way))
    return {"mean": float(scores.mean()), "ci95": float(1.96 * scores.std(ddof=1) / np.sqrt(episodes))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="the --save folder of benchmarks/omniglot.py")
    parser.add_argument("--episodes", type=int, default=2000)
    args = parser.parse_args()
    model = load_embedding(args.folder / "model.keras")
    held = scan_folder(args.folder / "heldout")
    size = int(model.input_shape[1])
    images = decode_all(held.paths, size)
    step = max(1, round(size * 0.05))
    plain = predict_array(model, images.astype(np.float32), 128)
    tta = tta_embeddings(model, images, step)
    report: dict = {"heldout_classes": len(held.class_names), "images": len(held), "input_size": size,
                    "tta_shift_px": step}
    for name, embeddings in (("plain", plain), ("tta", tta)):
        report[name] = {f"{k}shot": few_shot_accuracy(embeddings, held.labels, 20, k, args.episodes)
                        for k in (1, 5)}
        report[name]["5shot_prototypes"] = prototype_accuracy(embeddings, held.labels, 20, 5, args.episodes)
    one = images[:1].astype(np.float32)
    timings = {}
    for name, embed in (("plain", lambda: predict_array(model, one, 128)), ("tta", lambda: tta_embeddings(model, images[:1], step))):
        embed()
        start = time.perf_counter()
        for _ in range(50):
            embed()
        timings[name] = (time.perf_counter() - start) / 50 * 1000
    report["ms_per_query"] = {name: round(ms, 2) for name, ms in timings.items()}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
