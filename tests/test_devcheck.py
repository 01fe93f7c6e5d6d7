"""`python -m launch.devcheck` on CPU: the checks CPU can run pass, the rest say why not."""

import json
import subprocess
import sys

from launch import devcheck, device_checks


def test_devcheck_on_cpu(tmp_path):
    out = tmp_path / "devcheck.json"
    run = subprocess.run([sys.executable, "-m", "launch.devcheck", "--json", str(out)],
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(out.read_text())
    assert report["backend"] == "cpu"
    status = {c["name"]: c["status"] for c in report["checks"]}
    assert len(status) >= 4 and list(status.values()).count("pass") >= 3, status
    assert "fail" not in status.values()
    assert status["ragged_all_to_all"] == "skip"  # XLA:CPU has no ragged_all_to_all
    assert all(c["reason"] for c in report["checks"] if c["status"] == "skip")
    ragged = next(c for c in report["checks"] if c["name"] == "ragged_dot_vs_blocks")
    assert ragged["grad_rel_err"] < 3e-2 and ragged["blocks_step_ms"] > 0


def test_a_failing_check_is_one_line_and_exit_1(tmp_path, monkeypatch, capsys):
    def broken(sizes):
        raise RuntimeError("device lost\nsecond line")

    monkeypatch.setitem(device_checks.CHECKS, "broken", broken)
    assert devcheck.main(["--json", str(tmp_path / "r.json"), "--checks", "broken"]) == 1
    (check,) = json.loads((tmp_path / "r.json").read_text())["checks"]
    assert check["status"] == "fail" and check["reason"] == "RuntimeError: device lost"
    assert devcheck.main(["--checks", "nope"]) == 2
    assert "unknown check(s) ['nope']" in capsys.readouterr().err
