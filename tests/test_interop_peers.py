"""Issue 30 item 2: a peer's SAE (written by SAELens's or sparsify's own code) loads with
load_pretrained, encodes and reconstructs as the peer's own code does, and evaluates and
browses with launch.eval / launch.browse --sae; our Switch SAE in SAELens form reads back
bitwise."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import sae_jax
from launch import browse as browse_cli
from launch import eval as eval_cli
from sae_jax.config import SAEConfig
from sae_jax.data.shards import build_manifest, write_manifest
from sae_jax.export import export_sae

torch = pytest.importorskip("torch")
saes = pytest.importorskip("sae_lens.saes")
sparsify = pytest.importorskip("sparsify")

D, M, K, T = 16, 96, 6, 300
RTOL = 1e-5  # relative to the largest activation / reconstruction entry


def randomise(module, seed: int = 0) -> None:
    """Every parameter random (biases and thresholds too), so no term of the maths is zero;
    decoder rows not unit norm."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name == "threshold":
                p.copy_(torch.rand_like(p) * 0.5)
            elif p.ndim == 1:
                p.copy_(torch.randn_like(p) * 0.3)
            else:
                p.copy_(torch.randn_like(p) * (1.5 / D**0.5))


def tokens(seed: int = 1, n: int = T) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, D)).astype(np.float32)


def dense_codes(sae, x: np.ndarray) -> np.ndarray:
    """Our codes of x scattered into [T, M] (zeros are inactive)."""
    codes = sae.encode(x)
    dense = np.zeros((len(x), sae.cfg.num_latents), np.float32)
    np.put_along_axis(dense, np.asarray(codes.indices), np.asarray(codes.values), axis=1)
    return dense


def relative(ours, theirs) -> float:
    return float(np.max(np.abs(np.asarray(ours) - theirs)) / np.max(np.abs(theirs)))


def saelens_case(name: str):
    """A new small SAELens SAE of the named case (its weights still to be randomised)."""
    cases = {
        "standard": lambda: saes.StandardSAE(saes.StandardSAEConfig(d_in=D, d_sae=M)),
        "standard-uncentred": lambda: saes.StandardSAE(
            saes.StandardSAEConfig(d_in=D, d_sae=M, apply_b_dec_to_input=False)),
        "topk": lambda: saes.TopKSAE(saes.TopKSAEConfig(d_in=D, d_sae=M, k=K)),
        "topk-rescaled": lambda: saes.TopKSAE(
            saes.TopKSAEConfig(d_in=D, d_sae=M, k=K, rescale_acts_by_decoder_norm=True)),
        "jumprelu": lambda: saes.JumpReLUSAE(saes.JumpReLUSAEConfig(d_in=D, d_sae=M)),
        "batchtopk": lambda: saes.BatchTopKTrainingSAE(saes.BatchTopKTrainingSAEConfig(
            d_in=D, d_sae=M, k=8.0, rescale_acts_by_decoder_norm=True)),
        "matryoshka_batchtopk": lambda: saes.MatryoshkaBatchTopKTrainingSAE(
            saes.MatryoshkaBatchTopKTrainingSAEConfig(d_in=D, d_sae=M, k=8.0,
                                                      matryoshka_widths=[32, M])),
    }  # fmt: skip
    return cases[name]()


@pytest.mark.parametrize("name", ["standard", "standard-uncentred", "topk", "topk-rescaled",
                                  "jumprelu", "batchtopk", "matryoshka_batchtopk"])  # fmt: skip
def test_saelens_sae_encodes_and_reconstructs_as_saelens(tmp_path, name):
    sae = saelens_case(name)
    randomise(sae)
    if "batchtopk" in name:
        sae.topk_threshold.fill_(0.4)
    sae.save_model(tmp_path / "sae")  # batchtopk: the training save, a scalar topk_threshold
    reference = sae
    if "batchtopk" in name:
        sae.save_inference_model(tmp_path / "inference")
        reference = saes.SAE.load_from_disk(tmp_path / "inference")
        assert reference.cfg.architecture() == "jumprelu"
    assert json.loads((tmp_path / "sae" / "cfg.json").read_text())["architecture"] == name.split(
        "-")[0]  # fmt: skip
    ours = sae_jax.load_pretrained(tmp_path / "sae")
    x = tokens()
    with torch.no_grad():
        acts = reference.encode(torch.from_numpy(x)).numpy()
        recon = reference(torch.from_numpy(x)).numpy()
    got = dense_codes(ours, x)
    assert 1 < (acts > 0).sum(1).mean() < M - 1  # a real mix of active and inactive latents
    np.testing.assert_array_equal(got > 0, acts > 0)
    err_acts, err_recon = relative(got, acts), relative(ours(x), recon)
    print(f"{name}: activations {err_acts:.2e}, reconstruction {err_recon:.2e} (relative)")
    assert err_acts < RTOL and err_recon < RTOL


def test_jumprelu_codes_hold_every_active_latent_in_a_power_of_2_width(tmp_path):
    """The width is the batch's most active latents rounded up to a power of 2; decode of
    those codes equals the dense decode, and zeros in values are inactive."""
    sae = saes.JumpReLUSAE(saes.JumpReLUSAEConfig(d_in=D, d_sae=M))
    randomise(sae, seed=3)
    sae.save_model(tmp_path)
    ours = sae_jax.load_pretrained(tmp_path)
    assert ours.activation == "jumprelu" and "activation='jumprelu'" in repr(ours)
    for n in (1, 7, 200):
        x = tokens(seed=n, n=n)
        codes = ours.encode(x)
        most = int((np.asarray(codes.values) > 0).sum(1).max())
        assert codes.values.shape == (n, 1 << (most - 1).bit_length())
        with torch.no_grad():
            acts = sae.encode(torch.from_numpy(x)).numpy()
        assert (np.asarray(codes.values) > 0).sum() == (acts > 0).sum()
        np.testing.assert_allclose(ours.decode(codes), ours(x), rtol=0, atol=0)
    assert ours.encode(tokens(n=4).reshape(2, 2, D)).values.shape[:2] == (2, 2)
    # inside the caller's jit the count is not known: every latent, the same activations
    x = tokens(n=16)
    values, indices = jax.jit(lambda x: tuple(ours.encode(x)[:2]))(x)
    assert values.shape == (16, M)
    dense = np.zeros((16, M), np.float32)
    np.put_along_axis(dense, np.asarray(indices), np.asarray(values), axis=1)
    outside = dense_codes(ours, x)  # padded to 128 rows: another matmul, other roundings
    np.testing.assert_array_equal(dense > 0, outside > 0)
    np.testing.assert_allclose(dense, outside, rtol=1e-5, atol=1e-6)


def test_reading_a_peer_sae_needs_no_torch(tmp_path):
    sae = saes.JumpReLUSAE(saes.JumpReLUSAEConfig(d_in=D, d_sae=M, dtype="bfloat16"))
    randomise(sae)
    sae.save_model(tmp_path / "lens")
    sparse_coder({"num_latents": M, "k": K}).save_to_disk(tmp_path / "sparsify")
    script = (
        "import sys\n"
        "for name in ('torch', 'sae_lens', 'sparsify'):\n"
        "    sys.modules[name] = None  # importing them fails\n"
        "import numpy as np, sae_jax\n"
        f"x = np.ones((3, {D}), np.float32)\n"
        "for d in sys.argv[1:]:\n"
        "    print(sae_jax.load_pretrained(d)(x).shape)\n"
    )  # fmt: skip
    env = os.environ | {"JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "lens"),
                          str(tmp_path / "sparsify")], capture_output=True, text=True, env=env,
                         check=False)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == [f"(3, {D})"] * 2


def sparse_coder(cfg_kwargs: dict, seed: int = 0):
    coder = sparsify.SparseCoder(D, sparsify.SparseCoderConfig(**cfg_kwargs))
    randomise(coder, seed)
    return coder


def test_sparsify_sae_encodes_and_reconstructs_as_sparsify(tmp_path):
    coder = sparse_coder({"num_latents": M, "k": K})
    coder.save_to_disk(tmp_path / "layers.3")
    ours = sae_jax.load_pretrained(tmp_path / "layers.3")
    x = tokens()
    with torch.no_grad():
        top_acts, top_indices, _ = coder.encode(torch.from_numpy(x))
        recon = coder.decode(top_acts, top_indices).numpy()
    acts = np.zeros((T, M), np.float32)
    np.put_along_axis(acts, top_indices.numpy(), top_acts.numpy(), axis=1)
    got = dense_codes(ours, x)
    np.testing.assert_array_equal(got > 0, acts > 0)
    err_acts, err_recon = relative(got, acts), relative(ours(x), recon)
    print(f"sparsify: activations {err_acts:.2e}, reconstruction {err_recon:.2e} (relative)")
    assert err_acts < RTOL and err_recon < RTOL
    # a trainer's save directory (its own config.json and state beside) with this one
    # hookpoint loads it
    (tmp_path / "config.json").write_text("{}")
    torch.save({"global_step": 1}, tmp_path / "state.pt")
    assert sae_jax.load_pretrained(tmp_path).meta["format"] == "sparsify"


def test_bfloat16_saelens_weights_load_as_float32(tmp_path):
    sae = saes.StandardSAE(saes.StandardSAEConfig(d_in=D, d_sae=M, dtype="bfloat16"))
    randomise(sae)
    sae.save_model(tmp_path)
    with safe_open(str(tmp_path / "sae_weights.safetensors"), framework="pt") as f:
        assert f.get_tensor("W_enc").dtype == torch.bfloat16
    ours = sae_jax.load_pretrained(tmp_path)
    np.testing.assert_array_equal(ours.params["w_enc"][0], sae.W_enc.detach().float().T.numpy())
    np.testing.assert_array_equal(ours.params["b_dec"], sae.b_dec.detach().float().numpy())
    assert ours.params["w_dec"].dtype == np.float32
    x = tokens()
    with torch.no_grad():
        recon = sae.to(torch.float32)(torch.from_numpy(x)).numpy()
    assert relative(ours(x), recon) < RTOL


def _refused(tmp_path, kind: str):
    """A directory written by the peer's own code with an option sae_jax refuses."""
    if kind == "layer_norm":
        sae = saes.TopKSAE(saes.TopKSAEConfig(d_in=D, d_sae=M, k=K,
                                              normalize_activations="layer_norm"))  # fmt: skip
        sae.save_model(tmp_path)
    elif kind == "gated":
        saes.GatedSAE(saes.GatedSAEConfig(d_in=D, d_sae=M)).save_model(tmp_path)
    elif kind in ("groupmax", "transcode"):
        options = {"activation": "groupmax"} if kind == "groupmax" else {"transcode": True}
        sparse_coder({"num_latents": M, "k": K} | options).save_to_disk(tmp_path)
    else:  # several hookpoints
        for layer in ("layers.0", "layers.1"):
            sparse_coder({"num_latents": M, "k": K}).save_to_disk(tmp_path / layer)
    return tmp_path


@pytest.mark.parametrize("kind, says", [
    ("layer_norm", r"cfg.json: normalize_activations 'layer_norm' is not supported"),
    ("gated", r"cfg.json: SAELens architecture 'gated' is not supported"),
    ("groupmax", r"cfg.json: activation = 'groupmax' is not supported"),
    ("transcode", r"cfg.json: transcode = True is not supported"),
    ("hookpoints", r"holds sparsify SAEs for 2 hookpoints \(layers.0, layers.1\); load one"),
])  # fmt: skip
def test_refused_peer_options_are_one_line_errors(tmp_path, capsys, kind, says):
    path = _refused(tmp_path / "sae", kind)
    with pytest.raises(ValueError, match=says) as e:
        sae_jax.load_pretrained(path)
    assert "\n" not in str(e.value)
    assert str(path) in str(e.value)
    if kind == "gated":  # the command says it in one line, no traceback
        assert eval_cli.main(["--sae", str(path), "--data", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "gated" in err


def test_damaged_or_incomplete_directories_say_what_is_wrong(tmp_path):
    saes.StandardSAE(saes.StandardSAEConfig(d_in=D, d_sae=M)).save_model(tmp_path)
    cfg_path = tmp_path / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    missing = {
        "d_sae": "cfg.json: no d_sae",
        "architecture": "cfg.json: no architecture .a SAELens config from before",
    }
    for key, says in missing.items():
        cfg_path.write_text(json.dumps({k: v for k, v in cfg.items() if k != key}))
        with pytest.raises(ValueError, match=says):
            sae_jax.load_pretrained(tmp_path)
    cfg_path.write_text("{")
    with pytest.raises(ValueError, match="cfg.json: not valid JSON"):
        sae_jax.load_pretrained(tmp_path)
    cfg_path.write_text(json.dumps(cfg))
    (tmp_path / "sae_weights.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="a cfg.json without the weights of any SAE"):
        sae_jax.load_pretrained(tmp_path)
    (tmp_path / "sae_weights.safetensors").write_bytes(b"\x05" + bytes(7) + b"{nope")
    with pytest.raises(ValueError, match="sae_weights.safetensors: not a safetensors file"):
        sae_jax.load_pretrained(tmp_path)


@pytest.mark.parametrize("n", [1, 4], ids=["topk", "switch"])
def test_our_sae_in_saelens_form_reads_back_bitwise(tmp_path, n):
    """A native export hand-converted to the SAELens layout of the contract (engineer A's
    writer produces it) loads back to the same tensors, meta and codes."""
    e, s = (2, 16) if n > 1 else (1, 0)
    cfg = SAEConfig(d=D, num_latents=64, num_experts=n, k=6, k_aux=0, experts_per_token=e,
                    shared_latents=s, shared_k=2 if s else 0).validate()  # fmt: skip
    rng = np.random.default_rng(0)
    shapes = {"w_enc": (n, 64 // n, D), "b_enc": (n, 64 // n), "w_dec": (n, 64 // n, D),
              "b_dec": (D,)}  # fmt: skip
    if n > 1:
        shapes |= {"w_router": (D, n), "b_router": (D,), "router_bias": (n,), "shared_w_enc":
                   (s, D), "shared_b_enc": (s,), "shared_w_dec": (s, D)}  # fmt: skip
    params = {k: rng.normal(size=v).astype(np.float32) for k, v in shapes.items()}
    source = {"data": "synthetic", "note": "round trip"}
    native = export_sae(params, cfg, tmp_path / "native", input_scale=1.7, source=source)
    t = load_file(str(native / "sae.safetensors"))
    shared = lambda name: [t[name]] if s else []  # noqa: E731
    lens = {"W_enc": np.concatenate([t["w_enc"].reshape(64, D)] + shared("shared_w_enc")).T.copy(),
            "b_enc": np.concatenate([t["b_enc"].reshape(64)] + shared("shared_b_enc")),
            "W_dec": np.concatenate([t["w_dec"].reshape(64, D)] + shared("shared_w_dec")),
            "b_dec": t["b_dec"]}  # fmt: skip
    if n > 1:
        lens |= {
            "W_router": t["w_router"],
            "b_router": t["b_router"],
            "router_bias": t["router_bias"],
        }
    (tmp_path / "lens").mkdir()
    save_file(lens, str(tmp_path / "lens" / "sae_weights.safetensors"))
    lens_cfg = {"architecture": "switch" if n > 1 else "topk", "d_in": D, "d_sae": 64 + s,
                "k": 6, "num_experts": n, "experts_per_token": e, "shared_latents": s,
                "shared_k": cfg.shared_k, "apply_b_dec_to_input": True,
                "normalize_activations": "none", "dtype": "float32",
                "metadata": {"sae_jax": {"input_scale": 1.7, "source": source}}}  # fmt: skip
    (tmp_path / "lens" / "cfg.json").write_text(json.dumps(lens_cfg))
    a, b = sae_jax.load_pretrained(native), sae_jax.load_pretrained(tmp_path / "lens")
    assert sorted(a.params) == sorted(b.params)
    for name in a.params:
        np.testing.assert_array_equal(a.params[name], b.params[name], err_msg=name)
        assert a.params[name].dtype == b.params[name].dtype
    assert a.cfg == b.cfg and b.meta["input_scale"] == 1.7 and b.meta["source"] == source
    x = tokens()
    for got, want in zip(b.encode(x), a.encode(x), strict=True):
        if want is not None:
            np.testing.assert_array_equal(got, want)


def write_shards(directory, x: np.ndarray, parts: int = 2) -> None:
    directory.mkdir(parents=True)
    for i, part in enumerate(np.array_split(x, parts)):
        np.save(directory / f"part_{i}.npy", part)
    write_manifest(directory, build_manifest(directory))


def test_eval_and_browse_a_saelens_sae(tmp_path, capsys):
    """launch.eval --sae writes the keys of a run's eval.json, with FVU, L0 and dead latents as
    SAELens's own forward gives them; launch.browse --sae writes pages whose firing counts
    are SAELens's."""
    x = tokens(seed=5, n=512)
    write_shards(tmp_path / "acts", x)
    sae = saes.TopKSAE(saes.TopKSAEConfig(d_in=D, d_sae=M, k=K))
    randomise(sae, seed=2)
    sae.save_model(tmp_path / "topk")
    with torch.no_grad():
        acts = sae.encode(torch.from_numpy(x)).numpy()
        recon = sae(torch.from_numpy(x)).numpy()
    out = tmp_path / "out"
    common = ["--data", str(tmp_path / "acts"), "--tokens", "512", "--batch_size", "512"]
    assert eval_cli.main(["--sae", str(tmp_path / "topk"), "--out", str(out), *common,
                          "--no_lm"]) == 0  # fmt: skip
    peer = json.loads((out / "eval.json").read_text())
    fvu = np.sum((x - recon) ** 2) / np.sum((x - x.mean(0)) ** 2)
    assert peer["fvu_dropless"] == pytest.approx(fvu, rel=1e-5)
    assert peer["l0"] == pytest.approx((acts > 0).sum(1).mean())
    assert peer["dead_fraction"] == pytest.approx(np.mean((acts > 0).sum(0) == 0))
    assert peer["capacity_factor"] is None and peer["drop_fraction"] == 0
    assert (out / "latent_frequency.png").exists() and (out / "expert_load.png").exists()
    # the keys of our own SAE's eval.json
    cfg = SAEConfig(d=D, num_latents=M, num_experts=1, k=K, k_aux=0).validate()
    export_sae({"w_enc": sae.W_enc.detach().numpy().T[None], "b_enc": sae.b_enc.detach()[None]
                .numpy(), "w_dec": sae.W_dec.detach().numpy()[None],
                "b_dec": sae.b_dec.detach().numpy()}, cfg, tmp_path / "run" / "export")  # fmt: skip
    assert eval_cli.main(["--workdir", str(tmp_path / "run"), *common, "--no_lm",
                          "--no_plots"]) == 0  # fmt: skip
    ours = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert sorted(peer) == sorted(ours)
    capsys.readouterr()
    # a d mismatch, or no --data: one line each
    small = tmp_path / "small"
    saes.StandardSAE(saes.StandardSAEConfig(d_in=8, d_sae=M)).save_model(small)
    for cli in (eval_cli, browse_cli):
        assert cli.main(["--sae", str(small), *common, "--out", str(tmp_path / "x")]) == 2
        assert capsys.readouterr().err == (f"error: {tmp_path / 'acts'}: d = {D}, but the SAE "
                                           "has d = 8\n")  # fmt: skip
        assert cli.main(["--sae", str(small)]) == 2
        assert capsys.readouterr().err.startswith("error: --sae needs --data SHARDS_DIR")

    # a JumpReLU SAE: batches of 128 tokens give codes of several widths
    sae = saes.JumpReLUSAE(saes.JumpReLUSAEConfig(d_in=D, d_sae=M))
    randomise(sae, seed=4)
    sae.save_model(tmp_path / "jumprelu")
    with torch.no_grad():
        acts = sae.encode(torch.from_numpy(x)).numpy()
    out = tmp_path / "out_jumprelu"
    browse = ["--sae", str(tmp_path / "jumprelu"), "--out", str(out), *common[:4],
              "--batch_size", "128", "--no_model"]  # fmt: skip
    assert browse_cli.main(browse) == 0
    assert f"wrote {out / 'browser' / 'index.html'}" in capsys.readouterr().out
    block, overview = (
        script(out / "browser" / "data" / f"{n}.js") for n in ("block_0", "overview")
    )
    counts = [block[str(i)]["count"] for i in range(len(block))]
    np.testing.assert_array_equal(counts, (acts > 0).sum(0)[: len(block)])
    assert overview["k"] == "jumprelu (no fixed k)" and overview["title"] == "jumprelu"
    # shards indexed from one's own arrays (no token ids, no model): nothing to re-dump
    assert "no token ids" in overview["note"] and "re-dump" not in overview["note"]


def script(path) -> dict:
    """The payload of a browser data file: SAE.loaded("name", {...});"""
    text = path.read_text()
    return json.loads(text[text.index(", ") + 2 : text.rindex(")")])
