"""launch.eval, launch.browse and the set table over a launch.train_many set: two tiny SAEs
trained with launch.train on synthetic data into SET/<name>, and SET/saes.json."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
from test_browse import Page, chromium  # noqa: F401 - the fixture

from launch import browse as browse_cli
from launch import eval as eval_cli
from launch import train as train_cli
from launch.experiments import compare

CONFIG = """include 'default.gin'
STEPS = 6
BATCH_SIZE = 256
NUM_LATENTS = 128
LOG_EVERY = 2
TrainConfig.eval_tokens = 1024
SAES = [
    {'name': 'a', 'K': 4, 'NUM_EXPERTS': 2},
    {'name': 'b', 'NUM_LATENTS': 64, 'LR': None},
]
"""
EVAL = ["--tokens", "1024", "--batch_size", "256", "--no_lm"]


@pytest.fixture(scope="module")
def sae_set(tmp_path_factory):
    """SET/ with SAEs a and b (its record says layer 7), each trained alone."""
    import gin

    from sae_jax.sae_set import parse_many
    from sae_jax.training.many import write_set_record

    root = tmp_path_factory.mktemp("set")
    (root / "many.gin").write_text(CONFIG)
    specs = parse_many([root / "many.gin"], [])
    for spec in specs:
        config = root / f"{spec.name}.gin"
        config.write_text(spec.config_text)
        workdir = root / "set" / spec.name
        assert (
            train_cli.main([f"--gin_file={config}", f"--workdir={workdir}", "--no_progress"]) == 0
        )
    specs[1] = dataclasses.replace(specs[1], layer=7)
    write_set_record(root / "set", specs)
    gin.clear_config()
    return root / "set"


def table_rows(table: str) -> dict[str, list[str]]:
    """{SAE name: its cells} of a markdown table."""
    lines = [line.strip("|").split(" | ") for line in table.splitlines()[2:] if line]
    return {cells[0].strip(): [c.strip() for c in cells] for cells in lines}


def test_eval_over_a_set_equals_each_alone_and_writes_the_table(sae_set, capsys):
    assert eval_cli.main(["--workdir", str(sae_set), *EVAL]) == 0
    out = capsys.readouterr().out
    together = {n: json.loads((sae_set / n / "eval.json").read_text()) for n in "ab"}
    assert (sae_set / "a" / "expert_load.png").exists()
    for name in "ab":
        assert eval_cli.main(["--workdir", str(sae_set / name), *EVAL, "--no_plots"]) == 0
        assert json.loads((sae_set / name / "eval.json").read_text()) == together[name]
    table = (sae_set / "table.md").read_text()
    assert table in out
    header = table.splitlines()[0]
    assert "| layer |" in header and "| settings |" in header and "| FVU |" in header
    rows = table_rows(table)
    assert list(rows) == ["a", "b"]
    cols = [h.strip() for h in header.strip("|").split("|")]
    fvu, layer, settings, lr = (cols.index(h) for h in ("FVU", "layer", "settings", "LR"))
    for name in "ab":
        assert rows[name][fvu] == f"{together[name]['fvu_dropless']:.4f}"
    assert [rows[n][layer] for n in "ab"] == ["-", "7"]
    assert rows["a"][settings] == "K=4, NUM_EXPERTS=2"
    assert rows["b"][settings] == "LR=None, NUM_LATENTS=64"  # saes.json's order
    assert rows["a"][lr] == "0.003"  # default.gin's LR
    assert rows["b"][lr] == "0.0032"  # BASE_LR 2e-4 / sqrt(64 / 2^14)
    assert rows["a"][cols.index("NUM_EXPERTS")] == "2"
    assert float(rows["a"][cols.index("train tokens/s")]) > 0
    capsys.readouterr()
    assert compare.main(["--set", str(sae_set)]) == 0
    assert table in capsys.readouterr().out


def test_one_broken_sae_is_one_line_and_the_rest_are_evaluated(sae_set, tmp_path, capsys):
    broken = tmp_path / "set"
    shutil.copytree(sae_set, broken, ignore=shutil.ignore_patterns("eval.json", "*.png"))
    shutil.rmtree(broken / "b" / "export")
    assert eval_cli.main(["--workdir", str(broken), *EVAL, "--no_plots"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len([e for e in err if e.startswith("error: b: ")]) == 1, err
    assert "no exported SAE" in err[0] and not any(e.startswith("error: a") for e in err)
    assert (broken / "a" / "eval.json").exists() and not (broken / "b" / "eval.json").exists()
    rows = table_rows((broken / "table.md").read_text())
    logged = [json.loads(line) for line in (broken / "b" / "metrics.jsonl").open()]
    final = [r["eval/fvu"] for r in logged if "eval/fvu" in r][-1]
    assert f"{final:.4f} (log)" in rows["b"]  # the training log's FVU, marked
    assert eval_cli.main(["--workdir", str(tmp_path / "nothing")]) == 2


def test_browse_a_set_in_chromium(sae_set, chromium, capsys):  # noqa: F811
    args = ["--workdir", str(sae_set), "--tokens", "512", "--batch_size", "256", "--no_model",
            "--no_duplicates"]  # fmt: skip
    assert browse_cli.main(args) == 0
    index = sae_set / "browser" / "index.html"
    assert f"wrote {index}" in capsys.readouterr().out
    page = Page(chromium)
    page.page.goto(index.as_uri())
    links = page.page.query_selector_all("a.sae-link")
    assert [a.text_content() for a in links] == ["a", "b"]
    row = page.page.query_selector('tr[data-sae="b"]').text_content()
    assert "7" in row and "LR=None, NUM_LATENTS=64" in row
    page.follow("a.sae-link >> nth=1")
    assert page.page.url == (sae_set / "b" / "browser" / "index.html").as_uri()
    assert page.errors == []
