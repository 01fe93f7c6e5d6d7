"""Benchmark the training step: tokens/s, step time, FLOP/s and peak memory per device.

    python -m launch.bench [--devices 8] [--out bench.json] [--steps 5] [--dtypes float32,bfloat16]
                           [--dispatch capacity,dropless] [--auxk] [--peer sparsify]

Runs on whatever backend is present. Rows: N = 1 (dense TopK) and N = 4, 16, 64 at the same
NUM_LATENTS, once per DISPATCH in --dispatch; dense rows at NUM_LATENTS / N for FLOP-matched
pairs; and, with several devices, the N = 16 step on a 1 x devices mesh against one device
on the same global batch (capacity dispatch). Each row is timed once per COMPUTE_DTYPE in
--dtypes. `pad` is the rows the experts computed per token (N * C / T with capacity
buffers, padded blocks / T dropless). `--peer sparsify` adds EleutherAI sparsify's TopK step
on the same d, NUM_LATENTS, k and batch (launch/peer.py; the `sparsify` extra). `--auxk`
adds each N's step with AuxK at every dead-latent bucket (kernels.auxk.dead_buckets).
Ratios are meaningful within one run; absolute times only on an accelerator.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from launch import peer
from launch.cli import simulate_cpu_devices


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m launch.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--d", type=int, default=384)
    p.add_argument("--num_latents", type=int, default=16384)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--experts", default="1,4,16,64", help="N values at fixed NUM_LATENTS")
    p.add_argument("--matched", default="4,16", help="dense baselines at NUM_LATENTS / N")
    p.add_argument("--capacity_factor", type=float, default=1.25)
    p.add_argument("--steps", type=int, default=5, help="timed steps per row")
    p.add_argument("--devices", type=int, default=0, help="simulate this many CPU devices")
    p.add_argument("--mesh_expert", type=int, default=16, help="N for the multi-device rows")
    p.add_argument("--data", default=None, help="also time the shard reader on this directory")
    p.add_argument("--reader_batches", type=int, default=40, help="batches the reader times")
    p.add_argument("--dtypes", default="float32", help="COMPUTE_DTYPEs to time each row in")
    p.add_argument("--dispatch", default="capacity", help="DISPATCHes of the --experts rows")
    p.add_argument("--auxk", action="store_true", help="also time the AuxK step per dead bucket")
    p.add_argument("--peer", default="", choices=("", *peer.PEERS), help="also time this peer")
    p.add_argument("--peer_threads", type=int, default=2, help="CPU threads of the peer")
    p.add_argument("--out", default="bench.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.devices:
        simulate_cpu_devices(args.devices)
    import jax

    rows = []
    dtypes = [v for v in args.dtypes.split(",") if v]
    dispatches = [v for v in args.dispatch.split(",") if v]
    for n in [int(v) for v in args.experts.split(",") if v]:
        for dtype in dtypes:
            rows += [measure(args, n, args.num_latents, (1, 1), dtype, d) for d in dispatches]
    for n in [int(v) for v in args.matched.split(",") if v]:
        for dtype in dtypes:
            row = measure(args, 1, args.num_latents // n, (1, 1), dtype)
            row["matches"] = f"N={n}, M={args.num_latents}"
            rows.append(row)
    if len(jax.devices()) > 1:
        devices = len(jax.devices())
        for shape in ((1, 1), (1, devices)):
            rows += [measure(args, args.mesh_expert, args.num_latents, shape, d) for d in dtypes]
    if args.auxk:
        from sae_jax.kernels.auxk import dead_buckets

        for n in [int(v) for v in args.experts.split(",") if v]:
            for b in dead_buckets(args.num_latents // n):
                row = measure(args, n, args.num_latents, (1, 1), dtypes[0], aux_bucket=b)
                row["note"] = f"AuxK on {b} dead ids per expert"
                rows.append(row)
    if args.peer:
        rows += peer_rows(args)
    report = {"backend": jax.default_backend(), "device": str(jax.devices()[0]), "rows": rows}
    print_table(report)
    if args.data:
        report["reader"] = measure_reader(args)
        reader = report["reader"]["tokens_per_sec"]
        step = max((r["tokens_per_sec"] for r in rows), default=None)
        than = f" ({reader / step:.1f}x the fastest step above)" if step else ""
        print(f"reader: {reader:.0f} tokens/s from {args.data}{than}")
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {args.out}")
    return 0


def measure(
    args, num_experts: int, num_latents: int, mesh_shape, dtype: str = "float32",
    dispatch: str = "capacity", aux_bucket: int = 0,
) -> dict:  # fmt: skip
    from sae_jax.config import SAEConfig

    cfg = SAEConfig(d=args.d, num_latents=num_latents, num_experts=num_experts, k=args.k,
                    capacity_factor=args.capacity_factor,
                    compute_dtype=dtype, dispatch=dispatch).validate()  # fmt: skip
    seconds, compiled, metrics = time_step(cfg, args.batch, args.steps, mesh_shape, aux_bucket)
    devices = mesh_shape[0] * mesh_shape[1]
    flops = _flops(compiled)
    flops = flops * devices if flops else None  # XLA counts the per-device program
    return {
        "num_experts": num_experts,
        "num_latents": num_latents,
        "mesh": f"{mesh_shape[0]}x{mesh_shape[1]}",
        "dtype": dtype,
        "dispatch": dispatch,
        "padding_overhead": float(metrics["padding_overhead"]),
        "step_ms": 1e3 * seconds,
        "tokens_per_sec": args.batch / seconds,
        "gflop_per_step": flops / 1e9 if flops else None,
        "gflops_per_sec": flops / seconds / 1e9 if flops else None,
        "peak_mib_per_device": _peak_bytes(compiled) / 2**20,
        "tokens_by_latents_mib": args.batch * num_latents * 4 / devices / 2**20,
    }


def time_step(cfg, batch: int, steps: int, mesh_shape=(1, 1), aux_bucket: int = 0) -> tuple:
    """(seconds per step, the compiled step, the last step's metrics) of the training step of
    the SAE `cfg` (d set) on `batch` random tokens, after one untimed step; aux_bucket 0: the
    step without AuxK."""
    import jax
    import numpy as np
    from flax import nnx

    from sae_jax.config import TrainConfig
    from sae_jax.distributed import put_batch
    from sae_jax.mesh import make_mesh, token_sharding
    from sae_jax.model.switch import SwitchSAE
    from sae_jax.training.step import setup_training

    tcfg = TrainConfig(steps=1000, batch_size=batch)
    mesh = make_mesh(mesh_shape)
    with jax.set_mesh(mesh):
        model = nnx.jit(lambda: SwitchSAE(cfg, rngs=nnx.Rngs(0)))()
        _, state, step = setup_training(model, tcfg)
        rng = np.random.default_rng(0)
        x = put_batch(rng.normal(size=(batch, cfg.d)).astype(np.float32), token_sharding(mesh))
        fn = step.for_bucket(aux_bucket)  # 0: the step without AuxK
        compiled = fn.lower(state, x).compile()
        state, metrics = fn(state, x)
        jax.block_until_ready(metrics)
        start = time.perf_counter()
        for _ in range(steps):
            state, metrics = fn(state, x)
        jax.block_until_ready(metrics)
        seconds = (time.perf_counter() - start) / steps
    return seconds, compiled, metrics


def peer_rows(args) -> list[dict]:
    """The peer's row, or none (and one line saying why) when it is not installed."""
    try:
        shapes = dict(d=args.d, num_latents=args.num_latents, k=args.k, batch=args.batch)
        return [peer.measure(args.peer, **shapes, steps=args.steps, threads=args.peer_threads)]
    except peer.PeerMissing as e:
        print(f"skipped: {e}")
        return []


def measure_reader(args) -> dict:
    """Tokens/s that ActivationData delivers (shuffle windows, outlier filter, scaling, and
    the prefetch thread) with nothing else running, after its first batch."""
    from itertools import islice

    from sae_jax.data import ActivationData

    source = ActivationData(args.data)
    batches = source.batches("train", slice(0, args.batch), args.batch)
    next(batches)
    start = time.perf_counter()
    n = sum(1 for _ in islice(batches, args.reader_batches))
    seconds = time.perf_counter() - start
    batches.close()
    return {"directory": args.data, "d": source.d, "dtype": source.dtype, "batches": n,
            "tokens_per_sec": n * args.batch / seconds}  # fmt: skip


def _flops(compiled) -> float | None:
    """XLA's own count of the compiled (per-device) step; None where the backend has none."""
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        return float(cost.get("flops", 0.0)) or None
    except Exception:  # noqa: BLE001 - not every backend reports costs
        return None


def _peak_bytes(compiled) -> float:
    """Arguments + outputs + temporaries - aliased (donated) buffers, per device."""
    m = compiled.memory_analysis()
    return float(
        m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )  # fmt: skip


def print_table(report: dict) -> None:
    rows = report["rows"]
    print(f"backend: {report['backend']} ({report['device']})")
    header = (f"{'N':>4} {'M':>6} {'mesh':>5} {'dtype':>8} {'dispatch':>8} {'pad':>5} "
              f"{'step ms':>9} {'tok/s':>9} "
              f"{'vs N=1':>7} {'GFLOP/s':>8} {'peak MiB':>9} {'[T,M] MiB':>9}  note")  # fmt: skip
    print(header)
    for r in rows:
        base = _base_row(rows, r["dtype"])
        gf = f"{r['gflops_per_sec']:.1f}" if r["gflops_per_sec"] else "-"
        peak = f"{r['peak_mib_per_device']:.1f}" if r["peak_mib_per_device"] else "-"
        note = f"FLOP-matched to {r['matches']}" if "matches" in r else r.get("peer", "")
        note = r.get("note", note)
        print(f"{r['num_experts']:>4} {r['num_latents']:>6} {r['mesh']:>5} {r['dtype']:>8} "
              f"{r['dispatch']:>8} {r['padding_overhead']:>5.2f} {r['step_ms']:>9.1f} "
              f"{r['tokens_per_sec']:>9.0f} "
              f"{r['tokens_per_sec'] / base['tokens_per_sec']:>7.2f} "
              f"{gf:>8} {peak:>9} {r['tokens_by_latents_mib']:>9.1f}  "
              f"{note}")  # fmt: skip


def _base_row(rows: list[dict], dtype: str) -> dict:
    """The dense N = 1 row on one device in the same dtype, capacity dispatch where there is
    one ("vs N=1" divides by it)."""
    same = sorted(
        (r for r in rows if r["dtype"] == dtype), key=lambda r: r["dispatch"] != "capacity"
    )
    return next((r for r in same if r["num_experts"] == 1 and r["mesh"] == "1x1"), same[0])


if __name__ == "__main__":
    sys.exit(main())
