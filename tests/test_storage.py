"""sae_jax.storage against a real GCS API server (fake-gcs-server): paths, atomic writes,
trees, and range reads of arrays that never download the whole file."""

import numpy as np
import pytest

from sae_jax import storage


def test_url_or_local_path(tmp_path):
    assert storage.is_url("gs://b/x") and storage.is_url("s3://b/x")
    assert not storage.is_url(tmp_path) and not storage.is_url("file:///tmp/x")
    assert storage.path(tmp_path) == tmp_path
    assert str(storage.path("gs://b/run") / "metrics.jsonl") == "gs://b/run/metrics.jsonl"


@pytest.mark.parametrize("where", ["local", "gs"])
def test_write_move_remove(where, tmp_path, request):
    root = request.getfixturevalue("bucket") + "/run" if where == "gs" else str(tmp_path / "run")
    storage.write_atomic(f"{root}/a/x.json", "{}\n")
    storage.write_atomic(f"{root}/a/x.json", '{"v": 1}\n')
    assert storage.path(f"{root}/a/x.json").read_text() == '{"v": 1}\n'
    storage.move(f"{root}/a", f"{root}/b")
    assert not storage.path(f"{root}/a/x.json").exists()
    assert storage.path(f"{root}/b/x.json").read_text() == '{"v": 1}\n'
    with storage.local_dir(f"{root}/c") as out:
        (out / "sub").mkdir(exist_ok=True)
        (out / "sub" / "y.bin").write_bytes(b"123")
    with storage.local_copy(f"{root}/c") as copy:
        assert (copy / "sub" / "y.bin").read_bytes() == b"123"
    storage.remove_tree(f"{root}/b")
    assert not storage.path(f"{root}/b/x.json").exists()
    storage.remove_tree(f"{root}/never")  # nothing there: no error


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_range_array_equals_memmap(bucket, tmp_path, dtype):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1000, 24)).astype(dtype)
    np.save(tmp_path / "x.npy", x)
    raw = (tmp_path / "x.npy").read_bytes()
    storage.path(f"{bucket}/x.npy").write_bytes(raw)
    offset = len(raw) - x.nbytes
    remote = storage.open_array(f"{bucket}/x.npy", dtype, offset, x.shape)
    local = storage.open_array(tmp_path / "x.npy", dtype, offset, x.shape)
    assert isinstance(remote, storage.RangeArray) and isinstance(local, np.memmap)
    idx = rng.integers(0, 1000, 50)
    for index in (slice(10, 20), slice(None, None, 7), slice(5, 5), idx, slice(990, 2000)):
        np.testing.assert_array_equal(remote[index], x[index])
        np.testing.assert_array_equal(local[index], x[index])
    runs = [(0, 3), (500, 700), (999, 1000)]
    got = storage.read_blocks([(remote, a, b) for a, b in runs])
    for block, (a, b) in zip(got, runs, strict=True):
        np.testing.assert_array_equal(block, x[a:b])


def test_range_array_reads_only_what_is_asked(bucket, monkeypatch):
    """Rows far apart are separate range requests; the bytes fetched are the rows asked for
    (a 1 MiB gap merges neighbours), not the file."""
    x = np.arange(40000 * 64, dtype=np.float32).reshape(40000, 64)  # 10 MiB
    storage.path(f"{bucket}/big.bin").write_bytes(x.tobytes())
    fetched = []
    real = storage.read_ranges
    monkeypatch.setattr(storage, "read_ranges", lambda p, r: fetched.extend(r) or real(p, r))
    remote = storage.RangeArray(f"{bucket}/big.bin", np.float32, 0, x.shape)
    np.testing.assert_array_equal(remote[[5, 39000, 6, 20000]], x[[5, 39000, 6, 20000]])
    assert [(b - a) // 256 for a, b in fetched] == [2, 1, 1]
    assert sum(b - a for a, b in fetched) == 4 * 256
