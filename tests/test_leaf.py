"""LEAF's JSON data sets: loaders against the files they read, the cache, natural splits
with each client's own test samples, LEAF's models in every execution mode, bad input.

Every fixture is a handful of users written by the test in LEAF's format; the expected
tensors are rebuilt here from the JSON with plain Python.
"""

from __future__ import annotations

import csv
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from emberfl.cli import main
from emberfl.data import leaf as leaf_module
from emberfl.data import load_dataset
from emberfl.data.leaf import SHAKESPEARE_LETTERS, load_leaf
from emberfl.data.partition import Partition
from emberfl.data.partitioned import TensorPartitionedDataset, client_test_rows
from emberfl.errors import ConfigError, DatasetFormatError, DatasetNotFoundError
from emberfl.models import Models
from emberfl.models.leaf import FEMNISTCNN, CelebACNN
from emberfl.nn import LSTM

WORDS = ["i", "love", "this", "hate", "that", "movie", "so", "much", "!", "."]


def _femnist(rng: np.random.Generator, n: int) -> dict[str, Any]:
    return {"x": rng.random((n, 784)).round(4).tolist(), "y": rng.integers(0, 62, n).tolist()}


def _shakespeare(rng: np.random.Generator, n: int) -> dict[str, Any]:
    chars = list("abcXYZ .\n~")  # '~' is not in LEAF's alphabet
    return {
        "x": ["".join(rng.choice(chars, 80)) for _ in range(n)],
        "y": [str(rng.choice(chars)) for _ in range(n)],
    }


def _sent140(rng: np.random.Generator, n: int) -> dict[str, Any]:
    tweets = [" ".join(rng.choice(WORDS, int(rng.integers(2, 30)))) for _ in range(n)]
    return {
        "x": [["1", "Mon Apr 06", "NO_QUERY", "someone", t] for t in tweets],
        "y": rng.integers(0, 2, n).tolist(),
    }


def _synthetic(rng: np.random.Generator, n: int) -> dict[str, Any]:
    return {"x": rng.normal(size=(n, 5)).round(5).tolist(), "y": rng.integers(0, 4, n).tolist()}


def _reddit(rng: np.random.Generator, n: int) -> dict[str, Any]:
    xs, ys = [], []
    for _ in range(n):
        seqs, targets, counts = [], [], []
        for _ in range(int(rng.integers(1, 3))):
            used = int(rng.integers(0, 10))
            words = ["<BOS>", *rng.choice(WORDS, 10).tolist()]
            seqs.append(words[:used] + ["<PAD>"] * (10 - used))
            targets.append(words[1 : used + 1] + ["<PAD>"] * (10 - used))
            counts.append([1] * used + [0] * (10 - used))
        xs.append(seqs)
        ys.append({"target_tokens": targets, "count_tokens": counts})
    return {"x": xs, "y": ys}


MAKERS = {
    "femnist": _femnist,
    "shakespeare": _shakespeare,
    "sent140": _sent140,
    "synthetic-leaf": _synthetic,
    "reddit": _reddit,
}


def write_leaf(
    root: Path,
    name: str,
    *,
    users: int = 5,
    files: int = 2,
    layout: str = "plain",
    seed: int = 0,
    test_only_user: bool = False,
) -> dict[str, dict[str, dict[str, Any]]]:
    """Write a LEAF data set under ``root``; return ``{split: {user: {"x", "y"}}}``."""
    folder = "synthetic" if name == "synthetic-leaf" else name
    base = root / folder if layout == "plain" else root / folder / "data"
    rng = np.random.default_rng(seed)
    written: dict[str, dict[str, dict[str, Any]]] = {}
    for split in ("train", "test"):
        names = [f"user{i:02d}" for i in range(users)]
        if split == "test" and test_only_user:
            names.append("only_test")
        data = {u: MAKERS[name](rng, int(rng.integers(2, 6))) for u in names}
        written[split] = data
        (base / split).mkdir(parents=True, exist_ok=True)
        per = -(-len(names) // files)
        for f in range(files):
            chunk = names[f * per : (f + 1) * per]
            blob = {
                "users": chunk,
                "num_samples": [len(data[u]["y"]) for u in chunk],
                "user_data": {u: data[u] for u in chunk},
            }
            (base / split / f"part_{f}.json").write_text(json.dumps(blob))
    return written


def _flat(written: dict[str, dict[str, Any]], key: str) -> list[Any]:
    return [v for user in written.values() for v in user[key]]


def _owners(written: dict[str, dict[str, Any]], names: list[str]) -> list[int]:
    ids = {u: i for i, u in enumerate(names)}
    return [ids.get(u, -1) for u, d in written.items() for _ in d["y"]]


# --------------------------------------------------------------------------------------------
# Loaders against the JSON
# --------------------------------------------------------------------------------------------


def test_femnist_and_synthetic_read_every_user_in_file_order(tmp_path: Path) -> None:
    for name, shape in (("femnist", (1, 28, 28)), ("synthetic-leaf", (5,))):
        written = write_leaf(tmp_path, name, test_only_user=True)
        ds = load_leaf(name, tmp_path)
        users = list(written["train"])
        assert ds.client_names == tuple(users)
        assert ds.input_shape == shape and ds.train_x.dtype == torch.float32
        want_x = np.asarray(_flat(written["train"], "x"), dtype=np.float32)
        np.testing.assert_array_equal(ds.train_x.reshape(len(want_x), -1).numpy(), want_x)
        assert ds.train_y.tolist() == _flat(written["train"], "y")
        assert ds.test_y.tolist() == _flat(written["test"], "y")
        assert ds.train_owner.tolist() == _owners(written["train"], users)  # type: ignore[union-attr]
        # The test-only user's samples are in the global test split but no client's.
        assert ds.test_owner.tolist() == _owners(written["test"], users)  # type: ignore[union-attr]
        assert ds.test_owner.tolist().count(-1) == len(written["test"]["only_test"]["y"])  # type: ignore[union-attr]
    assert load_leaf("femnist", tmp_path).num_classes == 62
    labels = _flat(written["train"], "y") + _flat(written["test"], "y")
    assert ds.num_classes == max(labels) + 1


def test_shakespeare_maps_leaf_letters_and_others_to_80(tmp_path: Path) -> None:
    written = write_leaf(tmp_path, "shakespeare")
    ds = load_leaf("shakespeare", tmp_path)

    def ids(text: str) -> list[int]:
        return [SHAKESPEARE_LETTERS.index(c) if c in SHAKESPEARE_LETTERS else 80 for c in text]

    assert len(SHAKESPEARE_LETTERS) == 80
    assert ds.train_x.tolist() == [ids(s) for s in _flat(written["train"], "x")]
    assert ds.train_y.tolist() == [ids(c)[0] for c in _flat(written["train"], "y")]
    assert ds.train_x.dtype == torch.int64 and ds.vocab_size == 81 and ds.num_classes == 81
    assert 80 in ds.train_x.unique().tolist()  # '~'


def test_sent140_numbers_words_by_training_frequency(tmp_path: Path) -> None:
    written = write_leaf(tmp_path, "sent140")
    size = 6
    ds = load_leaf("sent140", tmp_path, vocab_size=size)
    split = re.compile(r"[\w']+|[.,!?;]")
    counts = Counter(w for x in _flat(written["train"], "x") for w in split.findall(x[4]))
    ranked = sorted(counts, key=lambda w: (-counts[w], w))[:size]
    vocab = {w: i + 2 for i, w in enumerate(ranked)}

    def ids(text: str) -> list[int]:
        tokens = [vocab.get(w, 1) for w in split.findall(text)][:25]
        return [0] * (25 - len(tokens)) + tokens

    assert ds.train_x.tolist() == [ids(x[4]) for x in _flat(written["train"], "x")]
    assert ds.test_x.tolist() == [ids(x[4]) for x in _flat(written["test"], "x")]
    assert ds.vocab_size == size + 2 and ds.num_classes == 2


def test_reddit_predicts_the_word_after_each_counted_sequence(tmp_path: Path) -> None:
    written = write_leaf(tmp_path, "reddit")
    ds = load_leaf("reddit", tmp_path, vocab_size=100)
    counts: Counter[str] = Counter()
    pairs = []
    for user in written["train"].values():
        for comment, target in zip(user["x"], user["y"], strict=True):
            for seq, tgt, cnt in zip(
                comment, target["target_tokens"], target["count_tokens"], strict=True
            ):
                n = sum(cnt)
                if n:
                    pairs.append((seq[:n], tgt[n - 1]))
                    counts.update([*seq[:n], tgt[n - 1]])
    counts.pop("<PAD>", None)
    vocab = {w: i + 2 for i, w in enumerate(sorted(counts, key=lambda w: (-counts[w], w)))}
    want_x = [[0] * (10 - len(s)) + [vocab[w] for w in s] for s, _ in pairs]
    assert ds.train_x.tolist() == want_x
    assert ds.train_y.tolist() == [vocab[t] for _, t in pairs]
    assert ds.num_classes == ds.vocab_size == len(vocab) + 2


def test_celeba_reads_and_resizes_the_images(tmp_path: Path) -> None:
    from PIL import Image

    images = tmp_path / "celeba" / "data" / "raw" / "img_align_celeba"
    images.mkdir(parents=True)
    rng = np.random.default_rng(3)
    pixels = {}
    for split in ("train", "test"):
        (tmp_path / "celeba" / "data" / split).mkdir()
        data = {}
        for u in ("a", "b"):
            names = []
            for _ in range(2):
                name = f"{len(pixels):06d}.png"
                img = rng.integers(0, 256, (60, 50, 3), dtype=np.uint8)
                Image.fromarray(img).save(images / name)
                pixels[name] = np.asarray(Image.fromarray(img).resize((84, 84)))
                names.append(name)
            data[u] = {"x": names, "y": [0, 1]}
        blob = {"users": ["a", "b"], "num_samples": [2, 2], "user_data": data}
        (tmp_path / "celeba" / "data" / split / "all.json").write_text(json.dumps(blob))
    ds = load_leaf("celeba", tmp_path)
    assert ds.train_x.dtype == torch.uint8 and ds.input_shape == (3, 84, 84)
    np.testing.assert_array_equal(ds.train_x[0].permute(1, 2, 0).numpy(), pixels["000000.png"])
    assert ds.train_y.tolist() == [0, 1, 0, 1] and ds.num_classes == 2
    # Models see float32 in [0, 1].
    pdata = TensorPartitionedDataset(ds, Partition.from_owner(ds.train_owner.numpy(), 2))  # type: ignore[union-attr]
    x, _ = pdata.get_dataset("train", 0)[0]
    assert x.dtype == torch.float32 and torch.equal(x, ds.train_x[0].float() / 255)
    (images / "000005.png").unlink()
    (tmp_path / "celeba" / "data" / "train" / "all.json").touch()  # invalidate the cache
    with pytest.raises(DatasetNotFoundError, match=r"000005\.png"):
        load_leaf("celeba", tmp_path)


def test_leafs_own_data_layout_is_accepted(tmp_path: Path) -> None:
    written = write_leaf(tmp_path, "femnist", layout="leaf")
    ds = load_dataset("femnist", data_root=tmp_path)
    assert ds.num_train == len(_flat(written["train"], "y"))
    assert (tmp_path / "femnist" / "data" / ".emberfl-cache" / "femnist" / "manifest.json").exists()


# --------------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------------


def _mapped_from(t: torch.Tensor) -> str | None:
    """The file whose memory mapping holds ``t``'s data (Linux's /proc/self/maps)."""
    addr = t.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        start, end = (int(v, 16) for v in fields[0].split("-"))
        if start <= addr < end and len(fields) == 6:
            return fields[5].strip()
    return None


def test_the_cache_is_memory_mapped_and_rebuilt_when_a_file_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_leaf(tmp_path, "femnist")
    first = load_leaf("femnist", tmp_path)
    cache = tmp_path / "femnist" / ".emberfl-cache" / "femnist"
    assert (cache / "train_x.bin").stat().st_size == first.train_x.numel() * 4

    def no_json(path: Path) -> Any:
        raise AssertionError(f"read {path} again")

    monkeypatch.setattr(leaf_module, "_read_users", no_json)
    again = load_leaf("femnist", tmp_path)  # from the cache alone
    assert torch.equal(again.train_x, first.train_x) and torch.equal(again.test_y, first.test_y)
    assert _mapped_from(again.train_x) == str(cache / "train_x.bin")
    monkeypatch.undo()
    written = write_leaf(tmp_path, "femnist", seed=9)  # new contents, new sizes
    fresh = load_leaf("femnist", tmp_path)
    assert fresh.train_y.tolist() == _flat(written["train"], "y")


def test_an_unwritable_cache_falls_back_to_memory(tmp_path: Path) -> None:
    written = write_leaf(tmp_path, "synthetic-leaf")
    (tmp_path / "synthetic" / ".emberfl-cache").write_text("a file, not a folder")
    with pytest.warns(UserWarning, match="cannot cache"):
        ds = load_leaf("synthetic-leaf", tmp_path)
    assert ds.train_y.tolist() == _flat(written["train"], "y")


# --------------------------------------------------------------------------------------------
# Bad input: one clear error each, nothing cached
# --------------------------------------------------------------------------------------------


def _corrupt(path: Path, how: str) -> None:
    blob = json.loads(path.read_text())
    user = blob["users"][0]
    if how == "truncated":
        path.write_text(path.read_text()[: len(path.read_text()) // 2])
        return
    if how == "zero samples":
        blob["user_data"][user] = {"x": [], "y": []}
        blob["num_samples"][0] = 0
    elif how == "x/y lengths":
        blob["user_data"][user]["y"].append(1)
    elif how == "num_samples":
        blob["num_samples"][0] += 3
    elif how == "pixels":
        blob["user_data"][user]["x"][0] = blob["user_data"][user]["x"][0][:700]
    path.write_text(json.dumps(blob))


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("truncated", "is not valid JSON"),
        ("zero samples", "has no samples"),
        ("x/y lengths", "inputs 'x' but"),
        ("num_samples", "'num_samples' says"),
        ("pixels", "784 numbers"),
    ],
)
def test_a_bad_file_is_one_clear_error_and_nothing_is_cached(
    tmp_path: Path, how: str, message: str
) -> None:
    write_leaf(tmp_path, "femnist")
    bad = tmp_path / "femnist" / "test" / "part_1.json"
    _corrupt(bad, how)
    with pytest.raises(DatasetFormatError, match=message) as info:
        load_leaf("femnist", tmp_path)
    assert str(bad) in str(info.value)
    cache = tmp_path / "femnist" / ".emberfl-cache"
    assert not cache.exists() or not any(cache.iterdir())


def test_missing_data_names_where_it_looked_and_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="TalwalkarLab/leaf") as info:
        load_leaf("shakespeare", tmp_path)
    assert str(tmp_path / "shakespeare" / "train") in str(info.value)
    write_leaf(tmp_path, "shakespeare")
    for f in (tmp_path / "shakespeare" / "test").glob("*.json"):
        f.unlink()
    with pytest.raises(DatasetNotFoundError, match=r"no \*\.json test files"):
        load_leaf("shakespeare", tmp_path)
    with pytest.raises(ConfigError, match="vocab_size"):
        load_leaf("sent140", tmp_path, vocab_size=0)


def test_the_cli_reports_a_corrupt_file_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_leaf(tmp_path / "data", "femnist")
    _corrupt(tmp_path / "data" / "femnist" / "train" / "part_0.json", "truncated")
    argv = ["run", "--dataset", "femnist", "--data-root", str(tmp_path / "data"),
            "--partition", "natural", "--num-clients", "2", "--model", "femnist-cnn",
            "--rounds", "1", "--quiet", "--output-dir", str(tmp_path / "run")]  # fmt: skip
    assert main(argv) != 0
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "part_0.json is not valid JSON" in err, err
    assert "Traceback" not in err


# --------------------------------------------------------------------------------------------
# Natural partitions and each client's own test split
# --------------------------------------------------------------------------------------------


def test_client_test_rows_follow_test_owner() -> None:
    owner = torch.tensor([2, -1, 0, 2, 5, 0, 1])
    rows = client_test_rows(owner, 3)
    assert [r.tolist() for r in rows] == [[2, 5], [6], [0, 3]]


def _cli(root: Path, name: str, model: str, out: Path, *extra: str) -> list[str]:
    return ["run", "--dataset", name, "--data-root", str(root), "--partition", "natural",
            "--model", model, "--rounds", "2", "--epochs", "1", "--batch-size", "4",
            "--lr", "0.05", "--quiet", "--output-dir", str(out), *extra]  # fmt: skip


def test_natural_split_takes_the_first_users_and_their_own_tests(tmp_path: Path) -> None:
    written = write_leaf(tmp_path / "data", "synthetic-leaf", users=6)
    out = tmp_path / "run"
    assert main(_cli(tmp_path / "data", "synthetic-leaf", "logreg", out, "--num-clients", "4")) == 0
    with (out / "partition.csv").open() as f:
        table = list(csv.DictReader(f))
    users = list(written["train"])[:4]
    assert [int(row["total"]) for row in table] == [len(written["train"][u]["y"]) for u in users]
    for row, user in zip(table, users, strict=True):
        labels = Counter(written["train"][user]["y"])
        assert {k: int(v) for k, v in row.items() if k.startswith("class_") and int(v)} == {
            f"class_{c}": n for c, n in labels.items()
        }
    with (out / "clients.csv").open() as f:
        assert [(int(r["client"]), r["user"]) for r in csv.DictReader(f)] == list(enumerate(users))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("client_test_accuracy" in r for r in rows)
    # The clients' tests are the test samples of those four users, judged by the global model.
    ds = load_leaf("synthetic-leaf", tmp_path / "data")
    tests = client_test_rows(ds.test_owner, 4)  # type: ignore[arg-type]
    assert sum(len(t) for t in tests) == sum(len(written["test"][u]["y"]) for u in users)
    too_many = _cli(tmp_path / "data", "synthetic-leaf", "logreg", tmp_path / "r2",
                    "--num-clients", "7")  # fmt: skip
    assert main(too_many) == 2


@pytest.mark.parametrize(
    ("name", "model"),
    [("shakespeare", "char-lstm"), ("sent140", "word-lstm"), ("femnist", "femnist-cnn")],
)
def test_leaf_models_train_a_round_in_every_mode(tmp_path: Path, name: str, model: str) -> None:
    write_leaf(tmp_path / "data", name, users=4)
    finals = {}
    for mode in ("serial", "thread", "process", "vectorized"):
        out = tmp_path / mode
        extra = ["--num-clients", "4", "--mode", mode, "--parallelism", "2", "--rounds", "1"]
        assert main(_cli(tmp_path / "data", name, model, out, *extra)) == 0
        from safetensors.torch import load_file

        finals[mode] = load_file(out / "final_model.safetensors")
    start = Models(
        input_shape=tuple(load_leaf(name, tmp_path / "data").input_shape),
        num_classes=load_leaf(name, tmp_path / "data").num_classes,
        vocab_size=load_leaf(name, tmp_path / "data").vocab_size,
    ).select_model(model)
    moved = any(not torch.equal(finals["serial"][k], v) for k, v in start.state_dict().items())
    assert moved, "training changed nothing"
    for mode in ("thread", "process"):
        for key, value in finals["serial"].items():
            assert torch.equal(finals[mode][key], value), (mode, key)
    for key, value in finals["serial"].items():
        torch.testing.assert_close(finals["vectorized"][key], value, rtol=1e-4, atol=1e-5)


def test_token_inputs_need_a_token_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_leaf(tmp_path / "data", "shakespeare", users=3)
    argv = _cli(tmp_path / "data", "shakespeare", "mlp", tmp_path / "run", "--num-clients", "3")
    assert main(argv) == 2
    assert "use char-lstm or word-lstm" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="takes token ids"):
        Models(input_shape=(1, 28, 28), num_classes=62).select_model("char-lstm")


# --------------------------------------------------------------------------------------------
# LEAF's models
# --------------------------------------------------------------------------------------------


def test_leaf_cnns_have_leafs_architecture() -> None:
    femnist = FEMNISTCNN((1, 28, 28), 62)
    # conv 5x5x1x32, conv 5x5x32x64, dense 7*7*64 -> 2048, dense 2048 -> 62, with biases.
    expected = (25 * 32 + 32) + (25 * 32 * 64 + 64) + (7 * 7 * 64 * 2048 + 2048) + (2048 * 62 + 62)
    assert sum(p.numel() for p in femnist.parameters()) == expected
    assert tuple(femnist(torch.zeros(2, 1, 28, 28)).shape) == (2, 62)
    celeba = CelebACNN((3, 84, 84), 2)
    # 84 -> 42 -> 21 -> 11 -> 6 after four "same" poolings.
    assert celeba.fc.in_features == 32 * 6 * 6
    assert tuple(celeba(torch.zeros(2, 3, 84, 84)).shape) == (2, 2)


def test_emberfl_lstm_is_torch_lstm_and_runs_under_vmap() -> None:
    torch.manual_seed(0)
    ours = LSTM(6, 10, 2)
    ref = nn.LSTM(6, 10, 2, batch_first=True)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(4, 7, 6)
    assert torch.equal(ours(x)[0], ref(x)[0])  # outside transforms: the fused kernel itself
    params = dict(ours.named_parameters())
    batched = torch.randn(3, 4, 7, 6)
    out, (h_n, c_n) = vmap(lambda xi: functional_call(ours, params, (xi,)))(batched)
    expected = [ref(xi) for xi in batched]
    torch.testing.assert_close(out, torch.stack([e[0] for e in expected]))
    torch.testing.assert_close(h_n, torch.stack([e[1][0] for e in expected]))
    torch.testing.assert_close(c_n, torch.stack([e[1][1] for e in expected]))

    def loss(p: dict[str, torch.Tensor], xi: torch.Tensor) -> torch.Tensor:
        return functional_call(ours, p, (xi[None],))[0].pow(2).sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, x)
    for i in range(x.shape[0]):
        ref.zero_grad()
        ref(x[i : i + 1])[0].pow(2).sum().backward()
        for key, value in ref.named_parameters():
            torch.testing.assert_close(per_sample[key][i], value.grad, rtol=1e-5, atol=1e-6)
