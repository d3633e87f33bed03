"""The gallery of embedded reference images and nearest-class search."""

from __future__ import annotations

import hashlib
import os
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .config import EXACT_SEARCH_MAX_ROWS, NPROBE
from .distance import squared_distances
from .errors import BundleError, DatasetError


def faiss_ivf(index):
    """The IVF part of a faiss index (itself, or inside an IVF-PQ index read from disk)."""
    import faiss

    return faiss.extract_index_ivf(index)


def file_digests(paths: list[str]) -> list[str]:
    """The sha256 of each file in ``paths`` ("" for one that is not a file here): a gallery entry's stable id."""
    digests = []
    for path in paths:
        try:
            with open(path, "rb") as file:
                digests.append(hashlib.file_digest(file, "sha256").hexdigest())
        except (OSError, TypeError):
            digests.append("")
    return digests


@dataclass
class Match:
    """One recognised image: the nearest class, its squared distance, the top-k classes, and (when unknowns
    are rejected) its unknown score, compared with the calibrated threshold (see :mod:`siamese_core.openset`)."""

    label: str
    distance: float
    top_k: list[tuple[str, float]] = field(default_factory=list)
    nearest_path: str = ""
    unknown_score: float | None = None

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return {
            "label": self.label,
            "distance": self.distance,
            "top_k": [{"label": label, "distance": d} for label, d in self.top_k],
            "nearest_path": self.nearest_path,
            **({} if self.unknown_score is None else {"unknown_score": self.unknown_score}),
        }


@dataclass
class Gallery:
    """Reference embeddings with their class labels and source paths.

    Rows are kept grouped by class (in ``class_names`` order), which lets the exact
    search take the per-class minimum distance with one vectorised reduction.
    Above ``index_threshold`` rows, search goes through a faiss IVF index (built on
    first use) that visits ``nprobe`` of its ``sqrt(rows)`` lists per query. With
    ``ondisk_dir`` it goes through the IVF-PQ index on disk there (:mod:`siamese_core.ondisk`),
    and ``embeddings`` may be a memory-mapped array that is never read whole. With ``class_means``
    a query's distance to a class is its distance to the class's mean row (exact search over the
    means; the nearest path is the nearest image of the best class). ``digests`` holds each row's source sha256
    ("" where unknown; None: not recorded, as in galleries saved before they were).
    """

    embeddings: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    paths: list[str]
    index_threshold: int = EXACT_SEARCH_MAX_ROWS
    nprobe: int = NPROBE
    ondisk_dir: str | None = None
    class_means: bool = False
    digests: list[str] | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.embeddings, np.ndarray) and self.embeddings.dtype == np.float32):
            self.embeddings = np.asarray(self.embeddings, dtype=np.float32)  # (a float32 memory map stays one)
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if not (len(self.embeddings) == len(self.labels) == len(self.paths)) or (
                self.digests is not None and len(self.digests) != len(self.paths)):
            raise ValueError("gallery embeddings, labels, paths and digests differ in length")
        if np.any(self.labels[1:] < self.labels[:-1]):  # grouped already (as saved): a memory map stays one
            order = np.argsort(self.labels, kind="stable")
            self.embeddings, self.labels = np.ascontiguousarray(self.embeddings[order]), self.labels[order]
            self.paths = [self.paths[i] for i in order]
            self.digests = None if self.digests is None else [self.digests[i] for i in order]
        present = np.unique(self.labels)
        if not np.array_equal(present, np.arange(len(self.class_names))):
            raise ValueError(f"gallery labels must index its {len(self.class_names)} class names, each at least once; "
                             f"got labels {present[:10].tolist()}")
        self._class_starts = np.searchsorted(self.labels, np.arange(len(self.class_names)))
        self._index = None
        self._means: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def uses_index(self) -> bool:
        """Whether searches go through an approximate index (in memory, or on disk)."""
        return self.ondisk_dir is not None or len(self) > self.index_threshold

    def build_index(self):
        """The faiss index searched: the on-disk one, or an IVF index over the rows trained on a seeded sample;
        loaded or built once."""
        if self._index is None and self.ondisk_dir is not None:
            from .ondisk import load_ondisk_index

            self._index = load_ondisk_index(Path(self.ondisk_dir), self.nprobe)
        if self._index is None:
            import faiss

            rows, dim = self.embeddings.shape
            lists = max(1, min(int(np.sqrt(rows)), rows // 40))
            sample = np.random.default_rng(0).choice(rows, size=min(rows, 50 * lists), replace=False)
            index = faiss.IndexIVFFlat(faiss.IndexFlatL2(dim), dim, lists)
            index.cp.seed = 0
            index.train(self.embeddings[np.sort(sample)])
            index.add(self.embeddings)
            self._index = index
        faiss_ivf(self._index).nprobe = self.nprobe
        return self._index

    def with_ondisk_index(self, folder: str | Path, shard_rows: int = 500_000) -> Gallery:
        """This gallery searched through an IVF-PQ index built on disk in ``folder``, ``shard_rows`` rows at a time."""
        from .ondisk import build_ondisk_index

        rows = len(self)
        sample = self.embeddings[np.sort(np.random.default_rng(0).choice(rows, size=min(rows, 256 * 1024),
                                                                          replace=False))]
        shards = (np.asarray(self.embeddings[i : i + shard_rows]) for i in range(0, rows, shard_rows))
        build_ondisk_index(shards, sample, rows, Path(folder))
        return Gallery(self.embeddings, self.labels, list(self.class_names), list(self.paths), self.index_threshold,
                       self.nprobe, str(folder), self.class_means, self.digests)

    def means(self) -> np.ndarray:
        """Each class's mean row ``(classes, dim)``, scaled back to unit length when the rows are; computed once."""
        if self._means is None:
            sums = np.zeros((len(self.class_names), self.embeddings.shape[1]))
            for start in range(0, len(self), 65536):  # in chunks: a memory-mapped gallery is never read whole
                np.add.at(sums, self.labels[start : start + 65536], self.embeddings[start : start + 65536])
            means = sums / np.diff(np.append(self._class_starts, len(self)))[:, None]
            sample = np.linalg.norm(self.embeddings[:: max(1, len(self) // 1000)], axis=1)
            if np.allclose(sample, 1.0, atol=1e-3):
                means /= np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)
            self._means = means.astype(np.float32)
        return self._means

    def class_distances(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-class distance ``(q, classes)`` (to the nearest row, or with ``class_means`` to the mean row)
        and the index of each query's nearest row (of the nearest class, with ``class_means``); exact."""
        if self.class_means:
            per_class = squared_distances(queries, self.means())
            best = per_class.argmin(axis=1)
            nearest = [self._class_starts[c] + squared_distances(q[None], self._rows_of(c))[0].argmin()
                       for q, c in zip(queries, best)]
            return per_class, np.asarray(nearest, dtype=np.int64)
        distances = squared_distances(queries, self.embeddings)
        return np.minimum.reduceat(distances, self._class_starts, axis=1), distances.argmin(axis=1)

    def _rows_of(self, label: int) -> np.ndarray:
        end = self._class_starts[label + 1] if label + 1 < len(self._class_starts) else len(self)
        return np.asarray(self.embeddings[self._class_starts[label] : end])

    def _exact_search(self, queries: np.ndarray, k: int) -> list[tuple[list[tuple[int, float]], int]]:
        per_class, nearest = self.class_distances(queries)
        best = np.argsort(per_class, axis=1, kind="stable")[:, :k]
        return [([(c, float(row[c])) for c in classes], int(near)) for row, classes, near in zip(per_class, best, nearest)]

    def _index_search(self, queries: np.ndarray, k: int) -> list[tuple[list[tuple[int, float]], int]]:
        """k nearest rows from the index, reduced to the nearest distinct classes; a query
        whose rows hold fewer than ``k`` classes asks for more rows, then falls back to exact."""
        index = self.build_index()
        results: list = [None] * len(queries)
        todo, rows = np.arange(len(queries)), 16 * k
        while len(todo) and rows <= 4096:
            distances, found = index.search(np.ascontiguousarray(queries[todo], dtype=np.float32), min(rows, len(self)))
            missing = []
            for query, row_d, row_i in zip(todo, distances, found):
                valid = row_i >= 0
                classes, first = np.unique(self.labels[row_i[valid]], return_index=True)
                if len(classes) < k:
                    missing.append(query)
                    continue
                order = np.sort(first)[:k]
                results[query] = ([(int(self.labels[row_i[valid][i]]), float(row_d[valid][i])) for i in order], int(row_i[0]))
            todo, rows = np.asarray(missing, dtype=np.int64), rows * 4
        for query, result in zip(todo, self._exact_search(queries[todo], k) if len(todo) else []):
            results[query] = result
        return results

    def search(self, queries: np.ndarray, top_k: int = 5, chunk: int | None = None) -> list[Match]:
        """The nearest class of every query embedding, with the ``top_k`` nearest classes.

        Queries go ``chunk`` at a time; by default enough for a 4M-entry distance block,
        so memory stays bounded however large the gallery.
        """
        k = min(top_k, len(self.class_names))
        chunk = chunk or max(1, 4_000_000 // (len(self.class_names) if self.class_means else len(self)))
        queries = np.asarray(queries, dtype=np.float32)
        find = self._index_search if self.uses_index and not self.class_means else self._exact_search
        matches: list[Match] = []
        for start in range(0, len(queries), chunk):
            for ranked, near in find(queries[start : start + chunk], k):
                named = [(self.class_names[c], d) for c, d in ranked]
                matches.append(Match(named[0][0], named[0][1], named, self.paths[near]))
        return matches

    def image_folder(self):
        """The gallery's source images as an ImageFolder, to embed again with another network.

        Raises DatasetError naming the first image that is not on this machine.
        """
        from .data import ImageFolder

        missing = next((path for path in self.paths if not Path(path).is_file()), None)
        if missing is not None:
            raise DatasetError(f"{missing}: a gallery image is not on this machine; the baselines embed the gallery's "
                               "images again (run where they are, or pass --no-baselines)")
        root = Path(os.path.commonpath(self.paths)) if self.paths else Path(".")
        return ImageFolder(root, list(self.paths), self.labels.copy(), list(self.class_names))

    def extend(self, embeddings: np.ndarray, label_names: list[str], paths: list[str]) -> Gallery:
        """A new gallery with more images; unseen label names become new classes."""
        if self.ondisk_dir is not None:
            raise DatasetError("enrolling into a gallery with an on-disk index is not supported: its vectors are not "
                               "loaded; rebuild the bundle's gallery from a folder that holds the new classes too")
        names = list(self.class_names)
        index = {name: i for i, name in enumerate(names)}
        for name in label_names:
            if name not in index:
                index[name] = len(names)
                names.append(name)
        labels = np.array([index[name] for name in label_names], dtype=np.int64)
        return Gallery(
            np.concatenate([self.embeddings, np.asarray(embeddings, np.float32)]),
            np.concatenate([self.labels, labels]),
            names,
            list(self.paths) + list(paths),
            self.index_threshold,
            self.nprobe,
            class_means=self.class_means,
            digests=None if self.digests is None else [*self.digests, *file_digests(list(paths))],
        )

    def entry_digests(self) -> list[str]:
        """Each row's source sha256: as recorded, else read from its file where it is on this machine ("" if not)."""
        return list(self.digests) if self.digests is not None else file_digests(self.paths)

    def kept(self, keep: np.ndarray) -> Gallery:
        """A gallery of the rows where ``keep`` is true (held in memory); classes left with no row are dropped.
        A gallery kept from one with an on-disk index has none: its writer builds one again."""
        keep = np.asarray(keep, dtype=bool)
        names = [name for label, name in enumerate(self.class_names) if keep[self.labels == label].any()]
        renumber = {self.class_names.index(name): i for i, name in enumerate(names)}
        digests = self.entry_digests()
        return Gallery(np.asarray(self.embeddings[keep]), np.array([renumber[int(c)] for c in self.labels[keep]]),
                       names, [p for p, k in zip(self.paths, keep) if k], self.index_threshold, self.nprobe,
                       class_means=self.class_means, digests=[d for d, k in zip(digests, keep) if k])

    def relabelled(self, old: str, new: str) -> Gallery:
        """This gallery with class ``old`` named ``new``; into ``new``'s rows when that class exists already."""
        names = [name for name in self.class_names if name != old]
        names += [] if new in names else [new]
        labels = [names.index(new if self.class_names[c] == old else self.class_names[c]) for c in self.labels]
        return Gallery(self.embeddings, np.array(labels), names, list(self.paths), self.index_threshold, self.nprobe,
                       self.ondisk_dir, self.class_means, self.entry_digests())

    @staticmethod
    def ondisk_files(path: str | Path) -> tuple[Path, Path]:
        """Where a gallery saved at ``path`` keeps its vectors and its on-disk index, when it has one."""
        path = Path(path)
        return path.with_name(f"{path.stem}-vectors.npy"), path.with_name(f"{path.stem}-index")

    def save(self, path: str | Path) -> None:
        """Write the gallery as an ``.npz`` (no pickled objects). A gallery with an on-disk index keeps its
        vectors in ``<name>-vectors.npy`` beside it (memory-mapped when loaded) and its index in ``<name>-index/``."""
        path = Path(path)
        ondisk = self.ondisk_dir is not None
        arrays = {
            "embeddings": np.zeros((0, self.embeddings.shape[1]), np.float32) if ondisk else self.embeddings,
            "labels": self.labels,
            "class_names": np.array(self.class_names, dtype=str),
            "paths": np.array(self.paths, dtype=str),
            **({} if self.digests is None else {"digests": np.array(self.digests, dtype=str)}),
        }
        with open(path, "wb") as fh:
            np.savez(fh, **arrays)  # type: ignore[arg-type]  # numpy's stub reads a ** dict as allow_pickle
        if ondisk:
            vectors, index = self.ondisk_files(path)
            np.save(vectors, self.embeddings)
            if Path(str(self.ondisk_dir)).resolve() != index.resolve():
                shutil.copytree(str(self.ondisk_dir), index, dirs_exist_ok=True)

    @classmethod
    def load(cls, path: str | Path, **options) -> Gallery:
        """Read a gallery written by :meth:`save`; ``options`` are ``index_threshold`` and ``nprobe``."""
        vectors, index = cls.ondisk_files(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                embeddings = data["embeddings"]
                if index.is_dir():
                    embeddings = np.load(vectors, mmap_mode="r")
                    options["ondisk_dir"] = str(index)
                digests = data["digests"].tolist() if "digests" in data else None
                gallery = cls(embeddings, data["labels"], data["class_names"].tolist(), data["paths"].tolist(),
                              digests=digests, **options)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            raise BundleError(f"{path}: not a readable gallery ({type(exc).__name__}: {str(exc)[:120]}); the bundle "
                              "is damaged: copy it again or rebuild it") from None
        if gallery.ondisk_dir is None and not np.isfinite(gallery.embeddings).all():
            raise BundleError(f"{path}: the gallery holds non-finite embeddings (NaN or infinity); rebuild it")
        return gallery
