import importlib.util
import json
import sys

from launch import bench


def test_bench_writes_table_and_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = ["--d=16", "--num_latents=256", "--k=4", "--batch=256", "--steps=1",
            "--experts=1,4", "--matched=4", "--mesh_expert=8", f"--out={out}"]  # fmt: skip
    assert bench.main(args) == 0
    report = json.loads(out.read_text())
    rows = report["rows"]
    # N = 1 and 4 at M = 256, the FLOP-matched dense M = 64, and N = 8 on 1x1 and 1x8 meshes.
    assert [(r["num_experts"], r["num_latents"], r["mesh"]) for r in rows] == [
        (1, 256, "1x1"), (4, 256, "1x1"), (1, 64, "1x1"), (8, 256, "1x1"), (8, 256, "1x8"),
    ]  # fmt: skip
    for r in rows:
        assert r["tokens_per_sec"] > 0 and r["peak_mib_per_device"] > 0
    assert "FLOP-matched to N=4, M=256" in capsys.readouterr().out


def test_bench_rows_carry_their_dtype(capsys):
    args = bench.parse_args(["--d=16", "--k=4", "--batch=64", "--steps=1",
                             "--dtypes=float32,bfloat16"])  # fmt: skip
    assert args.dtypes == "float32,bfloat16" and bench.parse_args([]).dtypes == "float32"
    row = bench.measure(args, 4, 64, (1, 1), "bfloat16")
    assert row["dtype"] == "bfloat16" and row["tokens_per_sec"] > 0
    assert row["dispatch"] == "capacity" and row["padding_overhead"] == 1.25
    dense = {**row, "num_experts": 1, "tokens_per_sec": row["tokens_per_sec"] / 2}
    bench.print_table({"backend": "cpu", "device": "cpu", "rows": [dense, row]})
    assert " bfloat16 " in capsys.readouterr().out.splitlines()[-1]


def test_bench_times_each_dispatch(capsys):
    args = bench.parse_args(["--d=16", "--k=4", "--batch=64", "--steps=1"])
    assert args.dispatch == "capacity"
    row = bench.measure(args, 4, 64, (1, 1), "float32", "dropless")
    assert row["dispatch"] == "dropless" and row["tokens_per_sec"] > 0
    assert 1.0 <= row["padding_overhead"] <= 1.5 and row["peak_mib_per_device"] > 0
    bench.print_table({"backend": "cpu", "device": "cpu", "rows": [row]})
    assert " dropless " in capsys.readouterr().out.splitlines()[-1]


def test_bench_peer_is_timed_or_skipped_in_one_line(capsys, monkeypatch):
    args = bench.parse_args(["--d=16", "--num_latents=64", "--k=4", "--batch=64", "--steps=1",
                             "--peer=sparsify"])  # fmt: skip
    rows = bench.peer_rows(args)
    if importlib.util.find_spec("sparsify"):
        assert rows[0]["dispatch"] == "sparsify" and rows[0]["tokens_per_sec"] > 0
        bench.print_table({"backend": "cpu", "device": "cpu", "rows": rows})
        assert "sparsify (torch" in capsys.readouterr().out
    capsys.readouterr()  # where it is not installed, the first call already said so
    monkeypatch.setitem(sys.modules, "sparsify", None)  # as if not installed
    assert bench.peer_rows(args) == []
    skip = "skipped: --peer sparsify: not installed (sparsify); pip install -e '.[sparsify]'"
    assert capsys.readouterr().out.splitlines() == [skip]


def test_bench_times_the_auxk_step_of_a_bucket():
    args = bench.parse_args(["--d=16", "--k=4", "--batch=64", "--steps=1", "--auxk"])
    row = bench.measure(args, 4, 64, (1, 1), "float32", aux_bucket=16)
    assert args.auxk and row["tokens_per_sec"] > 0 and row["peak_mib_per_device"] > 0


def test_step_profile_attributes_every_part(tmp_path, capsys):
    """launch.step_profile on a small gather-kernel step: the expert parts and AuxK (told by
    its name scope) get time."""
    from launch import step_profile

    out = tmp_path / "profile.json"
    args = ["--configs=1:2048,2:4096", "--d=16", "--k=4", "--batch=256", "--rounds=1",
            "--steps=1", "--bucket=16", f"--out={out}"]  # fmt: skip
    assert step_profile.main(args) == 0
    table = json.loads(out.read_text())
    assert list(table) == ["N=1, M=2048", "N=2, M=4096"]
    for parts in table.values():
        for part in ("expert fwd: encoder matmul", "expert fwd: top-k", "AuxK (fwd+bwd)",
                     "expert bwd (gather-kernel gradients)",
                     "optimizer update loop (Adam, projection, renorm)"):  # fmt: skip
            assert parts[part] > 0, part
        assert parts["XLA temp buffer MiB"] > 0
    assert "route, dispatch, loss" in capsys.readouterr().out
    assert step_profile.part_of("jit(step)/transpose(jvp())/while/body/auxk/dot", "", 8) == (
        "AuxK (fwd+bwd)"
    )
