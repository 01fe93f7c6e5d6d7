"""launch.experiments.compare end to end on tiny shards (at one seed and at two), and what it
is built from: the duplicate-feature counter, the FLOPs estimate with e experts per token and
a shared dictionary, the training clock, and the aggregation over seeds."""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from data_utils import write_dataset

from launch.experiments import compare
from sae_jax.config import SAEConfig, TrainConfig
from sae_jax.evaluation.duplicates import count_duplicates, duplicate_flags
from sae_jax.plan.estimate import Shapes, flops_per_token, training_flops_per_token
from sae_jax.training.loop import TrainClock, logged_seconds

PNG = b"\x89PNG\r\n\x1a\n"


def brute_force(w_dec: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    n, lat, d = w_dec.shape
    flat = w_dec.reshape(n * lat, d).astype(np.float64)
    unit = flat / np.linalg.norm(flat, axis=1, keepdims=True)
    sims = unit @ unit.T
    owner = np.repeat(np.arange(n), lat)
    same = owner[:, None] == owner[None, :]
    close = (sims > threshold) & ~np.eye(n * lat, dtype=bool)
    return (close & ~same).any(1), (close & same).any(1)


def test_duplicates_match_brute_force_with_planted_pairs():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, 5, 8)).astype(np.float32)  # 15 latents in 3 experts
    w[2, 3] = 2.0 * w[0, 1] + 0.01 * rng.normal(size=8)  # across experts (scale ignored)
    w[1, 4] = w[1, 0] + 0.01 * rng.normal(size=8)  # within one expert
    w[0, 2] = -w[2, 0]  # opposite: not a duplicate
    cross, within = duplicate_flags(w, 0.9, block=4)  # 4 blocks, the last one padded
    ref_cross, ref_within = brute_force(w, 0.9)
    np.testing.assert_array_equal(cross, ref_cross)
    np.testing.assert_array_equal(within, ref_within)
    assert cross[[1, 13]].all() and within[[5, 9]].all()
    found = count_duplicates(w, 0.9, block=4)
    assert found["cross_expert"] == ref_cross.sum() >= 2 and found["latents"] == 15
    assert found["within_expert"] == ref_within.sum() >= 2
    assert found["cross_expert_fraction"] == pytest.approx(ref_cross.sum() / 15)
    assert count_duplicates(w[:1])["cross_expert"] == 0  # one expert: nothing across


def test_flops_count_experts_per_token_and_shared_latents():
    base = dict(d=64, num_latents=4096, num_experts=8, k=32, k_aux=0, batch=1024, data=1,
                expert=1, capacity_factor=1.25, kernel="dense")  # fmt: skip
    one = flops_per_token(Shapes(**base), auxk=False)
    two = flops_per_token(Shapes(**base, experts_per_token=2), auxk=False)
    assert two["encoder"] == pytest.approx(2 * one["encoder"])  # e experts' encoders
    assert two["decoder"] == pytest.approx(2 * one["decoder"])  # dense codes of each
    shared = flops_per_token(Shapes(**base, shared_latents=512, shared_k=8), auxk=False)
    assert shared["shared"] == pytest.approx(10 * 512 * 64)  # dense, every token, no padding
    assert shared["update"] > one["update"]
    # N = 1 has no capacity padding (its one buffer holds every token)
    topk = Shapes(**{**base, "num_experts": 1, "num_latents": 512})
    assert topk.slots == topk.local_tokens
    cfg = SAEConfig(d=64, num_latents=512, num_experts=1, k=32)
    assert training_flops_per_token(cfg, TrainConfig(batch_size=1024)) > 10 * 512 * 64


def test_training_clock_pauses_and_resumes(tmp_path):
    clock = TrainClock(offset=5.0)
    with clock.paused():
        time.sleep(0.05)
    assert 5.0 <= clock.seconds() < 5.04
    clock.stop()
    assert clock.seconds() == clock.seconds()  # stopped: no longer moves
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 10, "train_seconds": 1.5}, {"step": 20, "train_seconds": 3.0},
            {"step": 30, "train_seconds": 4.5}]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert logged_seconds(path, 20) == 3.0 and logged_seconds(path, 0) == 0.0


@pytest.fixture(scope="module")
def compared(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("compare")
    write_dataset(root / "train", [600, 424], d=16, ids=False)
    write_dataset(root / "eval", [512], d=16, seed=1, ids=False)
    argv = ["--train", str(root / "train"), "--eval", str(root / "eval"), "--width", "32",
            "--passes", "0.5", "--eval_points", "4", "--rows", "topk,switch2_flops",
            "--gin", "BATCH_SIZE=64", "--gin", "K=4", "--gin", "LOG_EVERY=2",
            "--gin", "TrainConfig.eval_tokens=256", "--eval_tokens", "256",
            "--bench_steps", "1", "--workdir", str(root / "runs"),
            "--out", str(root / "out" / "results.md"), "--doc", str(root / "docs" / "c.md"),
            "--in_process"]  # fmt: skip
    assert compare.main(argv) == 0
    return root


def test_compare_writes_table_json_and_curves(compared):
    out = compared / "out"
    results = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in results] == ["topk", "switch2_flops"]
    for r in results:
        assert r["steps"] == 8  # ceil(0.5 x 1024 tokens / 64)
        assert [p["step"] for p in r["curve"]] == [2, 4, 6, 8]  # EVAL_EVERY = 2, and the end
        assert all(p["train_seconds"] > 0 and p["flops"] > 0 for p in r["curve"])
        assert r["train_flops"] == pytest.approx(8 * 64 * r["flops_per_token"])
        assert r["duplicates"]["latents"] == r["num_latents"]
        assert r["step_tokens_per_sec"] > 0 and r["tokens_per_sec"] > 0
    assert results[0]["fvu_dropless_vs_topk"] == 1.0
    assert results[0]["fvu_dropless_vs_best_topk"] == 1.0  # the only N = 1 row
    assert results[1]["flops_per_token"] > results[0]["flops_per_token"]
    table = (out / "results.md").read_text()
    for header in ("FVU", "FVU vs TopK", "vs best TopK", "L0", "dead", "duplicates (other expert)",
                   "loss recovered", "train tokens/s", "step tokens/s", "training FLOPs",
                   "training s"):  # fmt: skip
        assert f"| {header} |" in table
    assert "| topk | 1 | 1 | 32 |" in table and "| switch2_flops | 2 | 1 | 64 |" in table
    for name in (compare.TIME_PNG, compare.FLOPS_PNG):
        for where, named in ((out, name), (compared / "docs", name.replace("comparison", "c"))):
            data = (where / named).read_bytes()
            assert data.startswith(PNG) and len(data) > 5000
    doc = (compared / "docs" / "c.md").read_text()
    time_png = compare.page_png(compared / "docs" / "c.md", compare.TIME_PNG)
    assert time_png == "c_fvu_time.png"
    assert "| switch2_flops |" in doc and f"]({time_png})" in doc
    assert "--rows topk,switch2_flops" in doc and "$" not in doc
    assert "Each row is trained at" not in doc and "beats TopK" not in table


def test_row_choice_and_bindings():
    assert [r.name for r in compare.chosen_rows(compare.DEFAULT_ROWS)] == [
        "topk", "topk_lr", "switch8", "switch8_top1", "switch4_flops", "wide"]  # fmt: skip
    with pytest.raises(SystemExit):
        compare.chosen_rows("topk,nope")
    args = compare.parse_args(["--train", "t", "--eval", "e", "--gin", "K=8"])
    row = next(r for r in compare.RUNS if r.name == "switch4_flops")
    argv = compare.train_argv(args, row, 100, Path("w"))
    assert argv[-3:] == [f"--gin.{b}" for b in compare.TOP1]  # the row's own come last
    assert "--gin.NUM_LATENTS=18432" in argv and "--gin.EVAL_EVERY=12" in argv
    wide = compare.train_argv(args, next(r for r in compare.RUNS if r.name == "wide"), 100,
                              Path("w"))  # fmt: skip
    assert wide[0] == "--gin_file=smollm2_wide.gin"
    assert not any(a.startswith("--gin.NUM_EXPERTS") for a in wide)  # the file's own N


def test_ratios_are_to_topk_and_to_the_best_topk():
    rows = [
        {"name": "topk", "num_experts": 1, "fvu_dropless": 0.2, "tokens_per_sec": 100.0},
        {"name": "topk_lr", "num_experts": 1, "fvu_dropless": 0.16, "tokens_per_sec": 100.0},
        {"name": "wide", "num_experts": 4, "fvu_dropless": 0.15, "tokens_per_sec": 120.0},
    ]
    compare.add_ratios(rows)
    assert [r["fvu_dropless_vs_topk"] for r in rows] == pytest.approx([1.0, 0.8, 0.75])
    assert [r["fvu_dropless_vs_best_topk"] for r in rows] == pytest.approx([1.25, 1.0, 0.9375])
    assert rows[2]["tokens_per_sec_vs_topk"] == pytest.approx(1.2)
    assert math.isnan(rows[2]["step_tokens_per_sec_vs_topk"])


def test_seed_aggregates_by_hand():
    assert compare.sample_std([0.2, 0.21, 0.19]) == pytest.approx(0.01)  # sqrt(2e-4 / 2)
    assert math.isnan(compare.sample_std([0.2]))
    assert compare.paired_wins({0: 0.2, 1: 0.21, 2: 0.19}, {0: 0.21, 1: 0.2, 2: 0.2}) == (2, 3)
    assert compare.paired_wins({0: 0.2, 1: 0.1}, {1: 0.2, 5: 0.3}) == (1, 1)  # shared seeds
    first = [{"step": 2, "fvu": 0.5, "train_seconds": 1.0},
             {"step": 4, "fvu": 0.3, "train_seconds": 2.0}]  # fmt: skip
    curves = [first, [{"step": 2, "fvu": 0.4, "train_seconds": 3.0}]]  # step 4: one curve only
    assert compare.mean_curve(curves) == [
        {"step": 2, "fvu": pytest.approx(0.45), "train_seconds": 2.0}]  # fmt: skip
    shape = {"name": "switch", "num_experts": 8, "experts_per_token": 1, "num_latents": 64,
             "kind": "k"}  # fmt: skip
    records = [shape | {"seed": s, "fvu_dropless": f, "l0": l0, "tokens_per_sec": t,
                        "duplicates": {"cross_expert": c, "cross_expert_fraction": c / 64},
                        "expert_load": [s, 1], "curve": [{"step": 2, "fvu": f}]}
               for s, f, l0, t, c in [(0, 0.2, 30, 100.0, 3), (1, 0.21, 32, 300.0, 4),
                                      (2, 0.19, 34, 120.0, 5)]]  # fmt: skip
    row = compare.aggregate(records)
    assert row["fvu_dropless"] == pytest.approx(0.2) and row["l0"] == pytest.approx(32)
    assert row["fvu_dropless_std"] == pytest.approx(0.01)
    assert (row["fvu_dropless_min"], row["fvu_dropless_max"]) == (0.19, 0.21)
    assert row["tokens_per_sec"] == 120.0  # the median
    assert row["num_experts"] == 8 and row["name"] == "switch"  # shared: kept as they are
    assert row["duplicates"] == {"cross_expert": 4.0, "cross_expert_fraction": 4 / 64}
    assert "expert_load" not in row and "seed" not in row  # differing non-numbers left out
    assert row["seeds"] == [0, 1, 2] and row["runs"] == records
    assert row["curve"] == [{"step": 2, "fvu": pytest.approx(0.2)}]
    base = compare.aggregate([r | {"name": "topk", "num_experts": 1,
                                   "fvu_dropless": 0.205} for r in records])  # fmt: skip
    results = [base, row]
    compare.add_ratios(results)
    compare.add_paired_wins(results)
    assert base["beats_topk"] is None and row["beats_topk"] == [2, 3]  # 0.2 and 0.19 < 0.205
    assert row["fvu_dropless_vs_topk"] == pytest.approx(0.2 / 0.205)  # the ratio of means
    table = compare.markdown(results, seeds=True)
    assert "| FVU (mean ± sd) | FVU min–max | FVU vs TopK | vs best TopK | beats TopK |" in table
    assert "| 0.2000 ± 0.0100 | 0.1900–0.2100 | 0.98x | 0.976x | 2/3 | 32.0 |" in table
    assert "| 0.2050 ± 0.0000 | 0.2050–0.2050 | 1.00x | 1.000x | - |" in table
    assert "| 32.0 | - | 4.0 (6.2%) | - | - | 120 | 1.00x |" in table  # dead, same expert: -


def test_seeds_flag_and_bindings():
    assert compare.parse_seeds("0,1,2") == [0, 1, 2]
    for bad in ("0,0", "", "a,1"):
        with pytest.raises(argparse.ArgumentTypeError):
            compare.parse_seeds(bad)
    args = compare.parse_args(["--train", "t", "--eval", "e", "--gin", "SEED=9"])
    assert args.seeds is None and not compare.multi_seed(args)
    topk = compare.RUNS[0]
    assert compare.row_dirs(args, topk) == [Path("runs/compare/topk")]
    assert not any("SEED" in a for a in compare.train_argv(args, topk, 10, Path("w"))[:-1])
    assert compare.train_argv(args, topk, 10, Path("w"), 3)[-1] == "--gin.SEED=3"  # wins
    one = compare.parse_args(["--train", "t", "--eval", "e", "--seeds", "4"])
    assert compare.row_dirs(one, topk) == [Path("runs/compare/topk")]  # today's directory
    three = compare.parse_args(["--train", "t", "--eval", "e", "--seeds", "0,1,2"])
    assert compare.row_dirs(three, topk) == [Path(f"runs/compare/topk/seed{s}") for s in (0, 1, 2)]
    assert compare.seeds_text(one) == "" and "SEED = 0, 1, 2" in compare.seeds_text(three)


def test_compare_with_two_seeds_reuses_seed_0(compared):
    """The one-seed fixture's runs (SEED = 0) copied in as seed 0, and their step benchmarks
    as the rows' (WORKDIR/ROW/step_speed.json): only seed 1 trains."""
    runs = compared / "seeds"
    one = json.loads((compared / "out" / "results.json").read_text())
    for r in one:
        shutil.copytree(compared / "runs" / r["name"], runs / r["name"] / "seed0")
        shutil.copy(compared / "runs" / r["name"] / "step_speed.json", runs / r["name"])
    argv = ["--train", str(compared / "train"), "--eval", str(compared / "eval"),
            "--width", "32", "--passes", "0.5", "--eval_points", "4",
            "--rows", "topk,switch2_flops", "--gin", "BATCH_SIZE=64", "--gin", "K=4",
            "--gin", "LOG_EVERY=2", "--gin", "TrainConfig.eval_tokens=256", "--eval_tokens",
            "256", "--bench_steps", "1", "--workdir", str(runs), "--seeds", "0,1",
            "--out", str(compared / "out2" / "results.md"),
            "--doc", str(compared / "docs2" / "c.md"), "--in_process"]  # fmt: skip
    assert compare.main(argv) == 0
    results = json.loads((compared / "out2" / "results.json").read_text())
    for r, single in zip(results, one, strict=True):
        assert r["name"] == single["name"] and r["seeds"] == [0, 1]
        assert [s["seed"] for s in r["runs"]] == [0, 1]
        assert r["runs"][0]["fvu_dropless"] == single["fvu_dropless"]  # reused, not retrained
        assert r["runs"][1]["fvu_dropless"] != single["fvu_dropless"]
        assert compare.run_configs(runs / r["name"] / "seed1")[1].seed == 1
        fvus = [s["fvu_dropless"] for s in r["runs"]]
        assert r["fvu_dropless"] == pytest.approx(sum(fvus) / 2)
        assert r["fvu_dropless_std"] == pytest.approx(abs(fvus[0] - fvus[1]) / math.sqrt(2))
        assert [p["step"] for p in r["curve"]] == [2, 4, 6, 8]
        assert r["step_tokens_per_sec"] == single["step_tokens_per_sec"]  # one per row
    wins = sum(s["fvu_dropless"] < t["fvu_dropless"]
               for s, t in zip(results[1]["runs"], results[0]["runs"], strict=True))  # fmt: skip
    assert results[0]["beats_topk"] is None and results[1]["beats_topk"] == [wins, 2]
    table = (compared / "out2" / "results.md").read_text()
    assert "| FVU (mean ± sd) |" in table and f"| {wins}/2 |" in table
    assert "Each row is trained at 2 seeds (SEED = 0, 1" in table
    doc = (compared / "docs2" / "c.md").read_text()
    assert "Each row is trained at 2 seeds" in doc and "| beats TopK |" in doc
    assert "--seeds 0,1" in doc and "$" not in doc
    assert (compared / "docs2" / "c_fvu_time.png").read_bytes().startswith(PNG)
