"""Benchmark activations read from an object store against the same shards on local disk.

    python -m launch.bench_store --data DIR [--eval_data DIR] [--latency_ms 50]
        [--gin_file smollm2.gin] [--steps 60] [--repeats 2] [--out bench_store.json]

DIR is uploaded to a bucket on a GCS API server started here (fake-gcs-server, from the
`dev` extra) on this machine. Then, side by side in one run:
- reader: tokens/s that ActivationData delivers (the training stream, one process) from local
  disk, from gs:// on the server, and from gs:// behind a LatencyProxy that holds every
  request `--latency_ms`: a bucket far away;
- training: `launch.train` of the gin file for `--steps` steps with TRAIN_DATA on local disk
  and on gs:// behind the proxy, each `--repeats` times in turn; tokens/s of training time
  between the first and the last logged step (the first step's compilation and the
  evaluations are not in it). The workdir and EVAL_DATA stay local in both.
The server and the proxy share this machine's cores with the run: on a 2-core CPU they take
time from the step, which a real store does not.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from launch.gcs_emulator import gcs_emulator
from launch.latency_proxy import LatencyProxy

BUCKET = "bench-store"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m launch.bench_store", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--data", required=True, help="a local shard directory")
    p.add_argument("--eval_data", default=None, help="EVAL_DATA of the training runs (local)")
    p.add_argument("--latency_ms", type=float, default=50.0, help="held per request")
    p.add_argument("--batch", type=int, default=4096, help="tokens per reader batch")
    p.add_argument("--reader_batches", type=int, default=100)
    p.add_argument("--gin_file", default="smollm2.gin")
    p.add_argument("--steps", type=int, default=60, help="training steps per run")
    p.add_argument(
        "--repeats", type=int, default=2, help="training runs per place, in turn (0: none)"
    )
    p.add_argument("--out", default="bench_store.json")
    p.add_argument("--reader_only", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.reader_only:  # a child process: STORAGE_EMULATOR_HOST says where the store is
        print(json.dumps(measure_reader(args.data, args.batch, args.reader_batches)))
        return 0
    with gcs_emulator() as server, LatencyProxy(server, args.latency_ms / 1000) as proxy:
        remote = upload(args.data)
        report = {"data": args.data, "latency_ms": args.latency_ms, "batch": args.batch,
                  "reader": reader_rows(args, remote, server, proxy.url),
                  "training": training_rows(args, remote, proxy.url)}  # fmt: skip
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print_report(report)
    return 0


def upload(directory: str) -> str:
    """Make the bucket and copy the shard directory into it; returns its gs:// URL."""
    from sae_jax import storage

    storage.make_bucket(f"gs://{BUCKET}")
    url = f"gs://{BUCKET}/{Path(directory).name}"
    storage.upload_tree(directory, url)
    return url


def child_env(store: str | None) -> dict:
    env = dict(os.environ)
    for name in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL"):
        env.pop(name, None)
    if store:
        env["STORAGE_EMULATOR_HOST"] = store
    return env


def reader_rows(args, remote: str, server: str, proxy: str) -> list[dict]:
    """The reader's tokens/s from local disk, the store, and the store behind the proxy, each
    in a fresh process."""
    places = [("local disk", args.data, None), ("gs:// (emulator)", remote, server),
              (f"gs:// + {args.latency_ms:g} ms", remote, proxy)]  # fmt: skip
    rows = []
    for name, data, store in places:
        cmd = [
            sys.executable,
            "-m",
            "launch.bench_store",
            "--reader_only",
            "--data",
            data,
            "--batch",
            str(args.batch),
            "--reader_batches",
            str(args.reader_batches),
        ]
        out = subprocess.run(cmd, env=child_env(store), capture_output=True, text=True, check=True)
        rows.append({"place": name, **json.loads(out.stdout.strip().splitlines()[-1])})
    return rows


def measure_reader(data: str, batch: int, batches: int) -> dict:
    """Tokens/s of ActivationData's training stream after its first batch."""
    from itertools import islice

    from sae_jax.data import ActivationData

    begin = time.perf_counter()
    source = ActivationData(data, process=(0, 1))
    opened = time.perf_counter() - begin
    stream = source.batches("train", slice(0, batch), batch)
    next(stream)
    start = time.perf_counter()
    n = sum(1 for _ in islice(stream, batches))
    seconds = time.perf_counter() - start
    stream.close()
    return {"open_seconds": round(opened, 2), "batches": n,
            "tokens_per_sec": round(n * batch / seconds)}  # fmt: skip


def training_rows(args, remote: str, proxy: str) -> list[dict]:
    """Training tokens/s with TRAIN_DATA local and on the store behind the proxy, in turn."""
    rows = []
    for repeat in range(args.repeats):
        for name, data, store in (("local disk", args.data, None),
                                  (f"gs:// + {args.latency_ms:g} ms", remote, proxy)):  # fmt: skip
            rate = train_rate(args, data, store)
            rows.append({"place": name, "repeat": repeat, "tokens_per_sec": round(rate)})
    return rows


def train_rate(args, data: str, store: str | None) -> float:
    """Tokens per training second between the first and the last logged step of one run."""
    with tempfile.TemporaryDirectory(prefix="bench_store-") as workdir:
        cmd = [
            sys.executable,
            "-m",
            "launch.train",
            f"--gin_file={args.gin_file}",
            f"--workdir={workdir}",
            "--no_progress",
            f"--gin.TRAIN_DATA='{data}'",
            f"--gin.EVAL_DATA='{args.eval_data or args.data}'",
            f"--gin.STEPS={args.steps}",
        ]
        subprocess.run(cmd, env=child_env(store), capture_output=True, text=True, check=True)
        rows = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").open()]
    rows = [r for r in rows if "loss" in r and "train_seconds" in r]
    first, last = rows[0], rows[-1]
    return (last["tokens"] - first["tokens"]) / (last["train_seconds"] - first["train_seconds"])


def print_report(report: dict) -> None:
    local = report["reader"][0]["tokens_per_sec"]
    print(f"reader, batch {report['batch']} (tokens/s, vs local disk; open seconds):")
    for r in report["reader"]:
        print(f"  {r['place']:<22} {r['tokens_per_sec']:>10,}  {r['tokens_per_sec'] / local:.2f}x"
              f"  {r['open_seconds']} s")  # fmt: skip
    if not report["training"]:
        return
    print("training (tokens/s):")
    places = dict.fromkeys(r["place"] for r in report["training"])
    means = {p: sum(r["tokens_per_sec"] for r in report["training"] if r["place"] == p)
             / sum(1 for r in report["training"] if r["place"] == p) for p in places}  # fmt: skip
    base = next(iter(means.values()))
    for p, m in means.items():
        runs = [r["tokens_per_sec"] for r in report["training"] if r["place"] == p]
        print(f"  {p:<22} {m:>10,.0f}  {m / base:.2f}x  (runs: {runs})")


if __name__ == "__main__":
    sys.exit(main())
