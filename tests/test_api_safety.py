"""Issue 22: the Python API and the launch commands on bad input say what is wrong, in one
line; encode takes [..., d] and compiles once per token-count bucket."""

import json

import jax
import numpy as np
import pytest

import sae_jax
from launch import browse as browse_cli
from launch import eval as eval_cli
from launch import export as export_cli
from launch.cli import macro_help
from sae_jax import pretrained
from sae_jax.config import ConfigError, SAEConfig
from sae_jax.export import export_sae
from sae_jax.gin_setup import parse

D, N, M, K = 16, 4, 64, 4


def random_params(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(N, M // N, D)).astype(np.float32)
    w /= np.linalg.norm(w, axis=-1, keepdims=True)
    return {"w_enc": w, "w_dec": w.copy(), "b_dec": rng.normal(size=D).astype(np.float32) * 0.1,
            "b_enc": rng.normal(size=(N, M // N)).astype(np.float32) * 0.1,
            "w_router": rng.normal(size=(D, N)).astype(np.float32),
            "b_router": np.zeros(D, np.float32)}  # fmt: skip


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory holding only export/, a tiny SAE with random weights."""
    run = tmp_path_factory.mktemp("run")
    cfg = SAEConfig(d=D, num_latents=M, num_experts=N, k=K, k_aux=0).validate()
    export_sae(random_params(), cfg, run / "export")
    return run


@pytest.fixture(scope="module")
def sae(run_dir):
    return sae_jax.load_pretrained(run_dir / "export")


@pytest.mark.parametrize(
    "cli", [eval_cli, export_cli, browse_cli], ids=["eval", "export", "browse"]
)
def test_launch_commands_say_the_workdir_does_not_exist(tmp_path, capsys, cli):
    missing = tmp_path / "nothere"
    assert cli.main(["--workdir", str(missing)]) == 2
    assert capsys.readouterr().err == f"error: {missing}: no such directory\n"
    assert not missing.exists()


def test_load_pretrained_on_a_run_directory_or_a_missing_path(run_dir, tmp_path):
    sae = sae_jax.load_pretrained(run_dir)  # a run directory loads its export/
    assert sae.path == str(run_dir / "export") and sae.cfg.d == D
    with pytest.raises(FileNotFoundError, match="nothere: no such directory"):
        sae_jax.load_pretrained(tmp_path / "nothere")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="run directory with no exported SAE; run "
                       "python -m launch.export --workdir"):  # fmt: skip
        sae_jax.load_pretrained(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match=r"cfg.json: no such file; .* is not an exported"):
        sae_jax.load_pretrained(tmp_path)


def test_repr_says_what_was_loaded(sae, run_dir):
    assert repr(sae) == (f"PretrainedSAE(d={D}, num_latents={M}, num_experts={N}, k={K}, "
                         f"path='{run_dir / 'export'}')")  # fmt: skip


def test_cfg_json_carries_saelens_and_sparsify_names_and_old_exports_load(run_dir, tmp_path):
    meta = json.loads((run_dir / "export" / "cfg.json").read_text())
    assert (meta["d_in"], meta["d_sae"], meta["num_latents"], meta["k"], meta["d"]) == (
        D, M, M, K, D)  # fmt: skip
    old = tmp_path / "old"
    cfg = SAEConfig(d=D, num_latents=M, num_experts=N, k=K, k_aux=0).validate()
    export_sae(random_params(), cfg, old)
    meta = json.loads((old / "cfg.json").read_text())
    del meta["d_in"], meta["d_sae"]
    (old / "cfg.json").write_text(json.dumps(meta))
    assert sae_jax.load_pretrained(old).cfg.num_latents == M


@pytest.mark.parametrize(
    "x, got",
    [
        (np.zeros((10, D // 2), np.float32), f"(10, {D // 2})"),
        (np.zeros(D + 1, np.float32), f"({D + 1},)"),
        (np.float32(1.0), "()"),
        (np.zeros((10, D), np.int32), f"(10, {D}) (int32)"),
        (np.zeros((10, D), np.complex64), f"(10, {D}) (complex64)"),
    ],
    ids=["wrong-d", "wrong-d-vector", "scalar", "int", "complex"],
)
def test_bad_input_is_a_one_line_value_error_with_the_expected_shape(sae, x, got):
    expected = f"expected float activations of shape [..., {D}] (d = {D}), got {got}"
    for method in (sae.encode, sae.route, sae):
        with pytest.raises(ValueError) as e:
            method(x)
        assert str(e.value) == expected


def test_leading_axes_one_token_and_zero_tokens(sae):
    x = np.random.default_rng(1).normal(size=(2, 5, D)).astype(np.float32)
    flat = sae.encode(x.reshape(10, D))
    codes = sae.encode(x)
    assert codes.values.shape == codes.indices.shape == (2, 5, K)
    assert codes.expert.shape == codes.gate.shape == (2, 5)
    for a, b in zip(codes, flat, strict=True):
        if b is None:  # latent_gate: only with several experts per token or a shared dictionary
            assert a is None
            continue
        np.testing.assert_array_equal(np.asarray(a).reshape(b.shape), b)
    x_hat = sae.decode(codes)
    assert x_hat.shape == (2, 5, D)
    np.testing.assert_allclose(x_hat.reshape(10, D), sae.decode(flat), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(sae(x), x_hat, rtol=1e-6, atol=1e-6)
    r = sae.route(x)
    assert r.probs.shape == (2, 5, N) and r.expert.shape == r.gate.shape == (2, 5)

    one = sae.encode(x[1, 2])  # [d]: one token, no leading axis (as SAELens)
    assert one.values.shape == (K,) and one.expert.shape == one.gate.shape == ()
    np.testing.assert_array_equal(one.indices, codes.indices[1, 2])
    assert sae(x[1, 2]).shape == (D,) and sae.route(x[1, 2]).probs.shape == (N,)

    for shape in [(0, D), (2, 0, D)]:
        empty = sae.encode(np.zeros(shape, np.float32))
        assert empty.values.shape == empty.indices.shape == shape[:-1] + (K,)
        assert empty.expert.shape == empty.gate.shape == shape[:-1]
        assert sae.decode(empty).shape == shape and sae(np.zeros(shape)).shape == shape
        assert sae.route(np.zeros(shape, np.float32)).probs.shape == shape[:-1] + (N,)


def test_varying_batch_lengths_compile_a_few_times(sae):
    rng = np.random.default_rng(2)
    before = pretrained._encode._cache_size()
    for tokens in (100, 101, 120, 1000, 1001):
        x = rng.normal(size=(tokens, D)).astype(np.float32)
        codes = sae.encode(x)
        unpadded = jax.jit(sae.encode)(x)  # traced: encodes exactly these tokens, no padding
        np.testing.assert_array_equal(codes.indices, unpadded.indices)
        np.testing.assert_array_equal(codes.expert, unpadded.expert)
        np.testing.assert_allclose(codes.values, unpadded.values, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(codes.gate, unpadded.gate, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(sae.decode(codes), sae.decode(unpadded), rtol=1e-6, atol=1e-6)
    assert pretrained._encode._cache_size() - before <= 2
    assert [pretrained.bucket(t) for t in (0, 100, 128, 129, 192, 193, 1000, 1001)] == [
        128, 128, 128, 192, 192, 256, 1024, 1024]  # fmt: skip


def test_unknown_macro_or_parameter_says_the_closest_name():
    with pytest.raises(ConfigError, match=r"unknown macro 'STEPZ' \(did you mean STEPS\?\)"):
        parse([], ["STEPZ=10"])
    with pytest.raises(ConfigError, match=r"\(did you mean TrainConfig.steps\?\)"):
        parse([], ["TrainConfig.stepz=10"])
    with pytest.raises(ConfigError, match=r"\(did you mean TrainConfig.steps\?\)"):
        parse([], ["TrainConfg.steps=10"])


def test_train_help_lists_the_values_a_plain_run_uses():
    text = macro_help()
    assert "configs/default.gin" in text
    assert "STEPS = 1500" in text and "NUM_EXPERTS = 4" in text and "K = 8 " in text


def test_browse_says_how_many_tokens_it_really_encodes(run_dir, tmp_path):
    from data_utils import write_dataset

    from sae_jax.browser import build_browser

    write_dataset(tmp_path / "acts", [300, 115], d=D)
    said = []
    build_browser(run_dir, str(tmp_path / "acts"), tokens=65536, batch_size=256,
                  use_model=False, duplicates=False, log=said.append)  # fmt: skip
    assert said[0] == f"browse: encoding 415 tokens with {M} latents"
