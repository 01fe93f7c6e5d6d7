"""sae_jax.varying: the mesh axes a value varies over inside shard_map, and marking them."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from sae_jax.mesh import AXES, make_mesh
from sae_jax.varying import sum_to_type, vary, vary_as, varying_axes, zeros_varying


def test_outside_shard_map_nothing_varies():
    x = jnp.ones(3)
    assert varying_axes(x) == () and vary(x, ()) is x and vary_as(x, x) is x


def test_marks_the_missing_axes_and_sums_a_gradient_back():
    """On a 2 x 4 mesh: a token shard varies over both axes, an expert shard over 'expert'
    only; marking adds 'data' (moving no data), and sum_to_type psums the extra axis away."""
    mesh = make_mesh((2, 4))

    def local(tokens, weights):
        seen = (varying_axes(tokens), varying_axes(weights))
        marked = vary_as(weights, tokens)
        acc = zeros_varying(weights.shape, weights.dtype, tokens) + weights
        summed = sum_to_type(marked, weights)  # psum over 'data': 2 x the weights
        assert seen == (AXES, ("expert",)) and varying_axes(marked) == AXES
        assert varying_axes(acc) == AXES and varying_axes(summed) == ("expert",)
        return summed

    tokens, weights = jnp.ones((8, 2)), jnp.arange(8.0).reshape(4, 2)
    specs = dict(in_specs=(P(AXES), P("expert")), out_specs=P("expert"))
    out = jax.shard_map(local, mesh=mesh, **specs)(tokens, weights)
    np.testing.assert_array_equal(out, 2 * weights)
