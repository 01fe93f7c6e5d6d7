"""SAEBench's core metrics (sae_jax/evaluation/saebench.py, lm_loss.py) against SAELens's own
code on the same SAE and the same activations, and in launch.eval and a run's final eval."""

import json

import numpy as np
import pytest

from sae_jax.evaluation.analysis import EvalAccumulator
from sae_jax.evaluation.saebench import NAMES, PREFIX, max_cosines, weight_metrics
from sae_jax.pretrained import PretrainedSAE

D, LATENTS, K = 16, 48, 4
HOOK = "blocks.1.hook_resid_post"
REL = 1e-4
WITHOUT_LM = set(NAMES) - {"kl_div_score", "ce_loss_score"}  # the LM's need text and a model


def sae_lens_topk(d: int = D, latents: int = LATENTS, k: int = K, seed: int = 0):
    """A SAELens TopKSAE with random unit encoder columns, the decoder their transpose (so it
    reconstructs part of x), random biases, and some latents pushed dead (b_enc far below the
    others) so that frac_alive is below 1."""
    torch = pytest.importorskip("torch")
    sae_lens = pytest.importorskip("sae_lens")
    cfg = sae_lens.TopKSAEConfig(d_in=d, d_sae=latents, k=k, dtype="float32", device="cpu")
    cfg.metadata.hook_name = HOOK
    torch.manual_seed(seed)
    sae = sae_lens.TopKSAE(cfg)
    with torch.no_grad():
        sae.W_enc.normal_()
        sae.W_enc /= sae.W_enc.norm(dim=0)
        sae.W_dec.copy_(sae.W_enc.T)
        sae.b_enc.normal_(std=0.1)
        sae.b_enc[: latents // 8] = -100.0
        sae.b_dec.normal_()
    return sae


def ours(sae) -> PretrainedSAE:
    """The same weights in our native layout (one expert)."""
    w_enc, w_dec = sae.W_enc.detach().numpy(), sae.W_dec.detach().numpy()
    tensors = {"w_enc": w_enc.T[None].copy(), "b_enc": sae.b_enc.detach().numpy()[None],
               "w_dec": w_dec[None].copy(), "b_dec": sae.b_dec.detach().numpy()}  # fmt: skip
    meta = {"d": w_enc.shape[0], "num_latents": w_enc.shape[1], "num_experts": 1,
            "k": sae.cfg.k}  # fmt: skip
    return PretrainedSAE(tensors, meta)


class TokenStore:
    """What sae_lens.evals calls on an ActivationsStore: fixed batches of token ids."""

    def __init__(self, batches):
        self.batches = iter(batches)

    def get_batch_tokens(self, prompts):
        return next(self.batches)


class LookupModel:
    """What get_sparsity_and_variance_metrics calls on a model: its hook activation is row
    `token id` of a fixed table [tokens, d]."""

    def __init__(self, table):
        self.table = table

    def run_with_cache(self, tokens, **kwargs):
        return None, {HOOK: self.table[tokens]}


def test_per_token_metrics_equal_sae_lens():
    torch = pytest.importorskip("torch")
    from sae_lens.evals import get_sparsity_and_variance_metrics
    from sae_lens.training.activation_scaler import ActivationScaler

    sae = sae_lens_topk()
    gen = torch.Generator().manual_seed(1)
    table = torch.randn(3 * 2 * 8, D, generator=gen) + sae.b_dec.detach()
    batches = list(torch.arange(len(table)).reshape(3, 2, 8))  # 3 batches of 2 prompts x 8
    ignored = [0, 5, 21, 40]  # "special tokens": masked out by SAELens, outliers (keep) by us
    theirs, features = get_sparsity_and_variance_metrics(
        sae, LookupModel(table), TokenStore(batches), ActivationScaler(), n_batches=3,
        compute_l2_norms=True, compute_sparsity_metrics=True, compute_variance_metrics=True,
        compute_featurewise_density_statistics=True, eval_batch_size_prompts=2,
        model_kwargs={}, ignore_tokens=ignored,
    )  # fmt: skip
    density = np.asarray(features["feature_density"])
    theirs |= {  # SAEBench's calculate_misc_metrics on SAELens's densities
        "frac_alive": np.mean(density > 0),
        "freq_over_1_percent": np.mean(density > 0.01),
        "freq_over_10_percent": np.mean(density > 0.1),
    }
    # relative_reconstruction_bias is SAELens's per batch: ours per 16 tokens too, though
    # added 24 at a time
    acc = EvalAccumulator(ours(sae), capacity_factor=None, saebench_batch=16)
    flat = torch.cat(batches).reshape(-1)
    for part in flat.reshape(2, 24):
        acc.add(table[part].numpy(), ~np.isin(part.numpy(), ignored))
    result = acc.finish()
    mine = result["saebench"]
    assert 0 < mine["frac_alive"] < 1 and 0 < mine["freq_over_10_percent"] < 1
    assert 0.1 < mine["explained_variance"] < 0.99  # neither trivial nor perfect
    for name in WITHOUT_LM - {n for n in NAMES if "max" in n}:
        assert mine[name] == pytest.approx(theirs[name], rel=REL), name
    # pooled over the same kept tokens, SAELens's explained_variance is 1 - our FVU
    assert mine["explained_variance"] == pytest.approx(1 - result["fvu_dropless"], rel=1e-9)


def _reference_max_cosines(w):
    """The full [M, M] cosine matrix, its diagonal left out: each row's max."""
    torch = pytest.importorskip("torch")
    unit = torch.nn.functional.normalize(torch.as_tensor(np.asarray(w)).double(), dim=1)
    sims = unit @ unit.T
    sims.fill_diagonal_(-float("inf"))
    return sims.max(dim=1).values.numpy()


def test_weight_metrics_equal_the_full_cosine_matrix_of_a_sae_lens_sae():
    sae = sae_lens_topk()
    got = weight_metrics(ours(sae), chunk=7, tile=10)  # neither divides M = 48
    W_enc, W_dec = sae.W_enc.detach().numpy(), sae.W_dec.detach().numpy()
    expect_enc = _reference_max_cosines(W_enc.T).mean()  # SAELens: W_enc [d, M], columns
    expect_dec = _reference_max_cosines(W_dec).mean()
    assert got["average_max_encoder_cosine_sim"] == pytest.approx(expect_enc, rel=REL)
    assert got["average_max_decoder_cosine_sim"] == pytest.approx(expect_dec, rel=REL)


def switch_sae(seed: int = 0) -> PretrainedSAE:
    """N = 3 experts of 8 latents and a shared dictionary of 4, d = 6; decoder row 2 of
    expert 2 repeats row 5 of expert 0 (times 3): their max cosine is 1."""
    rng = np.random.default_rng(seed)
    n, lat, d, s = 3, 8, 6, 4
    t = {"w_enc": rng.normal(size=(n, lat, d)), "b_enc": rng.normal(size=(n, lat)),
         "w_dec": rng.normal(size=(n, lat, d)), "b_dec": rng.normal(size=d),
         "w_router": rng.normal(size=(d, n)), "b_router": np.zeros(d),
         "shared_w_enc": rng.normal(size=(s, d)), "shared_b_enc": np.zeros(s),
         "shared_w_dec": rng.normal(size=(s, d))}  # fmt: skip
    t["w_dec"][2, 2] = 3 * t["w_dec"][0, 5]
    t = {k: v.astype(np.float32) for k, v in t.items()}
    meta = {"d": d, "num_latents": n * lat, "num_experts": n, "k": 3, "shared_latents": s,
            "shared_k": 1}  # fmt: skip
    return PretrainedSAE(t, meta)


def test_chunked_max_cosines_equal_unchunked_over_every_expert_and_the_shared_latents():
    sae = switch_sae()
    rows = np.concatenate([np.asarray(sae.params["w_dec"]).reshape(-1, 6),
                           np.asarray(sae.params["shared_w_dec"])])  # fmt: skip
    full = _reference_max_cosines(rows)
    for chunk, tile in ((1, 1), (5, 3), (5, 28), (28, 11), (None, None)):
        got = max_cosines(rows, chunk, tile)
        np.testing.assert_allclose(got, full, rtol=1e-5, atol=1e-6, err_msg=f"{chunk} {tile}")
    assert full[2 * 8 + 2] == pytest.approx(1.0) and full[5] == pytest.approx(1.0)
    got = weight_metrics(sae, chunk=5, tile=6)
    assert got["average_max_decoder_cosine_sim"] == pytest.approx(full.mean(), rel=1e-5)


class HookedLM:
    """What get_recons_loss calls on a HookedRootModule, over a Hugging Face causal LM whose
    block output is the hook point: logits [B, S, V] and per-token loss [B, S - 1]."""

    def __init__(self, model, block):
        self.model, self.block = model, block

    def __call__(self, tokens, return_type="both", loss_per_token=True, **kwargs):
        return self._run(tokens, None)

    def run_with_hooks(self, tokens, return_type, fwd_hooks, loss_per_token, **kwargs):
        ((_, fn),) = fwd_hooks
        return self._run(tokens, fn)

    def _run(self, tokens, fn):
        import torch.nn.functional as F

        def hook(module, inputs, output):
            if isinstance(output, tuple):
                return (fn(output[0], None), *output[1:])
            return fn(output, None)

        handle = self.block.register_forward_hook(hook) if fn else None
        try:
            logits = self.model(tokens).logits.float()
        finally:
            if handle:
                handle.remove()
        ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none")
        return logits, ce


def test_kl_and_ce_scores_equal_sae_lens_on_a_small_lm(tiny_model, text):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    from sae_lens.evals import get_downstream_reconstruction_metrics
    from sae_lens.training.activation_scaler import ActivationScaler

    from sae_jax.data.dumper import find_blocks, token_sequences
    from sae_jax.evaluation.lm_loss import loss_recovered

    tok = transformers.AutoTokenizer.from_pretrained(tiny_model)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    with torch.no_grad():  # peaked next-token distributions: the random LM's are near uniform
        model.lm_head.weight *= 30
    seqs = list(token_sequences(tok, text[:1], 12))[:6]  # one file: BOS at position 0 only
    block = find_blocks(model)[1]
    d = model.config.hidden_size
    sae = sae_lens_topk(d=d, latents=64, k=8)
    with torch.no_grad():
        sae.b_dec.zero_()
    batches = list(torch.tensor(seqs).reshape(2, 3, -1))
    theirs = get_downstream_reconstruction_metrics(
        sae, HookedLM(model, block), TokenStore(batches), ActivationScaler(), compute_kl=True,
        compute_ce_loss=True, n_batches=2, eval_batch_size_prompts=3,
        ignore_tokens=[tok.bos_token_id],
    )  # fmt: skip
    mine = ours(sae)
    got = loss_recovered(model, block, seqs, lambda h: np.asarray(mine(h)), batch_size=3)
    got = got["saebench"]
    assert 0.05 < got["ce_loss_score"] < 0.95 and got["kl_div_with_ablation"] > 0
    for name, value in theirs.items():
        assert got[name] == pytest.approx(value, rel=REL), name


def test_final_eval_row_and_launch_eval_report_the_same_saebench_metrics(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from launch import eval as eval_cli
    from launch import train as train_cli

    run = tmp_path / "run"
    assert train_cli.main([
        f"--workdir={run}", "--gin.STEPS=4", "--gin.BATCH_SIZE=128", "--gin.NUM_LATENTS=64",
        "--gin.NUM_EXPERTS=4", "--gin.K=4", "--gin.LOG_EVERY=2", "--gin.SAEConfig.k_aux=8",
        "--gin.TrainConfig.eval_tokens=256", "--no_progress",
    ]) == 0  # fmt: skip
    assert "saebench/explained_variance=" in capsys.readouterr().out  # the final line
    row = [json.loads(line) for line in (run / "metrics.jsonl").open()][-1]
    event_tags = EventAccumulator(str(run)).Reload().Tags()["scalars"]
    assert {PREFIX + n for n in WITHOUT_LM} <= set(event_tags)  # TensorBoard has them too
    args = ["--workdir", str(run), "--batch_size", "128", "--tokens", "256", "--no_plots"]
    assert eval_cli.main(args) == 0
    assert "SAEBench core metrics" in capsys.readouterr().out
    report = json.loads((run / "eval.json").read_text())
    for name in WITHOUT_LM:  # no LM on synthetic data
        # the same exported SAE on the same tokens in batches of the same size
        assert row[PREFIX + name] == pytest.approx(report["saebench"][name], rel=1e-6), name
    assert report["saebench"]["explained_variance"] == pytest.approx(
        1 - report["fvu_dropless"], rel=1e-6
    )


def test_switch_coefficients_are_those_of_the_decoder_rows():
    """For a Switch SAE (gates) with a shared dictionary, l0 and l1 count the coefficients a
    with x_hat = sum_j a_j W_dec[id_j] + b_dec over all latents' rows (global ids)."""
    from sae_jax.evaluation.saebench import SaebenchSums, all_latent_rows, latent_coefficients

    sae = switch_sae()
    x = np.random.default_rng(1).normal(size=(40, 6)).astype(np.float32)
    codes = sae.encode(x)
    a, ids = latent_coefficients(codes), np.asarray(codes.indices)
    rows = np.asarray(all_latent_rows(sae, "w_dec"), np.float64)
    x_hat = np.asarray(sae.decode(codes))
    rebuilt = np.einsum("tk,tkd->td", a, rows[ids]) + np.asarray(sae.params["b_dec"])
    np.testing.assert_allclose(rebuilt, x_hat, rtol=1e-4, atol=1e-5)
    assert np.any(ids >= sae.cfg.num_latents)  # shared latents among them
    sums = SaebenchSums(rows.shape[0])
    sums.add(x, x_hat, a, ids)
    got = sums.finish()
    assert got["l1"] == pytest.approx(np.abs(a).sum() / len(x))
    assert got["l0"] == pytest.approx(np.count_nonzero(a) / len(x))
