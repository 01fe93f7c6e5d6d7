"""Activation shards: format round trip, the reader's order, resume, sharding and bad input."""

import json
from itertools import islice

import ml_dtypes
import numpy as np
import pytest
from data_utils import ids_of, write_dataset

from launch import index_shards
from sae_jax.data import ActivationData, DataError
from sae_jax.data.shards import build_manifest, open_dataset, write_manifest

LENGTHS = [700, 300, 1000, 548]  # 2548 tokens
ROWS = slice(0, 98)  # 2548 = 26 x 98: one epoch is 26 batches


def reader(path, **kw) -> ActivationData:
    kw = {"shuffle_buffer": 512, "chunk_tokens": 64, "outlier_norm_factor": 0, **kw}
    return ActivationData(path, **kw)


def take(source, n, start=0, split="train"):
    return list(islice(source.batches(split, ROWS, 98, start), n))


def test_round_trip_and_manifest(tmp_path):
    x = write_dataset(tmp_path, LENGTHS)
    manifest, shards = open_dataset(tmp_path)
    assert manifest["d"] == 8 and manifest["total_tokens"] == sum(LENGTHS)
    assert [s.tokens for s in shards] == LENGTHS
    np.testing.assert_array_equal(np.concatenate([s.open() for s in shards]), x)
    stats = manifest["stats"]
    norms = np.linalg.norm(x, axis=1)
    assert stats["median_norm"] == pytest.approx(np.median(norms), rel=1e-5)
    assert stats["outlier_fraction"] == 0


def test_one_epoch_visits_every_token_once_and_mixes(tmp_path):
    write_dataset(tmp_path, LENGTHS)
    src = reader(tmp_path)
    batches = take(src, 27)
    ids = np.concatenate([ids_of(b.x, src.input_scale) for b in batches[:26]])
    assert sorted(ids) == list(range(sum(LENGTHS)))
    assert batches[25].position == sum(LENGTHS)
    first = ids_of(batches[0].x, src.input_scale)
    assert len(np.unique(first // 64)) > 5  # tokens from many chunks, not one run
    second_epoch = ids_of(batches[26].x, src.input_scale)
    assert not np.array_equal(second_epoch, first)  # a new permutation each epoch


def test_order_is_deterministic_per_seed(tmp_path):
    write_dataset(tmp_path, LENGTHS)
    a = [b.x for b in take(reader(tmp_path, seed=3), 5)]
    b = [b.x for b in take(reader(tmp_path, seed=3), 5)]
    c = [b.x for b in take(reader(tmp_path, seed=4), 5)]
    np.testing.assert_array_equal(np.stack(a), np.stack(b))
    assert not np.array_equal(np.stack(a), np.stack(c))


@pytest.mark.parametrize("factor", [0, 10])
def test_resume_from_position(tmp_path, factor):
    write_dataset(tmp_path, LENGTHS, outliers=20)
    src = reader(tmp_path, outlier_norm_factor=factor)
    run = take(src, 40)  # crosses an epoch boundary
    for cut in (1, 7, 25, 33):
        again = reader(tmp_path, outlier_norm_factor=factor)
        resumed = take(again, 40 - cut, run[cut - 1].position)
        for a, b in zip(run[cut:], resumed, strict=True):
            np.testing.assert_array_equal(a.x, b.x)
            assert a.position == b.position


def test_outliers_are_skipped_in_training_and_marked_in_eval(tmp_path):
    x = write_dataset(tmp_path, LENGTHS, outliers=20)
    big = set(np.flatnonzero(np.linalg.norm(x, axis=1) > 10 * np.median(np.linalg.norm(x, axis=1))))
    assert len(big) == 20
    src = reader(tmp_path, outlier_norm_factor=10)
    train = take(src, 25)
    ids = np.concatenate([ids_of(b.x, src.input_scale) for b in train])
    assert not big & set(ids) and len(set(ids)) == len(ids)
    assert train[-1].position > 25 * 98  # read past the outliers it skipped
    evals = take(src, 26, split="eval")
    eval_ids = np.concatenate([ids_of(b.x, src.input_scale) for b in evals])
    keep = np.concatenate([b.keep for b in evals])
    assert sorted(eval_ids) == list(range(sum(LENGTHS)))
    assert set(eval_ids[~keep]) == big


def test_input_scale_gives_unit_mean_square_per_dim(tmp_path):
    write_dataset(tmp_path, LENGTHS, outliers=5)
    src = reader(tmp_path, outlier_norm_factor=10)
    x = np.concatenate([b.x for b in take(src, 26)])
    assert np.mean(np.sum(x**2, axis=1)) == pytest.approx(src.d, rel=0.05)
    assert np.mean(np.sum(src.sample(1000) ** 2, axis=1)) == pytest.approx(src.d, rel=0.05)


def test_two_processes_read_disjoint_shards_that_cover_the_data(tmp_path):
    write_dataset(tmp_path, LENGTHS)
    parts = []
    for p in range(2):
        src = reader(tmp_path, process=(p, 2))
        total = src.local_tokens[p]
        n = total // 49
        batches = list(islice(src.batches("train", slice(0, 49), 98), n))
        parts.append(np.concatenate([ids_of(b.x, src.input_scale) for b in batches]))
        assert len(parts[-1]) == len(set(parts[-1]))
    assert src.local_tokens == [700 + 1000, 300 + 548]
    assert not set(parts[0]) & set(parts[1])
    covered = set(parts[0]) | set(parts[1])
    assert len(covered) == 49 * (1700 // 49) + 49 * (848 // 49)  # whole batches of each stream
    with pytest.raises(DataError, match="4 shard"):
        reader(tmp_path, process=(0, 5))


def test_bfloat16_shards(tmp_path):
    x = np.random.default_rng(0).normal(size=(300, 16)).astype(ml_dtypes.bfloat16)
    np.save(tmp_path / "a.npy", x)
    with pytest.raises(DataError, match="--dtype bfloat16"):
        build_manifest(tmp_path)
    assert index_shards.main([str(tmp_path), "--dtype", "bfloat16"]) == 0
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["source"] = {"model": "somewhere"}
    write_manifest(tmp_path, manifest)
    assert index_shards.main([str(tmp_path), "--dtype", "bfloat16"]) == 0  # keeps the source
    assert json.loads((tmp_path / "manifest.json").read_text())["source"] == {"model": "somewhere"}
    _, shards = open_dataset(tmp_path)
    np.testing.assert_array_equal(shards[0].open(), x)
    src = ActivationData(tmp_path, outlier_norm_factor=0, chunk_tokens=32)
    got = next(src.batches("eval", slice(0, 300), 300)).x
    assert got.dtype == ml_dtypes.bfloat16  # scaled in its own dtype: no float32 copy
    np.testing.assert_allclose(np.sort(got.astype(np.float32) / src.input_scale, axis=0),
                               np.sort(x.astype(np.float32), axis=0), rtol=2**-8)  # fmt: skip


def test_float16_batches_keep_their_dtype_and_skip_outliers(tmp_path):
    # Norms ~ 850: their squares overflow float16, so the outlier norms must not use it.
    x = 300 * np.random.default_rng(0).normal(size=(600, 8))
    x[::100, 1] = 30000  # 6 outliers, ~35 x the median norm
    np.save(tmp_path / "a.npy", x.astype(np.float16))
    write_manifest(tmp_path, build_manifest(tmp_path))
    src = ActivationData(tmp_path, outlier_norm_factor=10, chunk_tokens=32)
    train = next(src.batches("train", slice(0, 594), 594))
    assert train.x.dtype == np.float16 and train.position == 600
    assert np.abs(train.x.astype(np.float32)).max() < 5000 * src.input_scale
    evals = next(src.batches("eval", slice(0, 600), 600))
    assert evals.x.dtype == np.float16 and (~evals.keep).sum() == 6


def _corrupt(path, how):
    files = sorted(path.glob("*.npy"))
    if how == "truncated":
        data = files[1].read_bytes()
        files[1].write_bytes(data[: len(data) - 100])
    elif how == "unreadable":
        files[1].write_bytes(b"not an npy file at all")
    elif how == "wrong d":
        np.save(files[1], np.zeros((300, 7), np.float32))
    elif how == "wrong dtype":
        np.save(files[1], np.zeros((300, 8), np.int32))
    elif how == "nan":
        x = np.load(files[1])
        x[150, 3] = np.nan
        np.save(files[1], x)
    elif how == "token count":
        np.save(files[1], np.ones((299, 8), np.float32))
    return files[1].name


MESSAGES = {
    "truncated": "truncated",
    "unreadable": "not a readable",
    "wrong d": "d = 7",
    "wrong dtype": "dtype int32",
    "nan": "NaN or inf",
    "token count": "299 tokens",
}
BAD = list(MESSAGES)


@pytest.mark.parametrize("how", BAD)
def test_bad_shard_is_one_line_naming_the_file(tmp_path, how):
    write_dataset(tmp_path, LENGTHS)
    name = _corrupt(tmp_path, how)
    with pytest.raises(DataError, match=MESSAGES[how]) as e:  # the reader, against the manifest
        ActivationData(tmp_path)
    assert name in str(e.value).splitlines()[0]  # gin appends a line naming the configurable
    if how not in ("token count", "nan"):
        with pytest.raises(DataError, match=name):  # the indexer, on the files alone
            build_manifest(tmp_path)


def test_bad_directories(tmp_path):
    with pytest.raises(DataError, match="no such directory"):
        ActivationData(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .npy files"):
        ActivationData(tmp_path / "empty")
    write_dataset(tmp_path / "noindex", [100])
    (tmp_path / "noindex" / "manifest.json").unlink()
    with pytest.raises(DataError, match="index_shards"):
        ActivationData(tmp_path / "noindex")
    write_dataset(tmp_path / "ds", [100, 100])
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    manifest["shards"].append({"file": "gone.npy", "tokens": 5})
    write_manifest(tmp_path / "ds", manifest)
    with pytest.raises(DataError, match="gone.npy: listed in manifest.json but missing"):
        ActivationData(tmp_path / "ds")
