"""Simulated CPU devices must be configured before jax is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

from sae_jax.config import SAEConfig  # noqa: E402
from sae_jax.mesh import make_mesh  # noqa: E402
from sae_jax.model import SwitchSAE  # noqa: E402


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


@pytest.fixture(autouse=True)
def _fresh_gin():
    """Gin bindings are global; no test sees another's."""
    import gin

    gin.clear_config()
    yield
    gin.clear_config()
