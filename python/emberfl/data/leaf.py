"""LEAF's federated data sets (Caldas et al., 2018), read from LEAF's JSON files on disk.

LEAF (``github.com/TalwalkarLab/leaf``) ships scripts that download and split six data sets
into JSON files, one object per file::

    {"users": ["f0001_41", ...], "num_samples": [154, ...],
     "user_data": {"f0001_41": {"x": [...], "y": [...]}, ...}}

:func:`load_leaf` reads them from ``DATA_ROOT/<name>/train/*.json`` and
``DATA_ROOT/<name>/test/*.json`` (LEAF's own ``<name>/data/train`` layout works too), one
client per training user in file order, each client's test samples as its own test split
(:attr:`FLDataset.test_owner`) and all test samples as the global test split. Nothing is
downloaded.

==================  =====================  ===================================  =========
name                x                      y                                    classes
==================  =====================  ===================================  =========
``femnist``         784 grey values        character ``0..61``                  62
``shakespeare``     80 characters          the next character                   81
``sent140``         a tweet (``x[4]``)     sentiment ``0`` / ``1``              2
``celeba``          an image file name     smiling ``0`` / ``1``                2
``reddit``          comments of token      the word after each sequence         vocab
                    sequences
``synthetic-leaf``  ``d`` numbers          class                                max + 1
==================  =====================  ===================================  =========

How each is turned into tensors:

* ``femnist``: float32 images ``(1, 28, 28)`` as LEAF stores them (1 is white).
* ``shakespeare``: int64 character ids ``(80,)``: the 80 characters of LEAF's alphabet
  (:data:`SHAKESPEARE_LETTERS`) are ``0..79``, any other character is ``80``.
* ``sent140``: int64 word ids ``(25,)``: LEAF's word split, the ``vocab_size`` most
  frequent training words (ties in alphabetical order) numbered from 2, ``1`` for any other
  word, ``0`` for padding on the left (so an LSTM's last state follows the last word).
* ``celeba``: uint8 RGB images ``(3, 84, 84)`` read with Pillow from
  ``<name>/raw/img_align_celeba`` (or ``<name>/data/raw/img_align_celeba``), resized as
  LEAF resizes them; served to models as float32 in ``[0, 1]``.
* ``reddit``: LEAF scores a language model at every position of every 10-token sequence;
  emberfl's task is one label per sample, so each sequence with ``n >= 1`` counted tokens
  becomes one sample: its first ``n`` tokens (left-padded) predict target token ``n``, the
  word that follows them. Word ids as for ``sent140`` (LEAF's ``<PAD>`` is ``0``);
  ``num_classes`` is the vocabulary size.
* ``synthetic-leaf``: float32 vectors ``(d,)`` as stored.

The first load converts the JSON files, one at a time, into flat arrays in
``<name>/.emberfl-cache/`` beside them; later loads memory-map those arrays, so a
3,500-user FEMNIST costs page cache rather than Python lists. The cache is rebuilt when a
JSON file's size or modification time changes; on a read-only data root the arrays are
converted in memory instead.

Example:
    >>> import json, tempfile, pathlib
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> for split, n in (("train", 3), ("test", 1)):
    ...     (root / "synthetic-leaf" / split).mkdir(parents=True)
    ...     data = {"x": [[0.5, -1.0]] * n, "y": [1] * n}
    ...     blob = {"users": ["u0"], "num_samples": [n], "user_data": {"u0": data}}
    ...     (root / "synthetic-leaf" / split / "a.json").write_text(json.dumps(blob))
    >>> ds = load_leaf("synthetic-leaf", root)
    >>> ds.num_train, ds.num_test, ds.client_names
    (3, 1, ('u0',))
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from emberfl.data.datasets import LEAF_DATASETS, FLDataset
from emberfl.errors import ConfigError, DatasetFormatError, DatasetNotFoundError

__all__ = [
    "LEAF_DATASETS",
    "SHAKESPEARE_LETTERS",
    "load_leaf",
]

SHAKESPEARE_LETTERS = (
    "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"
)
"""LEAF's Shakespeare alphabet: character ``i`` has id ``i``; any other character is 80."""

_FOLDER = {"synthetic-leaf": "synthetic"}
_HINT = (
    "generate it with LEAF's scripts (github.com/TalwalkarLab/leaf, data/{folder}: "
    "./preprocess.sh ...) and pass the folder that holds {folder}/ as --data-root"
)
_CACHE_DIR = ".emberfl-cache"
_CACHE_VERSION = 1
_MANIFEST = "manifest.json"
_SEQ_WORDS = 25  # LEAF's sent140 max_words
_CELEBA_SIDE = 84  # LEAF's celeba IMAGE_SIZE
_FEMNIST_SIDE = 28
_PAD, _UNK = 0, 1
_WORDS = re.compile(r"[\w']+|[.,!?;]")  # LEAF's sent140 word split
_REDDIT_PAD = "<PAD>"

PathArg = str | os.PathLike[str]


# --------------------------------------------------------------------------------------------
# Finding and reading the JSON files
# --------------------------------------------------------------------------------------------


def _dataset_dir(name: str, data_root: Path) -> tuple[Path, Path, Path]:
    """Return ``(dataset folder, train folder, test folder)``."""
    folder = _FOLDER.get(name, name)
    tried = []
    for base in (data_root / folder, data_root / folder / "data"):
        train, test = base / "train", base / "test"
        tried.append(str(train))
        if train.is_dir() and any(train.glob("*.json")):
            if not test.is_dir() or not any(test.glob("*.json")):
                raise DatasetNotFoundError(
                    f"LEAF {name}: {train} holds the training files but {test} has no "
                    f"*.json test files; {_HINT.format(folder=folder)}"
                )
            return base, train, test
    raise DatasetNotFoundError(
        f"LEAF {name} is not under {data_root} (looked for *.json in "
        f"{' and '.join(tried)}); {_HINT.format(folder=folder)}"
    )


def _json_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.json"))


def _read_users(path: Path) -> Iterator[tuple[str, list[Any], list[Any]]]:
    """Yield ``(user, x, y)`` of one LEAF file, checking its structure."""
    try:
        with path.open("rb") as f:
            blob = json.load(f)
    except json.JSONDecodeError as exc:
        raise DatasetFormatError(
            f"{path} is not valid JSON (truncated or corrupt? {exc.msg} at line {exc.lineno}); "
            "regenerate it with LEAF's scripts"
        ) from None
    except UnicodeDecodeError:
        raise DatasetFormatError(f"{path} is not UTF-8 JSON; regenerate it") from None
    if not isinstance(blob, dict) or not {"users", "user_data"} <= blob.keys():
        raise DatasetFormatError(
            f"{path} is not a LEAF file: it needs the keys 'users', 'num_samples' and 'user_data'"
        )
    users, user_data = blob["users"], blob["user_data"]
    counts = blob.get("num_samples")
    if not isinstance(users, list) or not isinstance(user_data, dict):
        raise DatasetFormatError(f"{path}: 'users' must be a list and 'user_data' an object")
    if counts is not None and (not isinstance(counts, list) or len(counts) != len(users)):
        raise DatasetFormatError(
            f"{path}: 'num_samples' must list one count per user ({len(users)} users)"
        )
    for i, user in enumerate(users):
        entry = user_data.get(user)
        if not isinstance(entry, dict) or "x" not in entry or "y" not in entry:
            raise DatasetFormatError(f"{path}: user {user!r} has no 'x' and 'y' in 'user_data'")
        xs, ys = entry["x"], entry["y"]
        if not isinstance(xs, list) or not isinstance(ys, list):
            raise DatasetFormatError(f"{path}: user {user!r}: 'x' and 'y' must be lists")
        if len(xs) != len(ys):
            raise DatasetFormatError(
                f"{path}: user {user!r} has {len(xs)} inputs 'x' but {len(ys)} labels 'y'"
            )
        if not xs:
            raise DatasetFormatError(
                f"{path}: user {user!r} has no samples; remove it (LEAF's -k option drops "
                "small users)"
            )
        if counts is not None and counts[i] != len(xs):
            raise DatasetFormatError(
                f"{path}: 'num_samples' says user {user!r} has {counts[i]} samples but it has "
                f"{len(xs)}"
            )
        yield str(user), xs, ys


# --------------------------------------------------------------------------------------------
# Converters: one user's (x, y) lists -> arrays
# --------------------------------------------------------------------------------------------


@dataclass
class _Context:
    """What a converter needs beyond one user's lists."""

    name: str
    path: Path
    user: str
    vocab: dict[str, int]
    images: Path | None


def _fail(ctx: _Context, what: str) -> DatasetFormatError:
    return DatasetFormatError(f"{ctx.path}: user {ctx.user!r}: {what}")


def _floats(ctx: _Context, xs: list[Any], dim: int | None) -> npt.NDArray[np.float32]:
    want = f"{dim} numbers" if dim is not None else "numbers, as many in each"
    try:
        arr = np.asarray(xs, dtype=np.float32)
    except (ValueError, TypeError):
        raise _fail(ctx, f"every 'x' must hold {want}") from None
    if arr.ndim != 2 or (dim is not None and arr.shape[1] != dim):
        raise _fail(ctx, f"every 'x' must hold {want}, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise _fail(ctx, "'x' holds NaN or infinite values")
    return arr


def _labels(ctx: _Context, ys: list[Any], num_classes: int | None) -> npt.NDArray[np.int64]:
    try:
        arr = np.asarray([int(v) for v in ys], dtype=np.int64)
    except (ValueError, TypeError):
        raise _fail(ctx, "every label 'y' must be an integer") from None
    if arr.min() < 0 or (num_classes is not None and arr.max() >= num_classes):
        top = "" if num_classes is None else f"..{num_classes - 1}"
        raise _fail(ctx, f"labels must lie in 0{top}, got {arr.min()}..{arr.max()}")
    return arr


def _femnist(ctx: _Context, xs: list[Any], ys: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    side = _FEMNIST_SIDE
    x = _floats(ctx, xs, side * side).reshape(-1, 1, side, side)
    return x, _labels(ctx, ys, 62)


def _synthetic(ctx: _Context, xs: list[Any], ys: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    return _floats(ctx, xs, None), _labels(ctx, ys, None)


_LETTER_ID = {c: i for i, c in enumerate(SHAKESPEARE_LETTERS)}
_OTHER_LETTER = len(SHAKESPEARE_LETTERS)


def _shakespeare(ctx: _Context, xs: list[Any], ys: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    if not all(isinstance(s, str) for s in xs) or not all(
        isinstance(c, str) and len(c) == 1 for c in ys
    ):
        raise _fail(ctx, "'x' must hold strings and 'y' single characters")
    lengths = {len(s) for s in xs}
    if len(lengths) != 1 or 0 in lengths:
        raise _fail(ctx, f"every 'x' must be a string of one length, got lengths {lengths}")
    x = np.asarray([[_LETTER_ID.get(c, _OTHER_LETTER) for c in s] for s in xs], dtype=np.int64)
    y = np.asarray([_LETTER_ID.get(c, _OTHER_LETTER) for c in ys], dtype=np.int64)
    return x, y


def _tweet(ctx: _Context, x: Any) -> str:
    text = x[4] if isinstance(x, list) and len(x) >= 5 else x
    if not isinstance(text, str):
        raise _fail(ctx, "every 'x' must be LEAF's [id, date, query, user, text] or a string")
    return text


def _left_pad(ids: list[int], length: int) -> list[int]:
    ids = ids[:length]
    return [_PAD] * (length - len(ids)) + ids


def _sent140(ctx: _Context, xs: list[Any], ys: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    unk = _UNK
    rows = [
        _left_pad([ctx.vocab.get(w, unk) for w in _WORDS.findall(_tweet(ctx, x))], _SEQ_WORDS)
        for x in xs
    ]
    return np.asarray(rows, dtype=np.int64), _labels(ctx, ys, 2)


def _reddit_pairs(
    ctx: _Context, xs: list[Any], ys: list[Any]
) -> Iterator[tuple[list[str], str, int]]:
    """Yield ``(context tokens, next token, sequence length)`` per sequence with a counted
    token."""
    for comment, target in zip(xs, ys, strict=True):
        if not isinstance(comment, list):
            raise _fail(ctx, "every 'x' must be a comment: a list of token sequences")
        if isinstance(target, dict):
            seqs, counts = target.get("target_tokens"), target.get("count_tokens")
        else:
            seqs, counts = target, None
        if not isinstance(seqs, list) or len(seqs) != len(comment):
            raise _fail(ctx, "every 'y' must hold one target sequence per sequence of 'x'")
        for i, (seq, tgt) in enumerate(zip(comment, seqs, strict=True)):
            if not isinstance(seq, list) or not isinstance(tgt, list) or len(seq) != len(tgt):
                raise _fail(ctx, "a sequence and its targets must be token lists of one length")
            if counts is not None:
                n = int(sum(counts[i]))
            else:
                n = sum(1 for t in tgt if t != _REDDIT_PAD)
            if n < 1:
                continue
            n = min(n, len(seq))
            yield [str(t) for t in seq[:n]], str(tgt[n - 1]), len(seq)


def _reddit(ctx: _Context, xs: list[Any], ys: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    vocab = ctx.vocab
    rows, labels = [], []
    length = 0
    for tokens, nxt, full in _reddit_pairs(ctx, xs, ys):
        length = max(length, full)
        rows.append([vocab.get(t, _UNK) for t in tokens])
        labels.append(vocab.get(nxt, _UNK))
    if not rows:
        raise _fail(ctx, "no sequence has a counted token")
    width = max(length, 1)
    return (
        np.asarray([_left_pad(r, width) for r in rows], dtype=np.int64),
        np.asarray(labels, dtype=np.int64),
    )


def _celeba(ctx: _Context, xs: list[Any], ys: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image, UnidentifiedImageError

    assert ctx.images is not None
    side = _CELEBA_SIDE
    out = np.empty((len(xs), 3, side, side), dtype=np.uint8)
    for i, fname in enumerate(xs):
        if not isinstance(fname, str):
            raise _fail(ctx, "every 'x' must be an image file name")
        path = ctx.images / fname
        try:
            with Image.open(path) as img:
                pixels = np.asarray(img.resize((side, side)).convert("RGB"))
        except FileNotFoundError:
            raise DatasetNotFoundError(
                f"LEAF celeba: image {path} (of user {ctx.user!r} in {ctx.path}) is missing; "
                f"{_HINT.format(folder='celeba')}"
            ) from None
        except (UnidentifiedImageError, OSError) as exc:
            raise DatasetFormatError(f"LEAF celeba: cannot read image {path}: {exc}") from None
        out[i] = pixels.transpose(2, 0, 1)
    return out, _labels(ctx, ys, 2)


_CONVERT: dict[str, Callable[[_Context, list[Any], list[Any]], tuple[np.ndarray, np.ndarray]]] = {
    "femnist": _femnist,
    "shakespeare": _shakespeare,
    "sent140": _sent140,
    "celeba": _celeba,
    "reddit": _reddit,
    "synthetic-leaf": _synthetic,
}
_FIXED_CLASSES = {"femnist": 62, "shakespeare": _OTHER_LETTER + 1, "sent140": 2, "celeba": 2}
_TEXT = ("sent140", "reddit")


def _build_vocab(name: str, files: list[Path], size: int) -> dict[str, int]:
    """The ``size`` most frequent training words, numbered from 2 (ties alphabetically)."""
    counts: Counter[str] = Counter()
    for path in files:
        for user, xs, ys in _read_users(path):
            ctx = _Context(name, path, user, {}, None)
            if name == "sent140":
                for x in xs:
                    counts.update(_WORDS.findall(_tweet(ctx, x)))
            else:
                for tokens, nxt, _ in _reddit_pairs(ctx, xs, ys):
                    counts.update(tokens)
                    counts[nxt] += 1
    counts.pop(_REDDIT_PAD, None)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:size]
    vocab = {w: i + 2 for i, (w, _) in enumerate(ranked)}
    vocab[_REDDIT_PAD] = _PAD
    return vocab


# --------------------------------------------------------------------------------------------
# Conversion into flat arrays, and the cache
# --------------------------------------------------------------------------------------------


class _Column:
    """Rows appended to a raw binary file (``x`` or ``y`` of one split)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = path.open("wb")
        self.rows = 0
        self.row_shape: tuple[int, ...] | None = None
        self.dtype: np.dtype[Any] | None = None

    def add(self, arr: np.ndarray, where: str) -> None:
        if self.row_shape is None:
            self.row_shape, self.dtype = tuple(arr.shape[1:]), arr.dtype
        elif tuple(arr.shape[1:]) != self.row_shape:
            raise DatasetFormatError(
                f"{where}: samples of shape {tuple(arr.shape[1:])}, but earlier ones are "
                f"{self.row_shape}"
            )
        self.file.write(np.ascontiguousarray(arr, dtype=self.dtype).tobytes())
        self.rows += int(arr.shape[0])

    def close(self) -> None:
        self.file.close()

    def meta(self) -> dict[str, Any]:
        assert self.dtype is not None and self.row_shape is not None
        return {"dtype": self.dtype.str, "shape": [self.rows, *self.row_shape]}


def _source_stamp(files: list[Path]) -> list[list[Any]]:
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def _convert(
    name: str,
    base: Path,
    train_files: list[Path],
    test_files: list[Path],
    out: Path,
    vocab_size: int,
) -> dict[str, Any]:
    """Write ``{train,test}_{x,y}.bin``, ``*_owner.npy`` and return the manifest."""
    vocab = _build_vocab(name, train_files, vocab_size) if name in _TEXT else {}
    images = None
    if name == "celeba":
        candidates = [base / "raw" / "img_align_celeba", base.parent / "raw" / "img_align_celeba"]
        candidates += [base / "img_align_celeba"]
        images = next((c for c in candidates if c.is_dir()), None)
        if images is None:
            raise DatasetNotFoundError(
                f"LEAF celeba: the images are not in {candidates[0]}; "
                f"{_HINT.format(folder='celeba')}"
            )
    convert = _CONVERT[name]
    users: dict[str, int] = {}
    meta: dict[str, Any] = {"version": _CACHE_VERSION, "name": name, "vocab_size": vocab_size}
    max_label = -1
    for split, files in (("train", train_files), ("test", test_files)):
        cols = [_Column(out / f"{split}_x.bin"), _Column(out / f"{split}_y.bin")]
        owners: list[npt.NDArray[np.int64]] = []
        try:
            for path in files:
                for user, xs, ys in _read_users(path):
                    ctx = _Context(name, path, user, vocab, images)
                    x, y = convert(ctx, xs, ys)
                    where = f"{path}: user {user!r}"
                    if name == "reddit" and cols[0].row_shape is not None:
                        x = _fit_width(x, cols[0].row_shape[0])
                    cols[0].add(x, where)
                    cols[1].add(y, where)
                    max_label = max(max_label, int(y.max()))
                    if split == "train":
                        if user in users:
                            raise DatasetFormatError(
                                f"{path}: user {user!r} appears in two training files"
                            )
                        users[user] = len(users)
                    owners.append(np.full(len(y), users.get(user, -1), dtype=np.int64))
        finally:
            for col in cols:
                col.close()
        if cols[0].rows == 0:
            raise DatasetFormatError(f"LEAF {name}: the {split} files hold no samples")
        np.save(out / f"{split}_owner.npy", np.concatenate(owners))
        meta[f"{split}_x"], meta[f"{split}_y"] = cols[0].meta(), cols[1].meta()
    meta["users"] = list(users)
    meta["num_classes"] = _FIXED_CLASSES.get(name, max_label + 1)
    if name == "reddit":
        meta["num_classes"] = max(vocab.values()) + 1
    if name in _TEXT:
        meta["vocab"] = max(vocab.values()) + 1
    elif name == "shakespeare":
        meta["vocab"] = _OTHER_LETTER + 1
    return meta


def _fit_width(x: np.ndarray, width: int) -> np.ndarray:
    """Left-pad or cut reddit's id rows to ``width`` columns (every file the same)."""
    if x.shape[1] == width:
        return x
    if x.shape[1] > width:
        raise DatasetFormatError(
            f"LEAF reddit: sequences of {x.shape[1]} tokens after sequences of {width}"
        )
    pad = np.full((x.shape[0], width - x.shape[1]), _PAD, dtype=x.dtype)
    return np.concatenate([pad, x], axis=1)


def _open(folder: Path, meta: dict[str, Any], key: str, in_memory: bool) -> torch.Tensor:
    info = meta[key]
    dtype, shape = np.dtype(info["dtype"]), tuple(int(d) for d in info["shape"])
    path = folder / f"{key}.bin"
    if path.stat().st_size != dtype.itemsize * int(np.prod(shape)):
        raise DatasetFormatError(f"{path} does not match its manifest; delete {folder}")
    arr: np.ndarray
    if in_memory:
        arr = np.fromfile(path, dtype=dtype).reshape(shape)
    else:
        # Copy-on-write: torch gets a writable array without the file being written.
        arr = np.memmap(path, dtype=dtype, mode="c", shape=shape)
    return torch.from_numpy(arr)


def _dataset(name: str, folder: Path, meta: dict[str, Any], in_memory: bool) -> FLDataset:
    def owner(split: str) -> torch.Tensor:
        return torch.from_numpy(np.load(folder / f"{split}_owner.npy"))

    return FLDataset(
        name=name,
        train_x=_open(folder, meta, "train_x", in_memory),
        train_y=_open(folder, meta, "train_y", in_memory),
        test_x=_open(folder, meta, "test_x", in_memory),
        test_y=_open(folder, meta, "test_y", in_memory),
        num_classes=int(meta["num_classes"]),
        train_owner=owner("train"),
        test_owner=owner("test"),
        client_names=tuple(meta["users"]),
        vocab_size=meta.get("vocab"),
    )


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((folder / _MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def load_leaf(name: str, data_root: PathArg, *, vocab_size: int = 10_000) -> FLDataset:
    """Load a LEAF data set from its JSON files, converting them once into a cache.

    Args:
        name: One of :data:`LEAF_DATASETS`.
        data_root: The folder that holds ``<name>/train`` and ``<name>/test`` (or LEAF's
            ``<name>/data/train`` ...); ``synthetic-leaf`` lives in ``synthetic/``.
        vocab_size: ``sent140`` and ``reddit``: how many training words get ids of
            their own (>= 1).

    Returns:
        The data set, with :attr:`FLDataset.train_owner` (client ``k`` = the ``k``-th
        training user), :attr:`FLDataset.test_owner` (``-1`` for a test user with no
        training data) and :attr:`FLDataset.client_names`.

    Raises:
        ConfigError: For an unknown name or a ``vocab_size`` below 1.
        DatasetNotFoundError: If the files (or CelebA's images) are missing.
        DatasetFormatError: For a truncated or corrupt file, a user with no samples or
            with different numbers of inputs and labels, or samples of different shapes;
            nothing is cached then.
    """
    if name not in LEAF_DATASETS:
        raise ConfigError(f"unknown LEAF data set {name!r}; choose one of: {LEAF_DATASETS}")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ConfigError(f"vocab_size must be an integer >= 1, got {vocab_size!r}")
    root = Path(data_root).expanduser()
    base, train_dir, test_dir = _dataset_dir(name, root)
    train_files, test_files = _json_files(train_dir), _json_files(test_dir)
    stamp = {
        "version": _CACHE_VERSION,
        "vocab_size": vocab_size if name in _TEXT else None,
        "train": _source_stamp(train_files),
        "test": _source_stamp(test_files),
    }
    cache = base / _CACHE_DIR / name
    meta = _read_manifest(cache)
    if meta is not None and meta.get("stamp") == stamp:
        return _dataset(name, cache, meta, in_memory=False)
    try:
        cache.parent.mkdir(exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache.parent))
        in_memory = False
    except OSError as exc:
        warnings.warn(
            f"cannot cache LEAF {name} beside its files ({exc.strerror}): converting it in "
            "memory on every load",
            stacklevel=2,
        )
        work = Path(tempfile.mkdtemp(prefix=f"emberfl-leaf-{name}-"))
        in_memory = True
    try:
        meta = _convert(name, base, train_files, test_files, work, vocab_size)
        meta["stamp"] = stamp
        (work / _MANIFEST).write_text(json.dumps(meta))
        if in_memory:
            return _dataset(name, work, meta, in_memory=True)
        try:
            umask = os.umask(0)
            os.umask(umask)
            work.chmod(0o777 & ~umask)  # mkdtemp's folder is private
            shutil.rmtree(cache, ignore_errors=True)
            os.replace(work, cache)
        except OSError as exc:
            warnings.warn(f"could not cache LEAF {name} in {cache} ({exc})", stacklevel=2)
            return _dataset(name, work, meta, in_memory=True)
        return _dataset(name, cache, meta, in_memory=False)
    finally:
        shutil.rmtree(work, ignore_errors=True)
