"""Activation shards in an object store (a real fake-gcs-server): the reader on a gs:// URL
gives bit for bit what it gives on a local copy, reading by range requests; the indexer, the
dumper and the one-line errors work there too; reading windows ahead changes nothing."""

import json
import time
from itertools import islice

import numpy as np
import pytest
from data_utils import crash_on_third_shard

from launch import index_shards
from sae_jax import storage
from sae_jax.data import ActivationData, DataError, make_source
from sae_jax.data.shards import build_manifest, open_dataset, write_manifest
from sae_jax.data.stream import read_ahead

LENGTHS = [700, 300, 1000, 548]  # 2548 tokens
ROWS = slice(0, 98)


def reader(path, **kw) -> ActivationData:
    kw = {"shuffle_buffer": 512, "chunk_tokens": 64, "outlier_norm_factor": 10, **kw}
    return ActivationData(path, **kw)


def take(source, n, start=0, split="train", rows=ROWS):
    return list(islice(source.batches(split, rows, rows.stop - rows.start, start), n))


def assert_same_batches(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert a.x.dtype == b.x.dtype and a.position == b.position
        assert a.x.tobytes() == b.x.tobytes()
        assert (a.keep is None) == (b.keep is None)
        if a.keep is not None:
            np.testing.assert_array_equal(a.keep, b.keep)


@pytest.fixture
def dataset(tmp_path, bucket):
    """(local directory, its upload's URL): float16 shards with outliers and token ids."""
    local = tmp_path / "acts"
    rng = np.random.default_rng(1)
    (local / "token_ids").mkdir(parents=True)
    for i, n in enumerate(LENGTHS):
        x = 30 * rng.normal(size=(n, 8))
        x[:: n // 3, 1] = 3e4  # outliers: ~ 350 x the median norm, within float16
        np.save(local / f"part_{i:03d}.npy", x.astype(np.float16))
        np.save(local / "token_ids" / f"part_{i:03d}.npy", rng.integers(0, 50000, n, np.int32))
    write_manifest(local, build_manifest(local))
    url = f"{bucket}/acts"
    storage.upload_tree(local, url)
    return local, url


def test_url_reader_equals_the_local_one_bitwise(dataset):
    local, url = dataset
    there = make_source(url)
    assert isinstance(there, ActivationData) and str(there.directory) == url
    here = ActivationData(local)
    assert there.manifest == here.manifest
    assert there.input_scale == here.input_scale and there.max_norm == here.max_norm
    assert there.sample(500).tobytes() == here.sample(500).tobytes()
    assert there.in_order(650, 1100).tobytes() == here.in_order(650, 1100).tobytes()
    np.testing.assert_array_equal(there.token_ids(650, 1100), here.token_ids(650, 1100))
    assert there.token_ids(0, 10).dtype == np.int64
    train = take(here, 30)  # past an epoch (about 26 batches)
    assert_same_batches(take(there, 30), train)
    assert_same_batches(take(there, 12, train[16].position), train[17:29])
    assert_same_batches(take(there, 27, split="eval"), take(here, 27, split="eval"))
    assert all(isinstance(a, storage.RangeArray) for a in there._all)  # range reads


def test_each_process_reads_its_own_shards_on_a_url(dataset):
    local, url = dataset
    for p in range(2):
        there = reader(url, process=(p, 2))
        assert [a.url.rsplit("/", 1)[1] for a in there._local] == [
            f"part_{i:03d}.npy" for i in range(p, 4, 2)
        ]
        assert_same_batches(take(there, 8), take(reader(local, process=(p, 2)), 8))


def test_a_window_is_fetched_in_one_concurrent_batch(dataset, monkeypatch):
    _, url = dataset
    there = reader(url)
    there.prefetch_windows = 0
    fs, _ = storage.filesystem(url)
    calls = []
    real = fs.cat_ranges
    monkeypatch.setattr(
        fs, "cat_ranges", lambda paths, *a, **k: calls.append(paths) or real(paths, *a, **k)
    )
    take(there, 5)  # windows of 512 tokens: 8 chunks of 64
    assert calls and all(len(c) == 8 for c in calls)  # a window: 8 concurrent range requests
    assert len(set(calls[0])) > 1  # from several shards


@pytest.mark.parametrize("where", ["local", "gs"])
def test_reading_windows_ahead_changes_nothing(dataset, where):
    path = dataset[0] if where == "local" else dataset[1]
    runs = {}
    for ahead in (0, 1, 3):
        src = reader(path)
        src.prefetch_windows = ahead
        runs[ahead] = take(src, 30) + take(src, 20, split="eval", rows=slice(0, 130))
    assert_same_batches(runs[1], runs[0])
    assert_same_batches(runs[3], runs[0])


def test_read_ahead_holds_at_most_one_plus_depth_items():
    made = []

    def items():
        for i in range(12):
            made.append(i)
            yield i

    for depth in (1, 3):
        made.clear()
        seen, ahead = [], []
        for i in read_ahead(items(), depth):
            time.sleep(0.02)  # time for the thread to run as far ahead as it may
            ahead.append(len(made) - i - 1)
            seen.append(i)
        assert seen == list(range(12))
        assert max(ahead) == depth  # reads ahead, never past depth items


def test_a_read_error_reaches_the_consumer(dataset, monkeypatch):
    _, url = dataset
    src = reader(url)

    def broken(requests):
        raise OSError("connection reset")

    monkeypatch.setattr(storage, "read_blocks", broken)
    with pytest.raises(OSError, match="connection reset"):
        take(src, 3)


def test_index_shards_on_a_url(dataset, capsys):
    local, url = dataset
    storage.path(f"{url}/manifest.json").unlink()
    with pytest.raises(DataError, match="manifest.json: missing; run") as e:
        ActivationData(url)
    assert str(e.value).splitlines()[0].startswith(f"{url}/manifest.json")
    assert index_shards.main([url]) == 0
    assert url in capsys.readouterr().out
    remote = json.loads(storage.path(f"{url}/manifest.json").read_text())
    assert remote == json.loads((local / "manifest.json").read_text())


def test_truncated_shard_on_gs_is_one_line(dataset):
    local, url = dataset
    raw = (local / "part_001.npy").read_bytes()
    storage.path(f"{url}/part_001.npy").write_bytes(raw[:-100])
    with pytest.raises(DataError, match="truncated") as e:
        open_dataset(url)
    assert str(e.value) == (f"{url}/part_001.npy: truncated: {len(raw) - 100} bytes, its "
                            f"header promises {len(raw)}")  # fmt: skip
    assert index_shards.main([url]) == 2
    storage.path(f"{url}/token_ids/part_002.npy").write_bytes(b"\x93NUMPY junk")
    storage.path(f"{url}/part_001.npy").write_bytes(raw)
    with pytest.raises(DataError, match="part_002.npy: not a readable .npy file"):
        open_dataset(url)


def test_url_without_shards_is_one_line(bucket):
    with pytest.raises(DataError, match="no such directory") as e:
        ActivationData(f"{bucket}/nothing")
    assert str(e.value).splitlines()[0] == f"{bucket}/nothing: no such directory"
    storage.write_atomic(f"{bucket}/other/readme.txt", "hi")
    with pytest.raises(DataError, match=f"{bucket}/other: no .npy files"):
        open_dataset(f"{bucket}/other")


def test_dump_to_gs_equals_a_local_dump_and_resumes(tmp_path, bucket, tiny_model, text,
                                                    monkeypatch):  # fmt: skip
    pytest.importorskip("torch")
    from sae_jax.data import dumper

    kw = {"max_tokens": 300, "seq_len": 16, "batch_size": 4, "shard_tokens": 90,
          "dtype": "float16", "device": "cpu", "progress": False}  # fmt: skip
    local = dumper.dump(str(tiny_model), 1, text, tmp_path / "acts", **kw)
    crash_on_third_shard(monkeypatch, dumper)
    url = f"{bucket}/acts"
    with pytest.raises(KeyboardInterrupt):
        dumper.dump(str(tiny_model), 1, text, url, **kw)
    monkeypatch.undo()
    state = json.loads(storage.path(f"{url}/dump_state.json").read_text())
    assert len(state["shards"]) == 2 and not storage.path(f"{url}/manifest.json").exists()
    remote = dumper.dump(str(tiny_model), 1, text, url, **kw)
    assert remote == local
    assert not storage.path(f"{url}/dump_state.json").exists()
    for entry in local["shards"]:
        for name in (entry["file"], entry["token_ids"]):
            assert (
                storage.path(f"{url}/{name}").read_bytes()
                == (tmp_path / "acts" / name).read_bytes()
            )
    assert dumper.dump(str(tiny_model), 1, text, url, **kw) == local  # complete: nothing to do


def test_sparse_samples_fetch_only_their_rows(bucket, tmp_path, monkeypatch):
    """The NaN check, the norm statistics and the input scale sample rows far apart: one
    small request per row (RangeArray's own 1 MiB merging would fetch whole shards)."""
    from sae_jax.data import shards

    x = np.random.default_rng(0).normal(size=(2000, 64)).astype(np.float32)  # 256-byte rows
    np.save(tmp_path / "a.npy", x)
    storage.path(f"{bucket}/a.npy").write_bytes((tmp_path / "a.npy").read_bytes())
    remote = shards.read_header(f"{bucket}/a.npy").open()
    monkeypatch.setattr(shards, "SPARSE_GAP_BYTES", 1024)  # rows > 4 apart: one request each
    fetched = []
    real = storage.read_ranges
    monkeypatch.setattr(storage, "read_ranges", lambda p, r: fetched.extend(r) or real(p, r))
    for start, stop, step in ((0, 2000, 7), (5, 1900, 3), (0, 2000, 1)):
        fetched.clear()
        got = shards.spaced(remote, start, stop, step)
        assert got.tobytes() == x[start:stop:step].tobytes()
        rows = len(range(start, stop, step))
        expect = rows * 256 if step > 4 else (rows - 1) * step * 256 + 256
        assert sum(b - a for a, b in fetched) == expect
    rows = np.asarray([3, 4, 5, 700, 1999])
    assert shards.take_rows(remote, rows).tobytes() == x[rows].tobytes()
