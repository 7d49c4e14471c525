"""Sharding rules: flax's logical-axis resolution plus the project's divisibility rule, and the train state's
shardings (optimiser moments like their parameters)."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs.base import base_config
from facemae_jax import sharding, tasks, train
from facemae_jax.models import registry


def test_logical_rules_resolve_with_tuple_axes_and_replicate_what_does_not_divide():
    mesh = sharding.make_mesh(2, 4)
    rules = (("embed", ("fsdp", "data")), ("hidden", "fsdp"), ("norm", None))
    # rules apply in priority order and a mesh axis is used once per array: embed takes (fsdp, data) first, so
    # hidden's fsdp is no longer free, whichever dimension comes first
    assert sharding.spec_for(("embed", "hidden"), (64, 96), mesh, rules) == P(("fsdp", "data"), None)
    assert sharding.spec_for(("hidden", "embed"), (96, 64), mesh, rules) == P(None, ("fsdp", "data"))
    assert sharding.spec_for(("hidden",), (96,), mesh, rules) == P("fsdp")
    assert sharding.spec_for(("embed",), (12,), mesh, rules) == P(None)  # 12 % 8: replicated, not an error
    assert sharding.spec_for(("norm", "unknown"), (64, 64), mesh, rules) == P(None, None)
    with pytest.raises(ValueError, match="does not cover"):
        sharding.make_mesh(3, 1)


def test_state_shardings_follow_the_parameters_into_the_optimiser_state():
    config = base_config()
    config.model.name = "lgi_tiny_finetune"
    config.model.overrides = {"depth": 1}
    config.optim.trainable = ("fc_norm.", "head.")  # a linear probe: frozen groups hold optax MaskedNodes
    cfg = train.model_config(config)
    model = registry.create_model(cfg)
    abstract = registry.abstract_params(model)
    mesh = sharding.make_mesh(2, 4)
    param_sh = sharding.param_shardings(registry.logical_axes(model), abstract, mesh, config.sharding_rules)
    tx, *_ = train.schedule_and_optimizer(tasks.for_config(config, cfg), abstract, 10, 8)
    state_sh = sharding.state_shardings(tx, abstract, param_sh, mesh)
    state, _ = train.create_state(model, cfg, tx, mesh, config.sharding_rules, 0, None)
    got = jax.tree_util.tree_map(lambda x: x.sharding.spec, state)
    want = jax.tree_util.tree_map(lambda s: s.spec, state_sh)
    assert got == want
    head = param_sh["head"]["kernel"].spec
    mu = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(state["opt_state"])[0]
          if "mu" in jax.tree_util.keystr(path) and "head" in jax.tree_util.keystr(path) and "kernel" in
          jax.tree_util.keystr(path)]
    assert mu and all(m.sharding.spec == head for m in mu)
    assert any(s != P() for s in jax.tree_util.tree_leaves(got, is_leaf=lambda x: isinstance(x, P)))
    assert np.asarray(state["step"]) == 0
