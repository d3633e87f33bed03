"""Online mining on hand-built embeddings: which triplets are valid, semi-hard, hardest."""

import itertools

import numpy as np
import pytest

from siamese_core.mining import (
    batch_all_loss,
    batch_hard_loss,
    mean_pair_distances,
    semihard_loss,
)

from support.tiny import TINY_NETWORK

# Points on a line: class 0 at 0 and 1, class 1 at 1.5 and 4. Squared distances:
# d(0,1)=1, d(0,1.5)=2.25, d(0,4)=16, d(1,1.5)=0.25, d(1,4)=9, d(1.5,4)=6.25
LABELS = np.array([0, 0, 1, 1])
POINTS = np.array([[0.0], [1.0], [1.5], [4.0]], dtype=np.float32)
MARGIN = 0.5


def _brute_force_triplets():
    d = ((POINTS[:, None, :] - POINTS[None, :, :]) ** 2).sum(-1)
    for a, p, n in itertools.permutations(range(4), 3):
        if LABELS[a] == LABELS[p] and LABELS[a] != LABELS[n]:
            yield a, p, n, d[a, p] - d[a, n] + MARGIN, d


def test_batch_all_averages_the_positive_losses_of_valid_triplets():
    positive = [loss for *_, loss, _ in _brute_force_triplets() if loss > 0]
    assert float(batch_all_loss(LABELS, POINTS, MARGIN)) == pytest.approx(np.mean(positive))


def test_batch_hard_uses_the_farthest_positive_and_nearest_negative():
    # anchors: 0 -> pos 1, neg 2.25: 1-2.25+.5 < 0 -> 0; 1 -> pos 1, neg .25: 1.25;
    # 2 (1.5) -> pos 6.25, neg .25: 6.5; 3 (4) -> pos 6.25, neg 9: 0
    assert float(batch_hard_loss(LABELS, POINTS, MARGIN)) == pytest.approx((0 + 1.25 + 6.5 + 0) / 4)


def test_semihard_takes_the_nearest_negative_beyond_the_positive_else_the_farthest():
    # (0,1): d=1, negatives 2.25, 16 beyond -> 2.25: loss max(1-2.25+.5,0)=0
    # (1,0): d=1, negatives .25, 9 -> beyond: 9 -> 0
    # (2,3): d=6.25, negatives 2.25, .25 -> none beyond -> farthest 2.25: 6.25-2.25+.5=4.5
    # (3,2): d=6.25, negatives 16, 9 -> beyond: 9 -> 0
    assert float(semihard_loss(LABELS, POINTS, MARGIN)) == pytest.approx(4.5 / 4)


def test_well_separated_classes_give_zero_loss():
    points = np.array([[0.0], [0.1], [10.0], [10.1]], dtype=np.float32)
    for loss in (batch_all_loss, batch_hard_loss, semihard_loss):
        assert float(loss(LABELS, points, MARGIN)) == 0.0


def test_mean_pair_distances_signal_a_collapse():
    pos, neg = mean_pair_distances(LABELS, POINTS)
    assert float(pos) == pytest.approx((1 + 6.25) / 2)
    assert float(neg) == pytest.approx((2.25 + 16 + 0.25 + 9) / 4)
    collapsed = np.zeros((4, 3), np.float32)
    assert [float(x) for x in mean_pair_distances(LABELS, collapsed)] == [0.0, 0.0]


def test_pk_batches_hold_p_classes_of_k_images():
    from siamese_core.batches import pk_batches

    labels = np.repeat(np.arange(6), [5, 5, 5, 5, 3, 1])  # the last class has one image: never drawn
    rows = pk_batches(labels, classes_per_batch=4, images_per_class=4, steps=20, seed=0)
    assert rows.shape == (20, 16)
    for row in rows:
        classes, counts = np.unique(labels[row], return_counts=True)
        assert len(classes) == 4 and (counts == 4).all() and 5 not in classes
    assert np.array_equal(rows, pk_batches(labels, 4, 4, 20, seed=0))


def test_pk_epochs_are_drawn_lazily_and_a_resumed_run_gets_the_same_batches():
    from siamese_core.batches import pk_epochs

    labels = np.repeat(np.arange(6), 5)
    endless = pk_epochs(labels, 4, 2, steps=3, seed=7, first_epoch=0, epochs=10**12)
    first_six = np.stack([next(endless) for _ in range(6)])  # two epochs; the other 10**12 are never built
    resumed = np.stack(list(pk_epochs(labels, 4, 2, steps=3, seed=7, first_epoch=1, epochs=2)))
    assert first_six.shape == (6, 8) and np.array_equal(resumed, first_six[3:])
    assert not np.array_equal(first_six[:3], first_six[3:])  # each epoch draws its own batches


def test_online_mining_lowers_the_loss_and_logs_few_shot_accuracy(tmp_path):
    from siamese_core.config import Config, apply_overrides
    from siamese_core.train import train

    from support.images import make_digits_dataset

    train_dir, test_dir = make_digits_dataset(tmp_path / "seen", classes=6, train_per_class=10, test_per_class=4)
    heldout, _ = make_digits_dataset(tmp_path / "unseen", classes=4, train_per_class=4, test_per_class=0, first=6)
    config = apply_overrides(Config(), {
        **TINY_NETWORK, "head_units": [32], "embedding_dim": 16,
        "l2_normalize": True, "margin": 0.2, "learning_rate": 3e-3, "epochs": 4, "mining": "batch_all",
        "classes_per_batch": 4, "images_per_class": 4, "steps_per_epoch": 8, "lr_schedule": "cosine",
        "warmup_epochs": 1, "weight_decay": 1e-4, "train.augment.rotation": 10, "train.augment.shift": 0.05,
        "fewshot_way": 4,
    })
    result = train(config, train_dir, test_dir, verbose=0, heldout_dir=heldout)
    history = result.history
    assert len(history["loss"]) == 4 and history["loss"][-1] < history["loss"][0]
    assert {"pos_dist", "neg_dist", "val_loss", "fewshot_4way_1shot"} <= set(history)
    assert history["neg_dist"][-1] > history["pos_dist"][-1]
    # 200 episodes of 4 queries: every score is a multiple of 1/800, and training beats chance (1/4)
    assert all(abs(a * 800 - round(a * 800)) < 1e-6 for a in history["fewshot_4way_1shot"])
    assert history["fewshot_4way_1shot"][-1] > 0.25
    assert result.triplets.empty  # online batches, no triplet table


def test_collapse_guard_warns_then_stops():
    from siamese_core.callbacks import CollapseGuard

    class Model:
        stop_training = False

    guard = CollapseGuard(min_gap=0.05, patience=2)
    guard.set_model(Model())
    guard.on_epoch_end(0, {"pos_dist": 0.2, "neg_dist": 1.0})
    guard.on_epoch_end(1, {"pos_dist": 0.99, "neg_dist": 1.0})  # gap 0.01: first warning
    assert not guard.model.stop_training
    guard.on_epoch_end(2, {"pos_dist": 0.5, "neg_dist": 0.5})
    assert guard.model.stop_training and guard.collapsed_at == 3


def test_collapse_guard_catches_everything_mapped_to_one_point():
    """Batch-hard at margin 0.2 on Omniglot: the loss sticks at the margin while both distances
    shrink to ~1e-5 together, their ratio staying near 0.77 (measured)."""
    from siamese_core.callbacks import CollapseGuard

    class Model:
        stop_training = False

    guard = CollapseGuard(min_gap=0.05, patience=2, margin=0.2)
    guard.set_model(Model())
    guard.on_epoch_end(0, {"pos_dist": 0.32, "neg_dist": 1.33})  # healthy: gap 1.0 = 5 margins
    assert guard.low_epochs == 0
    guard.on_epoch_end(1, {"pos_dist": 4.8e-4, "neg_dist": 6.25e-4})
    guard.on_epoch_end(2, {"pos_dist": 2.2e-4, "neg_dist": 2.85e-4})
    assert guard.model.stop_training and guard.collapsed_at == 3


@pytest.mark.parametrize("option", ["rotations_as_classes", "mirrors_as_classes"])
def test_new_classes_need_online_mining(tmp_path, option):
    from siamese_core.config import Config, ConfigError, apply_overrides
    from siamese_core.train import train

    from support.images import make_digits_dataset

    train_dir, _ = make_digits_dataset(tmp_path, classes=2)
    config = apply_overrides(Config(), {**TINY_NETWORK, f"train.augment.{option}": True})
    with pytest.raises(ConfigError, match="need online mining"):
        train(config, train_dir)
