"""launch.bench_many (stacked vs apart steps) and launch.experiments.many_vs_separate's table."""

import json

from launch import bench_many
from launch.experiments import many_vs_separate


def test_the_stacked_step_gives_each_sae_its_own_step(tmp_path):
    out = tmp_path / "bench.json"
    args = ["--saes", "2", "--d", "32", "--num_latents", "256", "--experts", "4", "--k", "8",
            "--batch", "256", "--rounds", "1", "--repeats", "1", "--out", str(out)]  # fmt: skip
    assert bench_many.main(args) == 0
    result = json.loads(out.read_text())
    # Adam's first step is +-LR wherever a gradient is not ~0, so summation-order noise in a
    # near-zero gradient moves an entry by up to 2 LR: relative to the largest entry, < 1e-2.
    assert result["max_relative_difference"] < 1e-2
    assert all(t > 0 for t in result["median_seconds_per_round"].values())
    assert result["stacked_speedup"] > 0


def test_the_table_gives_the_ratio_and_the_parts(tmp_path):
    saes = [{"name": n, "seconds": 20.0, "train_seconds": 15.0, "fvu_many": 0.1,
             "fvu_alone": 0.1, "bitwise": n == "a"} for n in ("a", "b")]  # fmt: skip
    rep = {"many_seconds": 34.0, "many_train_seconds": 30.0, "separate_seconds": 40.0,
           "ratio": 0.85, "saes": saes}  # fmt: skip
    table = many_vs_separate.markdown([rep])
    assert "| 0 | a alone | 20.0 | 15.0 | 5.0 | 0.100000 | bitwise |" in table
    assert "| 0 | b alone | 20.0 | 15.0 | 5.0 | 0.100000 | differs |" in table
    assert "| 0 | separate, total | 40.0 | 30.0 | 10.0 | | |" in table
    assert "| 0 | **train_many** | 34.0 | 30.0 | 4.0 | | |" in table
    assert "**0.85x**" in table
