"""launch.eval: each metric on a hand-computed case, loss recovered, plots."""

import json
import math

import numpy as np
import pytest
from data_utils import write_dataset

from launch import eval as eval_cli
from launch import train as train_cli
from sae_jax.evaluation.analysis import (
    EvalAccumulator,
    dropped_at_capacity,
    feature_duplication,
    router_entropy,
)
from sae_jax.pretrained import PretrainedSAE


def test_dropped_at_capacity():
    expert = np.array([0, 0, 0, 1, 2, 2])
    assert dropped_at_capacity(expert, 3, 1.0) == 1  # C = 2: the third token of expert 0
    assert dropped_at_capacity(expert, 3, 0.5) == 3  # C = 1
    assert dropped_at_capacity(expert, 1, 0.1) == 0


def test_router_entropy():
    probs = np.array([[0.25] * 4, [1.0, 0, 0, 0]])
    np.testing.assert_allclose(router_entropy(probs), [math.log(4), 0.0], atol=1e-12)


def test_feature_duplication():
    e = np.eye(4)
    near = np.array([0.89, math.sqrt(1 - 0.89**2), 0, 0])  # cosine 0.89 with e[0]
    w_dec = np.stack([np.stack([e[0], e[1]]), np.stack([2 * e[0], e[2]]), np.stack([near, e[3]])])
    # e[0] rows of experts 0 and 1 duplicate each other; `near` (0.89) does not count.
    assert feature_duplication(w_dec) == pytest.approx(2 / 6)
    assert feature_duplication(w_dec[:1]) == 0.0
    same_expert = np.stack([np.stack([e[0], e[0]]), np.stack([e[1], e[2]])])
    assert feature_duplication(same_expert) == 0.0  # duplicates inside one expert are not counted


def identity_sae() -> PretrainedSAE:
    """N = 1, d = 2, three latents (the third never fires), k = 1."""
    w_enc = np.array([[[1.0, 0], [0, 1], [0, 0]]], np.float32)
    tensors = {"w_enc": w_enc, "b_enc": np.zeros((1, 3), np.float32), "w_dec": w_enc.copy(),
               "b_dec": np.zeros(2, np.float32)}  # fmt: skip
    meta = {"d": 2, "num_latents": 3, "num_experts": 1, "k": 1, "input_scale": 0.5}
    return PretrainedSAE(tensors, meta)


def test_accumulator_against_hand_computed_values():
    x = np.array([[3.0, 1.0], [0.0, 2.0], [1.0, 0.0]], np.float32)
    # TopK-1 keeps the larger coordinate: x_hat = [3, 0], [0, 2], [1, 0]; errors 1, 0, 0.
    acc = EvalAccumulator(identity_sae(), capacity_factor=1.0, input_scale=0.5)
    acc.add(x[:2], np.array([False, True]))
    acc.add(x[2:])
    r = acc.finish()
    total_var_all = np.sum((x - x.mean(0)) ** 2)
    kept = x[1:]
    assert r["fvu_dropless_with_outliers"] == pytest.approx(1 / total_var_all)
    assert r["fvu_dropless"] == pytest.approx(0.0) and np.sum((kept - kept.mean(0)) ** 2) > 0
    assert r["mse_raw"] == 0.0 and r["outlier_fraction"] == pytest.approx(1 / 3)
    assert r["l0"] == 1.0
    assert r["latent_frequency"] == pytest.approx([2 / 3, 1 / 3, 0])
    assert r["dead_fraction"] == pytest.approx(1 / 3)
    assert r["dense_fraction"] == pytest.approx(2 / 3)
    assert r["expert_load"] == [1.0] and r["drop_fraction"] == 0.0
    assert r["feature_duplication"] == 0.0


def test_mse_is_reported_in_training_units():
    x = np.array([[3.0, 1.0]], np.float32)
    r = EvalAccumulator(identity_sae(), 1.0, input_scale=0.5)
    r.add(x)
    out = r.finish()
    assert out["mse_raw"] == pytest.approx(0.5)  # error 1 over d = 2
    assert out["mse"] == pytest.approx(0.5 * 0.25)


def test_loss_recovered_is_one_for_exact_and_zero_for_ablation(tiny_model, text):
    transformers = pytest.importorskip("transformers")
    from sae_jax.data.dumper import find_blocks, token_sequences
    from sae_jax.evaluation.lm_loss import loss_recovered

    tok = transformers.AutoTokenizer.from_pretrained(tiny_model)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    seqs = list(token_sequences(tok, text, 16))[:6]
    block = find_blocks(model)[1]
    exact = loss_recovered(model, block, seqs, lambda h: h.copy())
    assert exact["loss_recovered"] == pytest.approx(1.0, abs=1e-6)
    assert exact["delta_ce"] == pytest.approx(0.0, abs=1e-6)
    assert exact["ce_zero"] != exact["ce_clean"]
    ablated = loss_recovered(model, block, seqs, np.zeros_like)
    assert ablated["loss_recovered"] == pytest.approx(0.0, abs=1e-6)
    # With a splice mask (outliers kept clean) the figures with every position spliced come too.
    every_other = lambda h: np.arange(len(h)) % 2 == 0  # noqa: E731
    half = loss_recovered(model, block, seqs, np.zeros_like, every_other)
    assert half["loss_recovered"] == pytest.approx(0.0, abs=1e-6)
    assert half["ce_zero_with_outliers"] == pytest.approx(exact["ce_zero"])
    assert half["ce_zero"] != pytest.approx(exact["ce_zero"])  # only half the positions zeroed
    assert half["loss_recovered_with_outliers"] == pytest.approx(0.0, abs=1e-6)


def test_eval_cli_writes_json_table_and_plots(tmp_path, capsys):
    write_dataset(tmp_path / "train", [600, 600], d=16, outliers=4, ids=False)
    write_dataset(tmp_path / "eval", [512], d=16, outliers=2, seed=1, ids=False)
    code = train_cli.main([
        f"--workdir={tmp_path / 'run'}", f"--gin.TRAIN_DATA='{tmp_path / 'train'}'",
        f"--gin.EVAL_DATA='{tmp_path / 'eval'}'", "--gin.STEPS=6", "--gin.BATCH_SIZE=128",
        "--gin.NUM_LATENTS=64", "--gin.NUM_EXPERTS=4", "--gin.K=4", "--gin.LOG_EVERY=2",
        "--gin.TrainConfig.eval_tokens=256", "--gin.SAEConfig.k_aux=8",
        "--gin.ActivationData.shuffle_buffer=256", "--gin.ActivationData.chunk_tokens=32",
        "--no_progress",
    ])  # fmt: skip
    assert code == 0
    run = tmp_path / "run"
    args = ["--workdir", str(run), "--data", str(tmp_path / "eval"), "--batch_size", "256"]
    assert eval_cli.main(args) == 0
    out = capsys.readouterr().out
    assert "skipped (the manifest names no model" in out and "feature_duplication" in out
    result = json.loads((run / "eval.json").read_text())
    assert result["tokens"] == 512 and len(result["expert_load"]) == 4
    assert 0 < result["fvu_dropless"] < 1
    assert result["fvu_dropless_with_outliers"] != result["fvu_dropless"]
    last = [json.loads(line) for line in (run / "metrics.jsonl").open()][-1]
    # no capacity here, 2% drops at the eval capacity in training
    assert result["fvu_dropless"] == pytest.approx(last["eval/fvu"], rel=0.05)
    assert result["capacity_factor"] == 2.0  # the run's EVAL_CAPACITY_FACTOR
    for name in ("training_curves.png", "expert_load.png", "latent_frequency.png"):
        assert (run / name).stat().st_size > 5000, name
    (tmp_path / "nothing").mkdir()  # a directory without export/ (a missing one: test_api_safety)
    assert eval_cli.main(["--workdir", str(tmp_path / "nothing"), "--data", "x"]) == 2
    assert "no exported SAE" in capsys.readouterr().err
