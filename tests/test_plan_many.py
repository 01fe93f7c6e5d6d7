"""launch.plan on a config that lists SAEs: each SAE's plan, the memory per device of
training them in turn on the whole mesh (launch.train_many) or in groups of devices, and the
fit verdict. In-process on conftest's 8 simulated CPU devices; one list plan per module."""

import dataclasses

import pytest

from launch import plan as plan_cli
from sae_jax.config import ConfigError, SAEConfig, TrainConfig
from sae_jax.plan import hardware, layouts

F32 = 4
TINY = """include 'base.gin'
SYNTH_DIM = 32
NUM_EXPERTS = 8
NUM_LATENTS = 512
K = 8
BATCH_SIZE = 256
MESH_SHAPE = (1, -1)
COMPUTE_DTYPE = 'float32'
SAES = [{'name': 'narrow', 'K': 4}, {'name': 'wide', 'NUM_LATENTS': 1024}]
"""


def args(path, *extra):
    return plan_cli.parse_args([f"--gin_file={path}", "--hardware=cpu", *extra])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("many") / "tiny_many.gin"
    path.write_text(TINY)
    plan, text = plan_cli.plan_config(args(path))
    return path, plan, text


def test_each_sae_has_its_own_plan(tiny):
    _, lp, text = tiny
    assert [e["name"] for e in lp["saes"]] == ["narrow", "wide"]
    for e, (latents, k) in zip(lp["saes"], [(512, 4), (1024, 8)], strict=True):
        c = e["plan"]["config"]
        assert (c["num_latents"], c["k"], c["devices"], c["mesh_shape"]) == (latents, k, 8, [1, 8])
    assert "=== SAE narrow (1 of 2) ===" in text and "in turn" in text and "groups" in text


def test_resident_is_the_state_the_train_step_takes(tiny):
    """Compiled resident bytes = the train step's arguments less its batch [T_local, d]; the
    estimate's = parameters + optimizer state + counters."""
    _, lp, _ = tiny
    for e in lp["saes"]:
        mem = e["plan"]["memory"]
        batch = 256 // 8 * 32 * F32
        assert e["resident"]["compiled"] == mem["compiled"]["arguments"] - batch
        est = mem["estimate"]
        terms = est["parameters"] + est["optimizer_state"] + est["counters"]
        assert e["resident"]["estimate"] == terms
        assert e["resident"]["compiled"] + e["transient"]["compiled"] == mem["needed_bytes"]


def test_in_turn_is_the_resident_sum_plus_the_largest_transient(tiny):
    """Against each SAE's own single plan (what launch.plan prints for it alone)."""
    _, lp, _ = tiny
    for kind, total in (("compiled", "needed_bytes"), ("estimate", None)):
        alone = [e["plan"]["memory"][total] if total else
                 e["plan"]["memory"]["estimate"]["total_bytes"] for e in lp["saes"]]  # fmt: skip
        resident = [e["resident"][kind] for e in lp["saes"]]
        transient = [a - r for a, r in zip(alone, resident, strict=True)]
        t = lp["in_turn"][kind]
        assert t["total_bytes"] == sum(resident) + max(transient)
        assert t["resident_bytes"] == sum(resident) and t["transient_bytes"] == max(transient)
        assert sum(resident) + max(transient) < sum(alone)  # one transient, not every SAE's
    assert lp["in_turn"]["compiled"]["transient_of"] == "wide"


def test_the_estimate_alone_matches_the_list_plan(tiny):
    """layouts.in_turn_estimate (no compile; what a trainer can check before it builds) gives
    the list plan's in-turn estimate; check_in_turn_fits refuses less memory in one line."""
    path, lp, _ = tiny
    from sae_jax.plan import build
    from sae_jax.sae_set import parse_many

    hw = hardware.get("cpu")
    saes = [(build.for_hardware(s.sae_cfg, hw, 32), s.tcfg) for s in parse_many([path], [])]
    need = layouts.in_turn_estimate(saes, (1, 8), "cpu")
    est = lp["in_turn"]["estimate"]
    assert need == {k: est[k] for k in ("resident_bytes", "transient_bytes", "total_bytes")}
    layouts.check_in_turn_fits(saes, (1, 8), need["total_bytes"])
    with pytest.raises(ConfigError, match=r"^2 SAEs in turn on MESH_SHAPE=\(1, 8\) need"):
        layouts.check_in_turn_fits(saes, (1, 8), need["total_bytes"] - 1)


def test_groups_are_the_largest_plan_on_half_the_mesh(tiny):
    _, lp, _ = tiny
    g = lp["groups"]
    assert (g["groups"], g["group_devices"], g["mesh_shape"]) == (2, 4, [1, 4])
    needed = [e["plan"]["memory"]["needed_bytes"] for e in g["saes"]]
    assert [e["plan"]["config"]["devices"] for e in g["saes"]] == [4, 4]
    assert g["compiled"]["total_bytes"] == max(needed)
    assert g["estimate"]["total_bytes"] == max(
        e["plan"]["memory"]["estimate"]["total_bytes"] for e in g["saes"]
    )
    # Half the experts per device: each SAE's state per device doubles.
    for whole, half in zip(lp["saes"], g["saes"], strict=True):
        assert half["resident"]["estimate"] > 1.9 * whole["resident"]["estimate"]


def test_the_verdict_follows_the_memory(tiny):
    """Memory between the two layouts' figures: the smaller fits, the other does not; in turn
    is recommended whenever it fits."""
    _, lp, _ = tiny
    turn, groups = lp["in_turn"]["compiled"]["total_bytes"], lp["groups"]["compiled"]["total_bytes"]
    assert turn != groups

    def on(memory):
        hw = dataclasses.replace(hardware.get("h100"), memory_bytes=memory, usable_fraction=1.0,
                                 reserved_bytes=0.0)  # fmt: skip
        return layouts.judge(lp, hw)

    mid = (turn + groups) / 2
    judged = on(mid)
    assert judged["in_turn"]["fits"] == (turn < groups)
    assert judged["groups"]["fits"] == (groups < turn)
    assert judged["recommended"] == ("in_turn" if turn < groups else "groups")
    assert on(max(turn, groups))["recommended"] == "in_turn"
    judged = on(min(turn, groups) - 1)
    assert judged["recommended"] is None
    assert "neither layout fits" in layouts.summary_lines(judged)[-1]


def test_groups_of_an_expert_axis_that_does_not_split(tiny):
    """MESH_SHAPE=(1, 8) on 8 devices: a group of 4 cannot hold the expert axis of 8. The
    groups layout says so and in turn is still planned."""
    _, lp, _ = tiny
    saes = [(e["name"], None, TrainConfig(batch_size=256, mesh_shape=(1, 8))) for e in lp["saes"]]
    g = layouts.group_layout(saes, lp["saes"], 8, hardware.get("cpu"))
    assert "cannot hold the expert axis of 8" in g["error"]
    judged = layouts.judge({**lp, "groups": g}, hardware.get("cpu"))
    assert judged["groups"]["fits"] is False and judged["recommended"] == "in_turn"
    lines = layouts.summary_lines(judged)
    assert any(line.startswith("  not possible: MESH_SHAPE=(1, 8)") for line in lines)


def test_group_meshes():
    assert layouts.group_mesh((1, -1), 8, 2) == (1, 4)
    assert layouts.group_mesh((-1, 2), 8, 2) == (2, 2)
    assert layouts.group_mesh((4, 2), 8, 2) == (2, 2)
    with pytest.raises(ConfigError, match="does not split into 2 groups"):
        layouts.group_mesh((1, 8), 8, 2)
    with pytest.raises(ConfigError, match="not divisible by 4"):  # (-1, 4) on 2 devices
        layouts.group_mesh((-1, 4), 8, 4)
    assert [layouts.group_count(4, d) for d in (8, 6, 7, 2)] == [4, 3, 1, 2]


def test_an_expert_axis_that_does_not_divide_the_experts_after_splitting(tiny):
    """A group mesh whose expert axis does not divide an SAE's NUM_EXPERTS is refused, naming
    the SAE. (A list the whole mesh holds never gets there: a group's expert axis is the
    whole mesh's or, given as -1, a divisor of it. Here the list is made up.)"""
    _, lp, _ = tiny
    cfg = SAEConfig(d=32, num_latents=1536, num_experts=6, k=8).validate()
    saes = [("six", cfg, TrainConfig(batch_size=256, mesh_shape=(1, -1)))]
    g = layouts.group_layout(saes * 2, lp["saes"], 8, hardware.get("cpu"))
    assert "SAE six: NUM_EXPERTS=6 is not divisible by the 'expert' mesh axis (4)" in g["error"]


def test_a_list_error_is_one_line(tmp_path, capsys):
    path = tmp_path / "bad.gin"
    path.write_text(TINY.replace("'K': 4", "'K': 4, 'STEPS': 3"))
    assert plan_cli.main([f"--gin_file={path}", "--hardware=cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "STEPS is job-wide" in err
