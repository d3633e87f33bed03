"""A gallery with its index on disk: built in shards, saved in the bundle, memory-mapped when loaded,
and served by the pyfunc model."""

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from pipelines.pyfunc_model import SiameseBundleModel, encode_image
from siamese_core.data import scan_folder
from siamese_core.errors import DatasetError
from siamese_core.gallery import Gallery
from siamese_core.model import build_embedding_model
from siamese_core.ondisk import INDEX_FILE, LISTS_FILE
from siamese_core.recognizer import GALLERY_FILE, ONDISK_INDEX_DIR, SiameseRecognizer, build_gallery
from siamese_core.seeding import seeded

from support.images import make_digits_dataset
from support.tiny import TINY_NETWORK, tiny_config


def test_a_large_gallery_is_saved_with_an_ondisk_index_that_the_recogniser_and_the_served_model_search(tmp_path):
    train_dir, _ = make_digits_dataset(tmp_path / "digits", classes=10, train_per_class=30, test_per_class=0)
    config = tiny_config(embedding_dim=32, ondisk_min_rows=0)  # any size gets the on-disk index
    with seeded(0):  # the same vectors every run: recall@1 varied around the bar with the network's random start
        network = build_embedding_model(config.model)
    folder = scan_folder(train_dir)
    in_memory = build_gallery(network, folder)
    bundle = SiameseRecognizer(network, in_memory, config).save(tmp_path / "bundle")

    assert {INDEX_FILE, LISTS_FILE} <= {p.name for p in (bundle / ONDISK_INDEX_DIR).iterdir()}
    loaded = SiameseRecognizer.load(bundle)
    assert loaded.gallery.ondisk_dir == str(bundle / ONDISK_INDEX_DIR) and loaded.gallery.uses_index
    assert isinstance(loaded.gallery.embeddings, np.memmap)  # the vectors stay on disk
    np.testing.assert_array_equal(np.asarray(loaded.gallery.embeddings), in_memory.embeddings)

    # the product-quantised search finds what the exact one finds
    queries = in_memory.embeddings + np.random.default_rng(0).normal(scale=0.01, size=in_memory.embeddings.shape)
    exact = [m.nearest_path for m in in_memory.search(queries.astype(np.float32), 1)]
    approximate = [m.nearest_path for m in loaded.gallery.search(queries.astype(np.float32), 1)]
    recall = np.mean([a == e for a, e in zip(approximate, exact)])
    print(f"recall@1 of the on-disk IVF-PQ index against exact search: {recall:.3f} ({len(exact)} queries)")
    assert recall >= 0.9

    with pytest.raises(DatasetError, match="on-disk index is not supported"):
        loaded.enroll(train_dir)

    served = SiameseBundleModel()
    served.load_context(SimpleNamespace(artifacts={"bundle": str(bundle)}))
    image = sorted((train_dir / "digit 4").iterdir())[0]
    answer = served.predict(None, pd.DataFrame({"image": [encode_image(image)]}))
    assert answer["label"].tolist() == ["digit 4"]


def test_a_small_gallery_keeps_its_vectors_in_the_npz(tmp_path):
    config = tiny_config()
    network = build_embedding_model(config.model)
    gallery = Gallery(np.zeros((3, TINY_NETWORK["embedding_dim"])), [0, 1, 1], ["a", "b"], ["x", "y", "z"])
    bundle = SiameseRecognizer(network, gallery, config).save(tmp_path / "bundle")
    assert not (bundle / ONDISK_INDEX_DIR).exists()
    assert Gallery.load(bundle / GALLERY_FILE).ondisk_dir is None


@pytest.mark.parametrize("damage", ["truncate_lists", "drop_lists", "garbage_index"])
def test_a_damaged_ondisk_index_is_one_line_not_a_crash(tmp_path, damage):
    """A truncated lists file used to end the process with SIGBUS; each damage is now a BundleError naming
    the file. The search runs in a child process, so a crash fails this test instead of ending the run."""
    import subprocess
    import sys

    train_dir, _ = make_digits_dataset(tmp_path / "digits", classes=10, train_per_class=30, test_per_class=0)
    config = tiny_config(embedding_dim=16, ondisk_min_rows=0)
    network = build_embedding_model(config.model)
    bundle = SiameseRecognizer(network, build_gallery(network, scan_folder(train_dir)), config).save(tmp_path / "b")
    index = bundle / ONDISK_INDEX_DIR
    lists = index / LISTS_FILE
    if damage == "truncate_lists":
        lists.write_bytes(lists.read_bytes()[: lists.stat().st_size // 3])
    elif damage == "drop_lists":
        lists.unlink()
    else:
        (index / INDEX_FILE).write_bytes(b"not a faiss index" * 50)
    script = ("import sys; from siamese_core.recognizer import SiameseRecognizer; from siamese_core.errors import "
              "BundleError\ntry:\n    r = SiameseRecognizer.load(sys.argv[1]); r.gallery.search(r.gallery.embeddings[:2], 1)\n"
              "except BundleError as exc:\n    print('REFUSED', exc)")
    child = subprocess.run([sys.executable, "-c", script, str(bundle)], capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, f"rc {child.returncode}: {child.stderr[-1500:]}"
    [refused] = [line for line in child.stdout.splitlines() if line.startswith("REFUSED")]  # faiss prints a line too
    assert str(index) in refused
