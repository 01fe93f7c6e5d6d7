"""The store benchmark's latency proxy: bytes forwarded exactly, each request held, and
concurrent requests held concurrently (a latency, not a bandwidth cap)."""

import json
import time

import numpy as np
from data_utils import write_dataset

from launch import bench_store
from launch.latency_proxy import LatencyProxy
from sae_jax import storage


def test_proxy_holds_each_request_and_forwards_exact_bytes(bucket, gcs_server, monkeypatch):
    data = np.random.default_rng(0).bytes(300_000)
    storage.path(f"{bucket}/blob.bin").write_bytes(data)
    with LatencyProxy(gcs_server, latency=0.2) as proxy:
        import gcsfs

        fs = gcsfs.GCSFileSystem(endpoint_url=proxy.url, token="anon", skip_instance_cache=True)
        name = f"{bucket[len('gs://') :]}/blob.bin"
        start = time.perf_counter()
        assert fs.cat_file(name, start=1000, end=5000) == data[1000:5000]
        one = time.perf_counter() - start
        ranges = [(i * 10_000, i * 10_000 + 7_000) for i in range(12)]
        start = time.perf_counter()
        got = fs.cat_ranges([name] * 12, [a for a, _ in ranges], [b for _, b in ranges])
        twelve = time.perf_counter() - start
    assert got == [data[a:b] for a, b in ranges]
    assert one >= 0.2
    assert twelve < 12 * 0.2 / 3, f"12 concurrent requests took {twelve:.2f} s"


def test_bench_store_reports_the_reader_from_disk_store_and_far_store(tmp_path, capsys):
    write_dataset(tmp_path / "acts", [3000, 2000], d=32, dtype=np.float16)
    out = tmp_path / "bench.json"
    args = ["--data", str(tmp_path / "acts"), "--batch", "256", "--reader_batches", "8",
            "--latency_ms", "20", "--repeats", "0", "--out", str(out)]  # fmt: skip
    assert bench_store.main(args) == 0
    report = json.loads(out.read_text())
    assert [r["place"] for r in report["reader"]] == ["local disk", "gs:// (emulator)",
                                                      "gs:// + 20 ms"]  # fmt: skip
    assert all(r["batches"] == 8 and r["tokens_per_sec"] > 0 for r in report["reader"])
    assert "gs:// + 20 ms" in capsys.readouterr().out
