"""The store benchmark's latency proxy: bytes forwarded exactly, each request held, and
concurrent requests held concurrently (a latency, not a bandwidth cap)."""

import time

import numpy as np

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
