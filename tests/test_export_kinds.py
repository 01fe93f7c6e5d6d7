"""Export and pretrained inference of the threshold kinds (ACTIVATION batchtopk, matryoshka,
jumprelu): the exported SAE computes the module's mode='infer', in both export forms."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_model
from flax import nnx

from sae_jax.config import SAEConfig
from sae_jax.export import export_sae
from sae_jax.mesh import make_mesh
from sae_jax.pretrained import load_pretrained

D, SCALE, CAP = 16, 1.7, 6  # input scale folded into the export; k' (below L: the cap bites)
KINDS = ("batchtopk", "matryoshka", "jumprelu")


def config(kind: str, n: int, **extra) -> SAEConfig:
    extra = {"k_max": CAP, **extra}
    return SAEConfig(d=D, num_latents=64, num_experts=n, k=4, activation=kind, **extra).validate()


def model_of(cfg: SAEConfig, seed: int = 0):
    """A random model with random thresholds: JumpReLU's per latent, BatchTopK's scalar."""
    with jax.set_mesh(make_mesh((1, 1))):
        model = random_model(cfg, seed)
    rng = np.random.default_rng(seed + 7)
    if hasattr(model, "log_threshold"):
        theta = rng.uniform(0.05, 0.6, size=model.log_threshold.shape)
        model.log_threshold[...] = jnp.asarray(np.log(theta), jnp.float32)
    if hasattr(model, "batch_threshold"):
        model.batch_threshold[...] = jnp.float32(0.3)
    return model


def params_of(model) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in nnx.to_pure_dict(nnx.state(model)).items()}


def inputs(tokens: int = 300, seed: int = 3) -> np.ndarray:
    """Raw activations (the model takes SCALE x them)."""
    return np.random.default_rng(seed).normal(size=(tokens, D)).astype(np.float32)


def infer(model, x: np.ndarray):
    """The module's inference on raw x, no token dropped (capacity for every token)."""
    with jax.set_mesh(make_mesh((1, 1))):
        return _infer(model, jnp.asarray(SCALE * x), float(model.cfg.num_experts))


@functools.partial(nnx.jit, static_argnums=2)
def _infer(model, x: jax.Array, capacity_factor: float):
    return model(x, mode="infer", capacity_factor=capacity_factor)


def reference_codes(params: dict, cfg: SAEConfig, x: np.ndarray, expert, gate):
    """Dense codes [T, M] of the 'jump' rule in numpy (float64), in model units: of each
    token's routed expert, the k' largest pre - threshold, pre where pre > threshold; the
    batch kinds' threshold is on gated values, so theirs is threshold / gate on pre."""
    if "log_threshold" in params:
        theta = np.exp(params["log_threshold"].astype(np.float64))
    else:
        theta = np.full(params["b_enc"].shape, float(params["batch_threshold"]))
    lat = cfg.latents_per_expert
    out = np.zeros((len(x), cfg.num_latents))
    for t, e in enumerate(expert):
        pre = params["w_enc"][e].astype(np.float64) @ (SCALE * x[t] - params["b_dec"])
        pre = pre + params["b_enc"][e]
        th = theta[e] / float(gate[t]) if cfg.kind.batch else theta[e]
        top = np.argsort(-(pre - th), kind="stable")[: cfg.candidates_per_row]
        keep = top[pre[top] > th[top]]
        out[t, e * lat + keep] = pre[keep]
    return out


def dense(codes, width: int) -> np.ndarray:
    """Codes as [T, width] ungated values."""
    out = np.zeros((codes.values.shape[0], width), np.float32)
    np.put_along_axis(out, np.asarray(codes.indices), np.asarray(codes.values), axis=1)
    return out


@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize("kind", KINDS)
def test_export_computes_the_modules_inference(tmp_path, kind, n):
    cfg = config(kind, n)
    model = model_of(cfg, seed=n)
    params = params_of(model)
    sae = load_pretrained(export_sae(params, cfg, tmp_path / "native", SCALE))
    meta = json.loads((tmp_path / "native/cfg.json").read_text())
    assert (meta["activation"], meta["k_max"]) == (kind, CAP) and sae.cfg.candidates_per_row == CAP
    assert sae.params["threshold"].shape == (n, cfg.latents_per_expert)
    x = inputs()
    out, codes = infer(model, x), sae.encode(x)
    assert codes.values.shape == (len(x), CAP)  # k' codes per token
    np.testing.assert_array_equal(codes.expert, out.expert)
    np.testing.assert_allclose(sae.decode(codes), np.asarray(out.x_hat) / SCALE, atol=1e-5)
    got = dense(codes, cfg.num_latents)
    want = reference_codes(params, cfg, x, out.expert, out.gate)
    np.testing.assert_array_equal(got != 0, want != 0)  # the same latents (ids)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)  # the same values
    assert (got != 0).sum(axis=1).max() == CAP  # some tokens have more over threshold
    fired = np.bincount(np.asarray(codes.indices)[np.asarray(codes.values) > 0],
                        minlength=cfg.num_latents)  # fmt: skip
    np.testing.assert_array_equal(fired, np.asarray(out.fired).reshape(-1))
    assert float(out.l0_sum) == (got != 0).sum()


@pytest.mark.parametrize("kind", ["batchtopk", "jumprelu"])
def test_several_experts_per_token_and_a_shared_dictionary(tmp_path, kind):
    """e = 2 and a shared TopK dictionary: every routed row keeps its own codes (no global
    selection), gated, as the module's mode='infer'."""
    cfg = config(kind, 4, experts_per_token=2, shared_latents=16, shared_k=2)
    model = model_of(cfg, seed=2)
    sae = load_pretrained(export_sae(params_of(model), cfg, tmp_path / "n", SCALE))
    x = inputs()
    out, codes = infer(model, x), sae.encode(x)
    assert codes.values.shape == (len(x), 2 * CAP + 2)
    np.testing.assert_allclose(sae.decode(codes), np.asarray(out.x_hat) / SCALE, atol=1e-5)
    assert float(out.l0_sum) == int((np.asarray(codes.values) > 0).sum())


def test_sharded_export_holds_the_thresholds_by_expert(tmp_path):
    cfg = config("jumprelu", 4)
    params = params_of(model_of(cfg))
    single = load_pretrained(export_sae(params, cfg, tmp_path / "single", SCALE))
    sharded = export_sae(params, cfg, tmp_path / "sharded", SCALE, max_file_bytes=2 * 16 * 140)
    index = json.loads((sharded / "sae.safetensors.index.json").read_text())["tensors"]
    assert [p["experts"] for p in index["threshold"]["parts"]] == [
        p["experts"] for p in index["w_enc"]["parts"]
    ]
    assert len(index["threshold"]["parts"]) > 1 and "log_threshold" not in index
    again = load_pretrained(sharded)
    for name, value in single.params.items():
        np.testing.assert_array_equal(again.params[name], value, err_msg=name)
    np.testing.assert_allclose(single.params["threshold"], np.exp(params["log_threshold"]), 1e-6)


@pytest.mark.parametrize("kind", ["batchtopk", "jumprelu"])
def test_thresholds_stay_split_over_the_experts(tmp_path, kind):
    """Parameters split over 4 devices' 'expert' axis: the thresholds [N, L] come out sharded
    as b_enc (the BatchThreshold filled on each device, exp(log_threshold) where it lies),
    and the sharded export written from the shards is the one of the whole arrays."""
    from sae_jax.export import inference_params

    cfg = config(kind, 4)
    params = params_of(model_of(cfg))
    split = jax.sharding.NamedSharding(make_mesh((1, 4)), jax.P("expert"))
    on_mesh = {k: jax.device_put(v, split) if k in ("w_enc", "b_enc", "w_dec", "log_threshold")
               else v for k, v in params.items()}  # fmt: skip
    got = inference_params(on_mesh)
    assert {"batch_threshold", "log_threshold"}.isdisjoint(got)
    assert got["threshold"].sharding.is_equivalent_to(split, 2)
    assert {s.data.shape for s in got["threshold"].addressable_shards} == {(1, 16)}
    if kind == "batchtopk":
        np.testing.assert_array_equal(got["threshold"], np.full((4, 16), 0.3, np.float32))
    small = 2 * 16 * 140  # two experts' tensors per file at most
    whole = load_pretrained(export_sae(params, cfg, tmp_path / "whole", SCALE,
                                       max_file_bytes=small))  # fmt: skip
    sharded = load_pretrained(export_sae(on_mesh, cfg, tmp_path / "split", SCALE,
                                         max_file_bytes=small))  # fmt: skip
    for name, value in whole.params.items():
        np.testing.assert_array_equal(sharded.params[name], value, err_msg=name)


def gated(codes, width: int) -> np.ndarray:
    """Codes as [T, width] gated values (SAELens's feature activations)."""
    gate = codes.latent_gate if codes.latent_gate is not None else codes.gate[:, None]
    out = np.zeros((codes.values.shape[0], width), np.float32)
    values = np.asarray(codes.values) * np.asarray(gate)
    np.put_along_axis(out, np.asarray(codes.indices), values, axis=1)
    return out


def saelens_of(tmp_path, cfg: SAEConfig, seed: int = 0):
    """(the module, our export, SAELens's load of its SAELens form)."""
    pytest.importorskip("sae_lens")
    from sae_lens import SAE

    from sae_jax.interop.formats import convert

    model = model_of(cfg.validate(), seed)
    native = export_sae(params_of(model), cfg, tmp_path / "native", SCALE)
    return (
        model,
        load_pretrained(native),
        SAE.load_from_disk(convert(native, "saelens", tmp_path / "saelens")),
    )


@pytest.mark.parametrize("kind", KINDS)
def test_a_plain_threshold_kind_is_saelens_jumprelu(tmp_path, kind):
    """N = 1 as SAELens's own JumpReLU (the form it saves BatchTopK and Matryoshka in): its
    encode and decode are the module's mode='infer' when k' caps nothing (k_max = L)."""
    torch = pytest.importorskip("torch")
    cfg = SAEConfig(d=D, num_latents=64, num_experts=1, k=4, k_max=64, activation=kind)
    model, ours, sae = saelens_of(tmp_path, cfg)
    assert type(sae).__name__ == "JumpReLUSAE" and sae.cfg.architecture() == "jumprelu"
    assert_saelens_computes_as_ours(torch, sae, ours, model, cfg.num_latents)


@pytest.mark.parametrize("name", ["jumprelu_capped", "batchtopk_top2_shared", "jumprelu_switch"])
def test_saelens_form_reads_back_bitwise(tmp_path, name):
    """Our SAELens directory read by load_pretrained is the same SAE (k' restored from the
    metadata): every tensor, the config, the codes."""
    from sae_jax.interop.formats import convert

    cfg = {"jumprelu_capped": config("jumprelu", 1),
           "batchtopk_top2_shared": config("batchtopk", 4, experts_per_token=2,
                                           shared_latents=16, shared_k=2),
           "jumprelu_switch": config("jumprelu", 4)}[name]  # fmt: skip
    native = export_sae(params_of(model_of(cfg)), cfg, tmp_path / "native", SCALE)
    ours = load_pretrained(native)
    back = load_pretrained(convert(native, "saelens", tmp_path / "saelens"))
    assert sorted(back.params) == sorted(ours.params) and back.cfg == ours.cfg
    for key, value in ours.params.items():
        np.testing.assert_array_equal(back.params[key], value, err_msg=key)
    x = inputs(128)
    np.testing.assert_array_equal(back(x), ours(x))


@pytest.mark.parametrize("name", ["jumprelu", "batchtopk_top2_shared"])
def test_a_threshold_switch_in_saelens_computes_as_load_pretrained(tmp_path, name):
    torch = pytest.importorskip("torch")
    pytest.importorskip("sae_lens")
    from sae_jax.interop.saelens import SwitchSAE

    cfg = config("jumprelu", 4) if name == "jumprelu" else config(
        "batchtopk", 4, experts_per_token=2, shared_latents=16, shared_k=2)  # fmt: skip
    model, ours, sae = saelens_of(tmp_path, cfg, seed=1)
    assert isinstance(sae, SwitchSAE) and sae.threshold.shape == (cfg.dictionary_size,)
    assert_saelens_computes_as_ours(torch, sae, ours, model, cfg.dictionary_size)


def test_sparsify_refuses_a_threshold_kind_in_one_line(tmp_path):
    from sae_jax.interop.sparsify_files import write_sparsify

    cfg = config("matryoshka", 1)
    native = export_sae(params_of(model_of(cfg)), cfg, tmp_path / "native", SCALE)
    with pytest.raises(ValueError, match="ACTIVATION = 'matryoshka'; use --format saelens") as e:
        write_sparsify(native, tmp_path / "s")
    assert "\n" not in str(e.value) and not (tmp_path / "s").exists()


def test_evaluation_reports_the_achieved_l0(tmp_path):
    """launch.eval's l0 and saebench/l0 are the mean count of latents over threshold (the
    module's l0), not K."""
    from sae_jax.evaluation.analysis import EvalAccumulator

    cfg = config("jumprelu", 4)
    model = model_of(cfg)
    sae = load_pretrained(export_sae(params_of(model), cfg, tmp_path / "n", SCALE))
    x = inputs(512)
    acc = EvalAccumulator(sae, None, SCALE, saebench_batch=256)
    acc.add(x)
    result = acc.finish()
    l0 = float(infer(model, x).l0_sum) / len(x)
    assert result["l0"] == pytest.approx(l0) and result["saebench"]["l0"] == pytest.approx(l0)
    assert abs(l0 - cfg.k) > 0.5


def test_launch_export_eval_and_browse_a_batchtopk_run(tmp_path, capsys):
    """A run's checkpoint exported by launch.export (parameters alone, the BatchThreshold
    among them) is the export training wrote; SAELens form yes, sparsify no (one line);
    launch.eval's l0 is training's eval/l0 on the same tokens (not K); launch.browse runs."""
    from data_utils import TINY_TRAIN

    from launch import browse as browse_cli
    from launch import eval as eval_cli
    from launch import export as export_cli
    from launch import train as train_cli

    run = tmp_path / "run"
    args = [*TINY_TRAIN, "--gin.STEPS=10", "--gin.NUM_EXPERTS=1", "--gin.MESH_SHAPE=(1, 1)",
            "--gin.ACTIVATION='batchtopk'"]  # fmt: skip
    assert train_cli.main([f"--workdir={run}", *args]) == 0
    trained = load_pretrained(run / "export")
    assert export_cli.main([f"--workdir={run}", f"--out={tmp_path / 'again'}"]) == 0
    again = load_pretrained(tmp_path / "again")
    assert sorted(again.params) == sorted(trained.params) and again.cfg == trained.cfg
    for name, value in trained.params.items():
        np.testing.assert_array_equal(again.params[name], value, err_msg=name)
    theta = np.asarray(trained.params["threshold"])
    assert theta.min() == theta.max() > 0  # the BatchThreshold, for every latent
    assert export_cli.main([f"--workdir={run}", "--format=saelens"]) == 0
    cfg = json.loads((run / "export_saelens/cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu"
    capsys.readouterr()
    assert export_cli.main([f"--workdir={run}", "--format=sparsify"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ACTIVATION = 'batchtopk'" in err

    eval_args = ["--workdir", str(run), "--tokens", "512", "--batch_size", "256", "--no_lm",
                 "--no_plots"]  # fmt: skip
    assert eval_cli.main(eval_args) == 0
    result = json.loads((run / "eval.json").read_text())
    last = [json.loads(line) for line in (run / "metrics.jsonl").open()][-1]
    assert result["l0"] == pytest.approx(last["eval/l0"], rel=1e-5)
    assert result["saebench"]["l0"] == pytest.approx(result["l0"]) and result["l0"] != 4
    assert browse_cli.main(["--workdir", str(run), "--tokens", "512", "--batch_size", "256",
                            "--no_model", "--no_duplicates"]) == 0  # fmt: skip
    assert (run / "browser/index.html").is_file()


def assert_saelens_computes_as_ours(torch, sae, ours, model, width: int) -> None:
    """SAELens's encode and decode of `sae` equal our exported SAE's gated codes [T, width]
    and the module's mode='infer' reconstruction (in raw units)."""
    x = inputs()
    with torch.no_grad():
        acts = sae.encode(torch.from_numpy(x)).numpy()
        recon = sae.decode(torch.from_numpy(acts)).numpy()
    want = gated(ours.encode(x), width)
    np.testing.assert_array_equal(acts != 0, want != 0)
    np.testing.assert_allclose(acts, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(recon, np.asarray(infer(model, x).x_hat) / SCALE, atol=1e-5)
