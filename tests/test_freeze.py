"""Freeze schedules: presets, phases, LLRD, re-warmup, and the trainer's phase machinery."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tljax import freeze, optim, sharding, train, tree
from tljax.config import ConfigError
from tljax.models import classifier, lora
from tljax.tasks.classification import softmax_xent

VIT = dict(num_classes=3, patch_size=(4, 4), width=8, depth=2, mlp_dim=32, num_heads=2,
           head_zeroinit=False)  # a non-zero head, so the backbone gets gradients at step 0


def _config(freeze_spec="full", **overrides):
    config = ml_collections.ConfigDict(dict(
        optim=dict(name="adamw", weight_decay=0.0), lr=0.01, grad_clip_norm=1.0,
        freeze=freeze_spec, schedule=None, unfreeze_warmup_steps=0,
        lr_schedule=dict(decay_type="constant", linear_end=0.0)))
    for key, value in overrides.items():
        config[key] = value
    return config


def _loss(logits, batch):
    return softmax_xent(logits, batch["label"]).mean()


def _setup(spec, **overrides):
    """A tiny ViT (LoRA-wrapped for lora presets), its params, plan and Phases on 1 device."""
    model = classifier("vit", **VIT)
    x = jax.random.normal(jax.random.PRNGKey(1), (8, 8, 8, 3))
    config = _config(spec, **overrides)
    variables = model.init(jax.random.PRNGKey(0), x[:1])
    options = freeze.lora_options(config)
    if options:
        model = lora.LoRA(model, **options)
        variables = model.add_adapters(variables, jax.random.PRNGKey(2), x[:1])
    params = variables["params"]
    plan = freeze.Plan(config, params, model.blocks())
    mesh = sharding.make_mesh([("data", -1)])
    shardings = {"params": jax.tree_util.tree_map(lambda _: sharding.replicated(mesh), params)}
    phases = train.Phases(config, plan, train.model_forward(model), _loss, mesh,
                          shardings, total_steps=100, warmup_steps=0)
    batch = {"image": x, "label": jnp.arange(8) % 3}
    return model, params, plan, phases, batch


def _run(plan, phases, params, batch, steps):
    """Runs `steps` updates like the trainer's loop; yields (phase index, before, after)."""
    phase = phases.get(0)
    params = jax.tree_util.tree_map(jnp.array, params)  # a copy: the step donates its input
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "model_state": {},
             "opt_state": phase.init(params), "rng": jax.random.PRNGKey(0)}
    for step in range(steps):
        if plan.index_at(step) != phase.index:
            phase, state = phases.switch(state, plan.index_at(step))
        before = jax.tree_util.tree_map(np.array, tree.flatten(state["params"]))
        state, _ = phase.step(state, batch)
        yield phase.index, before, tree.flatten(jax.device_get(state["params"]))


PRESETS = {  # preset: steps to run (two per phase)
    "full": 2, "linear_probe": 1, "last_k_blocks(2)": 1, "surgical(blocks=[1])": 1,
    "bitfit": 1, "none_but('encoderblock_0/MlpBlock')": 1, "lp_ft(lp_steps=1)": 2,
    "gradual_unfreeze(every=1)": 5, "lora(rank=2, alpha=4.0)": 2,
}


@pytest.mark.parametrize("spec", list(PRESETS))
def test_exactly_the_scheduled_parameters_change_in_each_phase(spec):
    _, params, plan, phases, batch = _setup(spec)
    changed: dict[int, set] = {}
    for index, before, after in _run(plan, phases, params, batch, PRESETS[spec]):
        moved = {n for n in before if not np.array_equal(before[n], after[n])}
        trainable = plan.trainable_names(index)
        assert moved <= trainable, f"frozen parameters moved: {sorted(moved - trainable)[:3]}"
        # Frozen leaves are bitwise unchanged (not merely close).
        assert all(before[n].tobytes() == after[n].tobytes() for n in before if n not in trainable)
        changed.setdefault(index, set()).update(moved)
    assert sorted(changed) == list(range(len(plan.phases)))
    for index, moved in changed.items():
        assert moved == plan.trainable_names(index), plan.phases[index].name
    assert phases.num_compiled == len(plan.phases)  # one compile per phase, not per step


def test_preset_trainable_sets():
    _, params, plan, _, _ = _setup("last_k_blocks(2)")
    names = set(tree.flatten(params))
    trainable = plan.trainable_names(0)
    assert trainable == {n for n in names if n.startswith(("head/", "Transformer/encoder_norm/",
                                                             "Transformer/encoderblock_1/"))}
    _, _, plan, _, _ = _setup("bitfit")
    assert plan.trainable_names(0) == {n for n in names if n.endswith("bias") or n.endswith(
        "scale") or n.startswith("head/")}
    _, params, plan, _, _ = _setup("lora(rank=2, alpha=4.0)")
    assert plan.trainable_names(0) == {n for n in tree.flatten(params)
                                       if n.startswith(("lora/", "head/"))}
    _, _, plan, _, _ = _setup("gradual_unfreeze(every=3)")
    assert [p.start for p in plan.phases] == [0, 3, 6, 9, 12]
    assert len(plan.trainable_names(1)) > len(plan.trainable_names(0))
    assert plan.trainable_names(4) == names


def test_phase_change_carries_kept_state_and_zeroes_new_state():
    _, params, plan, phases, batch = _setup("lp_ft(lp_steps=2)")
    phase = phases.get(0)
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "model_state": {},
             "opt_state": phase.init(params), "rng": jax.random.PRNGKey(0)}
    for _ in range(2):
        state, _ = phase.step(state, batch)
    old = tree.flatten(state["opt_state"])
    new_phase, state = phases.switch(state, 1)
    new = tree.flatten(state["opt_state"])
    head_group = plan.groups(1)["head/kernel"].label
    full_group = plan.groups(1)["Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel"].label
    assert head_group != full_group  # the head trains since 0, the backbone since 2
    carried = [n for n in new if head_group in n]
    assert carried and all(np.array_equal(new[n], old[n]) for n in carried)
    assert any(n.endswith("count") and int(new[n]) == 2 for n in carried)
    fresh = [n for n in new if full_group in n]
    assert fresh and all(not np.any(new[n]) for n in fresh)  # zero moments and count


def test_llrd_multipliers_per_block():
    model = classifier("vit", **VIT)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))["params"]
    config = _config("full", llrd=0.5, lr_mults=[("^head/", 3.0)])
    plan = freeze.Plan(config, params, model.blocks())
    groups = plan.groups(0)
    # blocks: stem, encoderblock_0, encoderblock_1, encoder_norm, head -> G = 5.
    expected = {"embedding/kernel": 0.5 ** 4, "pos_embedding": 0.5 ** 4,
                "Transformer/encoderblock_0/LayerNorm_0/scale": 0.5 ** 3,
                "Transformer/encoderblock_1/MlpBlock_0/Dense_1/kernel": 0.5 ** 2,
                "Transformer/encoder_norm/scale": 0.5, "head/kernel": 3.0}
    for name, mult in expected.items():
        assert groups[name].lr_mult == pytest.approx(mult), name
    # Combined with a preset: frozen leaves stay frozen, trained ones keep their block's decay.
    plan = freeze.Plan(_config("last_k_blocks(2)", llrd=0.5), params, model.blocks())
    assert plan.groups(0)["Transformer/encoderblock_0/LayerNorm_0/scale"] is None
    assert plan.groups(0)["Transformer/encoderblock_1/LayerNorm_0/scale"].lr_mult == 0.25
    assert freeze.llrd_multiplier(0, 14, 0.65) == pytest.approx(0.65 ** 13)


def test_llrd_lr_values_in_the_optimizer():
    model = classifier("vit", **VIT)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))["params"]
    config = _config("full", llrd=0.5, optim=dict(name="sgd"), grad_clip_norm=None)
    tx, _ = optim.make_optimizer(config, params, 10, 0, blocks=model.blocks())
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    updates = tree.flatten(tx.update(grads, tx.init(params), params)[0])
    assert float(updates["head/bias"][0]) == pytest.approx(-0.01)
    assert float(updates["Transformer/encoderblock_0/LayerNorm_0/bias"][0]) == pytest.approx(
        -0.01 * 0.5 ** 3)


def test_wd_mults_and_rule_overrides():
    model = classifier("vit", **VIT)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))["params"]
    config = _config("full", optim=dict(name="adamw", weight_decay=0.1),
                     wd_mults=[(r"(bias|scale)$", 0.0)])
    plan = freeze.Plan(config, params, model.blocks())
    assert plan.groups(0)["head/bias"].wd_mult == 0.0
    assert plan.groups(0)["head/kernel"].wd_mult == 1.0
    tx, labels = optim.phase_optimizer(config, plan, 0, 10, 0)
    assert len(set(jax.tree_util.tree_leaves(labels))) == 2
    with pytest.raises(ConfigError, match="weight_decay"):
        optim.make_optimizer(_config("full", optim=dict(name="sgd"), wd_mults=[(".*", 0.0)]),
                             params, 10, 0)


def test_unfrozen_group_warms_up_again():
    config = _config("full", lr=1.0, unfreeze_warmup_steps=4,
                     lr_schedule=dict(decay_type="linear", linear_end=0.0))
    group = freeze.Group(lr_mult=1.0, wd_mult=1.0, since=10)
    schedule = optim.group_schedule(config, group, total_steps=20, warmup_steps=0)
    # count c = steps since the group started; global step = c + 10.
    assert float(schedule(0)) == 0.0
    np.testing.assert_allclose(float(schedule(2)), 0.5 * (1 - 12 / 20), rtol=1e-6)
    np.testing.assert_allclose(float(schedule(6)), 1 - 16 / 20, rtol=1e-6)
    config.unfreeze_warmup_steps = 0
    schedule = optim.group_schedule(config, group, total_steps=20, warmup_steps=0)
    np.testing.assert_allclose(float(schedule(0)), 1 - 10 / 20, rtol=1e-6)


def test_explicit_phases_and_epochs():
    model = classifier("vit", **VIT)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))["params"]
    schedule = [{"rules": [("^head/", {}), (".*", None)]},
                {"start_epoch": 1.5, "freeze": "last_k_blocks(1)", "name": "top"},
                {"start_step": 40, "rules": [(".*", {"lr_mult": 0.1})]}]
    plan = freeze.Plan(_config("", schedule=schedule), params, model.blocks(),
                       steps_per_epoch=10)
    assert [p.start for p in plan.phases] == [0, 15, 40]
    assert [plan.index_at(s) for s in (0, 14, 15, 39, 40, 99)] == [0, 0, 1, 1, 2, 2]
    assert plan.phases[1].name == "top"
    assert plan.groups(2)["head/kernel"].lr_mult == 0.1
    plan = freeze.Plan(_config("lp_ft(lp_epochs=0.5)"), params, model.blocks(),
                       steps_per_epoch=7)
    assert [p.start for p in plan.phases] == [0, 4]


@pytest.mark.parametrize("spec, config, message", [
    ("linear_prob", {}, "Unknown freeze preset"),
    ("lp_ft(lp_steps=__import__('os'))", {}, "literals"),
    ("lp_ft()", {}, "exactly one"),
    ("last_k_blocks(9)", {}, r"k must be an integer in \[0, 4\]"),
    ("surgical(blocks=[7])", {}, "indices must be integers"),
    ("lp_ft(steps=3)", {}, "unexpected keyword"),
    ("", {"schedule": [{"start_step": 0, "rules": [(".*", {})]},
                       {"start_step": 0, "rules": [(".*", {})]}]}, "must increase"),
    ("", {"schedule": [{"start_step": 0, "rule": []}]}, "unknown keys"),
    ("", {"schedule": [("^head/", {"lr": 2})]}, "unknown keys"),
    ("full", {"llrd": 1.5}, r"decay in \(0, 1\]"),
    ("full", {"lr_mults": [("^head/",)]}, r"\(regex, multiplier\)"),
])
def test_config_errors_are_one_line(spec, config, message):
    model = classifier("vit", **VIT)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))["params"]
    with pytest.raises(ConfigError, match=message) as e:
        freeze.Plan(_config(spec, **config), params, model.blocks())
    assert "\n" not in str(e.value)


FAMILIES = {  # name: (kwargs, input)
    "resnet": (dict(depth=18, num_classes=3), jnp.zeros((1, 32, 32, 3))),
    "resnetv2": (dict(depth=50, num_classes=3), jnp.zeros((1, 32, 32, 3))),
    "efficientnet_lite": (dict(num_classes=3), jnp.zeros((1, 32, 32, 3))),
    "bert": (dict(num_classes=3, vocab_size=50, hidden_size=16, num_layers=2, num_heads=2,
                  intermediate_size=32, max_position_embeddings=16),
             {"input_ids": jnp.zeros((1, 8), jnp.int32)}),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_same_presets_for_every_family(family):
    kwargs, x = FAMILIES[family]
    model = classifier(family, **kwargs)
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x))["params"]
    names = set(tree.flatten(params))
    blocks = model.blocks()
    sizes = {}
    for spec in ("full", "linear_probe", "last_k_blocks(1)", "surgical(blocks=[0])", "bitfit",
                 "lp_ft(lp_steps=5)", "gradual_unfreeze(every=5)"):
        plan = freeze.Plan(_config(spec, llrd=0.8), params, blocks)
        first = plan.trainable_names(0)
        assert {"head/kernel", "head/bias"} <= first, spec
        assert plan.trainable_names(len(plan.phases) - 1) <= names
        sizes[spec] = len(first)
    assert sizes["linear_probe"] == 2 < sizes["last_k_blocks(1)"] < sizes["full"] == len(names)
    assert sizes["linear_probe"] < sizes["bitfit"] < sizes["full"]
    if family == "bert":
        wrapped = lora.LoRA(model, rank=2, alpha=4.0)
        variables = wrapped.init({"params": jax.random.PRNGKey(0)}, x)
        plan = freeze.Plan(_config("lora(rank=2, alpha=4.0)"), variables["params"], blocks)
        # 2 layers x (q, k, v, attention out, intermediate, output) x (lora_a, lora_b)
        assert sum(n.startswith("lora/") for n in plan.trainable_names(0)) == 24


def test_frozen_optimizer_state_is_only_for_trainable_leaves():
    model = classifier("vit", **VIT)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))["params"]
    sizes = {}
    for spec in ("full", "last_k_blocks(1)", "linear_probe"):
        tx, labels = optim.make_optimizer(_config(spec), params, 10, 0, blocks=model.blocks())
        state_size = sum(x.size for x in jax.tree_util.tree_leaves(tx.init(params)))
        trainable = sum(p.size for p, t in zip(jax.tree_util.tree_leaves(params),
                                               jax.tree_util.tree_leaves(
                                                   optim.trainable_mask(labels)), strict=True)
                        if t)
        assert 2 * trainable <= state_size <= 2 * trainable + 8  # adam mu, nu + counts
        sizes[spec] = state_size
    assert sizes["linear_probe"] < sizes["last_k_blocks(1)"] < sizes["full"]


def test_carry_state_copies_by_path():
    old = {"a": {"mu": jnp.ones(3), "count": jnp.array(5)}, "gone": jnp.ones(2)}
    new = {"a": {"mu": jnp.zeros(3), "count": jnp.array(0)}, "b": {"mu": jnp.zeros(4)}}
    out = freeze.carry_state(old, new)
    assert int(out["a"]["count"]) == 5 and float(out["a"]["mu"].sum()) == 3
    assert float(out["b"]["mu"].sum()) == 0 and "gone" not in out
