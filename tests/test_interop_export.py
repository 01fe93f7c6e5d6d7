"""Export to SAELens and sparsify (sae_jax.interop): the files those libraries open, what they
compute against load_pretrained, the streamed conversion of sharded exports, the CLI."""

import json
import subprocess
import sys
import tracemalloc
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import random_model
from data_utils import TINY_TRAIN
from flax import nnx
from safetensors.numpy import load_file, save_file

from launch import export as export_cli
from launch import train as train_cli
from sae_jax.config import SAEConfig
from sae_jax.data.dumper import BLOCK_PATHS
from sae_jax.export import export_sae
from sae_jax.interop import native_reader, saelens_files
from sae_jax.interop.formats import convert
from sae_jax.interop.hooks import BLOCK_LISTS, hook_names
from sae_jax.interop.safetensors_file import PiecewiseSafetensors
from sae_jax.interop.sparsify_files import write_sparsify
from sae_jax.mesh import make_mesh
from sae_jax.pretrained import load_pretrained

ONE_DEVICE = "--gin.MESH_SHAPE=(1, 1)"
D, SCALE = 32, 1.7  # input scale folded into the export
SOURCE = {"model": "smollm2-135m", "layer": 15, "seq_len": 128, "bos_skipped": True,
          "text_files": ["a.txt"]}  # fmt: skip
TOPK = SAEConfig(d=D, num_latents=256, num_experts=1, k=8)
SWITCH = {
    "top2_bias": SAEConfig(d=D, num_latents=256, num_experts=4, k=8, experts_per_token=2,
                           router_bias=True),
    "shared_scaled": SAEConfig(d=D, num_latents=256, num_experts=4, k=8, experts_per_token=2,
                               shared_latents=32, shared_k=3, feature_scaling=True),
    "top1": SAEConfig(d=D, num_latents=256, num_experts=4, k=8),
    "one_expert_shared": SAEConfig(d=D, num_latents=128, num_experts=1, k=6, shared_latents=32,
                                   shared_k=2),
}  # fmt: skip


def params_of(cfg: SAEConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Random parameters, the optional ones (router bias, feature scaling, shared dictionary)
    random too."""
    with jax.set_mesh(make_mesh((1, 1))):
        model = random_model(cfg.validate(), seed)
        params = {k: np.asarray(v) for k, v in nnx.to_pure_dict(nnx.state(model)).items()}
    rng = np.random.default_rng(seed + 1)
    for name in ("router_bias", "enc_scale", "shared_w_enc", "shared_b_enc", "shared_w_dec"):
        if name in params:  # a router bias large enough to change many tokens' experts
            size = 4.0 if name == "router_bias" else 0.5
            params[name] = (rng.normal(size=params[name].shape) * size).astype(np.float32)
    return params


def native(directory: Path, cfg: SAEConfig, seed: int = 0, **kw) -> Path:
    return export_sae(params_of(cfg, seed), cfg.validate(), directory, SCALE, SOURCE, **kw)


def inputs(tokens: int = 2048, seed: int = 5) -> np.ndarray:
    return (np.random.default_rng(seed).normal(size=(tokens, D)) * SCALE).astype(np.float32)


def dense_codes(sae, x: np.ndarray) -> np.ndarray:
    """Our codes as dense gated activations [T, d_sae] (value x its latent's gate)."""
    codes = sae.encode(x)
    gate = codes.latent_gate if codes.latent_gate is not None else codes.gate[:, None]
    values = np.asarray(codes.values) * np.asarray(gate)
    width = sae.cfg.num_latents + sae.cfg.shared_latents
    out = np.zeros((x.shape[0], width), np.float32)
    np.put_along_axis(out, np.asarray(codes.indices), values, axis=1)
    return out


def rel_err(got, want) -> float:
    return float(np.abs(np.asarray(got) - np.asarray(want)).max() / np.abs(want).max())


def test_piecewise_file_is_what_safetensors_writes(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"w": rng.normal(size=(3, 5)), "a.b": rng.normal(size=(7,)), "Z": np.zeros((2, 0))}
    tensors = {k: v.astype(np.float32) for k, v in tensors.items()}
    for metadata in (None, {"k": "v"}):
        save_file(tensors, str(tmp_path / "ref.safetensors"), metadata=metadata)
        shapes = {k: v.shape for k, v in tensors.items()}
        with PiecewiseSafetensors(tmp_path / "mine.safetensors", shapes, metadata) as out:
            for name, value in tensors.items():
                for row in range(value.shape[0]):  # piece by piece
                    out[name][row] = value[row]
        ref, mine = (tmp_path / "ref.safetensors").read_bytes(), (tmp_path / "mine.safetensors")
        assert mine.read_bytes() == ref and not (tmp_path / "mine.safetensors.partial").exists()


def test_metadata_names_the_dump_from_the_source(tmp_path):
    meta = json.loads((native(tmp_path / "n", TOPK) / "cfg.json").read_text())
    got = saelens_files.saelens_config(meta)["metadata"]
    assert got["model_name"] == "smollm2-135m" and got["context_size"] == 128
    assert got["hook_name"] == "blocks.15.hook_resid_post" == hook_names(15).transformer_lens
    assert got["prepend_bos"] is True and got["dataset_path"] == "a.txt"
    assert got["sae_jax"] == {"input_scale": SCALE, "source": SOURCE}
    # a run's source names its data directory: the manifest there names the dump
    data = tmp_path / "acts"
    data.mkdir()
    (data / "manifest.json").write_text(json.dumps({"source": {**SOURCE, "layer": 3}}))
    meta["source"] = {"train_step": 20, "train_data": str(data)}
    assert saelens_files.saelens_config(meta)["metadata"]["hook_name"] == "blocks.3.hook_resid_post"
    meta["source"] = {"train_data": "synthetic"}
    unknown = saelens_files.saelens_config(meta)["metadata"]
    assert unknown["hook_name"] is None and unknown["model_name"] is None
    assert hook_names(2).sparsify == "layers.2" and hook_names(2).hugging_face == "model.layers.2"
    assert hook_names(4, "transformer.h") == ("blocks.4.hook_resid_post", "transformer.h.4", "h.4")
    with pytest.raises(ValueError, match="unknown block list 'blocks'"):
        hook_names(1, "blocks")
    assert set(BLOCK_LISTS) == set(BLOCK_PATHS)  # every block list the dumper finds


SAELENS_SCRIPT = """
import sys, numpy as np, torch
from sae_lens import SAE
sae = SAE.load_from_disk(sys.argv[1])
x = torch.from_numpy(np.load(sys.argv[2]))
with torch.no_grad():
    acts, out = sae.encode(x), sae(x)
assert "sae_jax" not in sys.modules
np.savez(sys.argv[3], acts=acts.numpy(), out=out.numpy())
print(type(sae).__name__, sae.cfg.architecture(), sae.cfg.metadata.hook_name)
"""


def test_topk_export_opens_in_saelens_without_sae_jax(tmp_path):
    pytest.importorskip("sae_lens")
    out = convert(native(tmp_path / "native", TOPK), "saelens", tmp_path / "saelens")
    x = inputs()
    np.save(tmp_path / "x.npy", x)
    cmd = [sys.executable, "-c", SAELENS_SCRIPT, str(out), str(tmp_path / "x.npy"),
           str(tmp_path / "got.npz")]  # fmt: skip
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["TopKSAE", "topk", "blocks.15.hook_resid_post"]
    got, ours = np.load(tmp_path / "got.npz"), load_pretrained(tmp_path / "native")
    want = dense_codes(ours, x)
    np.testing.assert_array_equal(got["acts"] != 0, want != 0)  # the same latents fire
    assert rel_err(got["acts"], want) < 1e-5  # seen: 0
    assert rel_err(got["out"], ours(x)) < 1e-4  # seen: 1.1e-7


def test_sparsify_opens_the_topk_export(tmp_path):
    sparsify = pytest.importorskip("sparsify")
    torch = pytest.importorskip("torch")
    out = convert(native(tmp_path / "native", TOPK), "sparsify", tmp_path / "sparsify")
    sae, ours, x = sparsify.Sae.load_from_disk(out), load_pretrained(tmp_path / "native"), inputs()
    with torch.no_grad():
        top = sae.encode(torch.from_numpy(x))
        recon = sae.decode(top.top_acts, top.top_indices).numpy()
    dense = np.zeros((x.shape[0], TOPK.num_latents), np.float32)
    np.put_along_axis(dense, top.top_indices.numpy(), top.top_acts.numpy(), axis=1)
    want = dense_codes(ours, x)
    np.testing.assert_array_equal(dense != 0, want != 0)
    assert rel_err(dense, want) < 1e-5 and rel_err(recon, ours(x)) < 1e-4
    # what sparsify itself saves for this SAE is what we wrote, byte for byte
    sae.save_to_disk(tmp_path / "again")
    assert (tmp_path / "again/sae.safetensors").read_bytes() == (
        out / "sae.safetensors"
    ).read_bytes()
    assert json.loads((tmp_path / "again/cfg.json").read_text()) == json.loads(
        (out / "cfg.json").read_text()
    )


@pytest.mark.parametrize("name", list(SWITCH))
def test_switch_sae_in_saelens_computes_as_load_pretrained(tmp_path, name):
    pytest.importorskip("sae_lens")
    torch = pytest.importorskip("torch")
    from sae_lens import SAE
    from torch.utils.flop_counter import FlopCounterMode

    from sae_jax.interop.saelens import SwitchSAE

    cfg = SWITCH[name]
    out = convert(native(tmp_path / "native", cfg, seed=3), "saelens", tmp_path / "saelens")
    sae, ours, x = SAE.load_from_disk(out), load_pretrained(tmp_path / "native"), inputs()
    assert isinstance(sae, SwitchSAE) and sae.W_enc.shape == (D, cfg.dictionary_size)
    assert hasattr(sae, "router_bias") == cfg.router_bias
    if cfg.router_bias:  # the bias chooses other experts than the probabilities for many tokens
        with torch.no_grad():
            expert = sae.route(torch.from_numpy(x))[0]
        unbiased = np.sort(np.argsort(-ours.route(x).probs, axis=1)[:, :2], axis=1)
        assert np.mean(np.any(np.sort(expert.numpy(), axis=1) != unbiased, axis=1)) > 0.1
    with torch.no_grad():
        acts = sae.encode(torch.from_numpy(x))
        recon, forward = sae.decode(acts).numpy(), sae(torch.from_numpy(x)).numpy()
    want = dense_codes(ours, x)
    np.testing.assert_array_equal(acts.numpy() != 0, want != 0)
    assert rel_err(acts.numpy(), want) < 1e-5  # float32 rounding; seen up to 1.1e-6
    assert rel_err(recon, ours(x)) < 1e-5 and rel_err(forward, ours(x)) < 1e-5
    with torch.no_grad(), FlopCounterMode(display=False) as flops:
        sae.encode(torch.from_numpy(x))
    n, e, lat = cfg.num_experts, cfg.experts_per_token, cfg.latents_per_expert
    routed = e * lat + cfg.shared_latents + (n if n > 1 else 0)  # not d_sae + N: no dense pass
    assert flops.get_total_flops() == 2 * x.shape[0] * D * routed
    with torch.no_grad():  # [batch, seq, d] in, the same leading axes out
        shape = sae.encode(torch.from_numpy(x[:6].reshape(2, 3, D))).shape
    assert tuple(shape) == (2, 3, cfg.dictionary_size)
    sae.save_model(tmp_path / "resaved")  # SAELens's own save opens again as the same SAE
    again = SAE.load_from_disk(tmp_path / "resaved")
    with torch.no_grad():
        assert isinstance(again, SwitchSAE) and torch.equal(again.encode(torch.from_numpy(x)), acts)
        again.fold_activation_norm_scaling_factor(4.0)  # takes x / 4 where it took x
        folded = again.encode(torch.from_numpy(x / 4))
        assert rel_err(folded.numpy(), acts.numpy()) < 1e-5
        assert rel_err(again.decode(folded).numpy(), forward / 4) < 1e-5


def _record_reads(monkeypatch) -> list[tuple]:
    reads = []
    original = native_reader.NativeExport.expert_block

    def expert_block(self, name, block):
        reads.append((block.file, name, block.start, block.stop, block.lo, block.hi))
        return original(self, name, block)

    monkeypatch.setattr(native_reader.NativeExport, "expert_block", expert_block)
    return reads


SHARDED = {  # N = 8 in parts of 2 experts; N = 1 in latent ranges of one expert
    "saelens": SAEConfig(d=D, num_latents=2048, num_experts=8, k=8, experts_per_token=2,
                         router_bias=True),
    "sparsify": SAEConfig(d=D, num_latents=1024, num_experts=1, k=8),
}  # fmt: skip


@pytest.mark.parametrize("fmt", list(SHARDED))
def test_sharded_export_converts_part_by_part_to_the_same_files(tmp_path, monkeypatch, fmt):
    """A sharded export (several parts) gives the single-file export's files bit for bit, read
    one part at a time: every expert read lies in one part, the parts are visited in turn,
    and the memory the conversion allocates stays near one read, far below every expert."""
    cfg = SHARDED[fmt].validate()
    per_expert = 4 * cfg.latents_per_expert * (2 * D + 1)  # w_enc, b_enc, w_dec
    single = native(tmp_path / "single", cfg)
    limit = 2 * per_expert if cfg.num_experts > 1 else per_expert // 2  # sharded either way
    sharded = native(tmp_path / "sharded", cfg, max_file_bytes=limit)
    parts = json.loads((sharded / "sae.safetensors.index.json").read_text())["tensors"]
    parts = {p["file"]: p["experts"] for p in parts["w_enc"]["parts"]}
    convert(single, fmt, tmp_path / "from_single")
    reads = _record_reads(monkeypatch)
    block = 2 * per_expert if cfg.num_experts > 1 else per_expert // 5
    tracemalloc.start()
    convert(sharded, fmt, tmp_path / "from_sharded", block_bytes=block)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    for path in (tmp_path / "from_single").iterdir():
        assert path.read_bytes() == (tmp_path / "from_sharded" / path.name).read_bytes()
    files = [file for file, *_ in reads]
    assert [f for i, f in enumerate(files) if i == 0 or files[i - 1] != f] == list(parts)
    assert len(parts) == (4 if cfg.num_experts > 1 else 1)
    largest = 0
    for file, name, start, stop, lo, hi in reads:
        assert parts[file][0] <= start < stop <= parts[file][1]
        largest = max(largest, 4 * (stop - start) * (hi - lo) * (D if name != "b_enc" else 1))
    total = per_expert * cfg.num_experts
    print(f"peak {peak} B, largest read {largest} B, all experts {total} B")
    assert peak < 2 * largest + 48 * 2**10 < total / 2


def test_the_native_row_copies_an_export(tmp_path):
    sharded = native(tmp_path / "sharded", SWITCH["top1"], max_file_bytes=2**14)
    copy = convert(sharded, "native", tmp_path / "copy")
    assert sorted(p.name for p in copy.iterdir()) == sorted(p.name for p in sharded.iterdir())
    for path in sharded.iterdir():
        assert (copy / path.name).read_bytes() == path.read_bytes()
    assert convert(sharded, "native", sharded) == sharded  # onto itself: nothing to do


def test_refused_conversions_say_why_in_one_line(tmp_path):
    switch = native(tmp_path / "n", SWITCH["top2_bias"])
    with pytest.raises(ValueError, match=r"NUM_EXPERTS = 4, EXPERTS_PER_TOKEN = 2") as e:
        write_sparsify(switch, tmp_path / "s")
    assert "\n" not in str(e.value) and not (tmp_path / "s").exists()
    with pytest.raises(ValueError, match="cannot be written over the native export"):
        convert(switch, "saelens", switch)
    with pytest.raises(ValueError, match="unknown format 'gguf'"):
        convert(switch, "gguf", tmp_path / "g")
    with pytest.raises(FileNotFoundError, match="is not a native export"):
        convert(tmp_path, "saelens", tmp_path / "x")
    assert load_pretrained(switch).cfg.num_experts == 4  # untouched
    sharded = native(tmp_path / "sharded", SWITCH["top1"], max_file_bytes=2**14)
    (sharded / "sae-00002-of-00005.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="sae-00002-of-00005.safetensors: no such file"):
        convert(sharded, "saelens", tmp_path / "incomplete")
    assert not (tmp_path / "incomplete" / "cfg.json").exists()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, Path]:
    """A 20-step run with N = 1 (checkpoints at steps 10 and 20) and a 10-step one with N = 4
    (no latent dies so soon: one compiled step each)."""
    out = {}
    for n, steps in ((1, 20), (4, 10)):
        workdir = tmp_path_factory.mktemp(f"run{n}")
        args = [*TINY_TRAIN, f"--gin.STEPS={steps}", f"--gin.NUM_EXPERTS={n}", ONE_DEVICE,
                "--gin.TrainConfig.dead_after_tokens=100000"]  # fmt: skip
        assert train_cli.main([f"--workdir={workdir}", *args]) == 0
        out[n] = workdir
    return out


def test_launch_export_writes_saelens_and_sparsify_dirs(runs, capsys):
    pytest.importorskip("sae_lens")
    torch = pytest.importorskip("torch")
    from sae_lens import SAE

    run = runs[1]
    assert export_cli.main([f"--workdir={run}", "--format=saelens"]) == 0
    sae, ours = SAE.load_from_disk(run / "export_saelens"), load_pretrained(run / "export")
    x = np.random.default_rng(0).normal(size=(256, 16)).astype(np.float32)
    with torch.no_grad():
        assert rel_err(sae(torch.from_numpy(x)).numpy(), ours(x)) < 1e-4
    assert sae.cfg.architecture() == "topk"
    # step 10 while export/ holds step 20: a temporary native export, removed after
    assert export_cli.main([f"--workdir={run}", "--format=sparsify", "--step=10"]) == 0
    assert sorted(p.name for p in run.glob("export*")) == ["export", "export_saelens",
                                                           "export_sparsify"]  # fmt: skip
    assert json.loads((run / "export/cfg.json").read_text())["source"]["train_step"] == 20
    step10 = load_file(str(run / "export_sparsify/sae.safetensors"))["W_dec"]
    assert not np.array_equal(step10, sae.W_dec.detach().numpy())
    capsys.readouterr()
    assert export_cli.main([f"--workdir={runs[4]}", "--format=sparsify"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "--format saelens" in err
    assert not (runs[4] / "export_sparsify").exists()


@pytest.mark.parametrize("name", ["topk", *SWITCH])
def test_native_to_saelens_to_load_pretrained_is_bitwise(tmp_path, name):
    """Our export written as SAELens files and read back by `load_pretrained` is the same SAE:
    every tensor, the config, the input scale and the provenance, and so the same codes and
    reconstruction to the bit (and sparsify's files for a TopK SAE)."""
    cfg = TOPK if name == "topk" else SWITCH[name]
    ours = load_pretrained(native(tmp_path / "native", cfg))
    back = load_pretrained(convert(tmp_path / "native", "saelens", tmp_path / "saelens"))
    assert back.meta["format"] == "saelens"
    assert sorted(back.params) == sorted(ours.params)
    for key, value in ours.params.items():
        np.testing.assert_array_equal(back.params[key], value, err_msg=key)
    assert back.cfg == ours.cfg and back.meta["input_scale"] == SCALE
    assert back.meta["source"] == ours.meta["source"]
    x = inputs(256)
    np.testing.assert_array_equal(back(x), ours(x))
    if name == "topk":
        sparsify = load_pretrained(convert(tmp_path / "native", "sparsify", tmp_path / "sp"))
        np.testing.assert_array_equal(sparsify(x), ours(x))
