"""Optimizer factory: learning-rate schedules and per-parameter freeze rules.

Rules are `(regex, None | dict)` pairs over parameter names, first match wins
(big_vision's `config.schedule`). `None` freezes the parameter: it is labelled
'frozen' for `optax.multi_transform`, goes through `optax.set_to_zero()` and
so holds no optimizer state. A dict trains it; its keys override
`config.lr_schedule` for that group, `lr_mult` scales its learning rate and
`wd_mult` its weight decay. Phases, presets and layer-wise lr decay are compiled
in `tljax.freeze`; this module turns one phase into an optax transformation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from tljax import freeze
from tljax.config import ConfigError

FROZEN = freeze.FROZEN
Rules = list[tuple[str, dict | None]]
RULE_KEYS = freeze.RULE_KEYS


def preset(spec: str, blocks: Sequence[str] | None = None) -> Rules:
    """Rules of a one-phase preset ('full', 'linear_probe', 'none_but=REGEX', 'bitfit', ...)."""
    phases = freeze.preset_phases(spec, blocks)
    if len(phases) != 1:
        raise ConfigError(f"Freeze preset {spec!r} has {len(phases)} phases; use "
                          f"freeze.phases_of for schedules.")
    return list(phases[0].rules)


def rules_of(config: ml_collections.ConfigDict, blocks: Sequence[str] | None = None,
             step: int = 0) -> Rules:
    """The rules in force at `step`: from `config.schedule` when given, else `config.freeze`."""
    phases = freeze.phases_of(config, blocks)
    index = max(i for i, p in enumerate(phases) if p.start <= step)
    return list(phases[index].rules)


def labels(params: Any, rules: Sequence[tuple[str, dict | None]]) -> Any:
    """A tree of group labels for one set of rules: FROZEN or the trainable leaf's group.

    Every parameter must match a rule: an unmatched one is an error, since
    silently training (or freezing) it is what makes ablations wrong.
    """
    config = ml_collections.ConfigDict({"schedule": [tuple(r) for r in rules]})
    return freeze.Plan(config, params).labels(0)


def trainable_mask(label_tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda label: label != FROZEN, label_tree)


def lr_schedule(base_lr: float, total_steps: int, warmup_steps: int, decay_type: str = "cosine",
                linear_end: float = 0.0) -> optax.Schedule:
    """Linear warmup from 0 to `base_lr`, then cosine, linear or constant to the end.

    cosine: lr(t) = end + (base - end) (1 + cos(pi t / T)) / 2 with end = linear_end * base.
    """
    decay_steps = max(total_steps - warmup_steps, 1)
    end = base_lr * linear_end
    if decay_type == "cosine":
        decay = optax.cosine_decay_schedule(base_lr, decay_steps, alpha=linear_end)
    elif decay_type == "linear":
        decay = optax.linear_schedule(base_lr, end, decay_steps)
    elif decay_type == "constant":
        decay = optax.constant_schedule(base_lr)
    else:
        raise ConfigError(f"decay_type={decay_type!r}: expected cosine, linear or constant.")
    if not warmup_steps:
        return decay
    warmup = optax.linear_schedule(0.0, base_lr, warmup_steps)
    return optax.join_schedules([warmup, decay], [warmup_steps])


def group_schedule(config: ml_collections.ConfigDict, group: freeze.Group, total_steps: int,
                   warmup_steps: int) -> optax.Schedule:
    """The lr of one group, as a function of that group's own update count c.

    The group's state starts at step s = group.since, so the global step is t = c + s and
        lr(c) = lr_mult * lr_global(c + s) * min(1, c / W)     (the factor only if s > 0)
    with W = config.unfreeze_warmup_steps (None: the run's warmup length): a group that
    unfreezes mid-run warms up again from zero.
    """
    base = lr_schedule(config.lr * group.lr_mult, total_steps, warmup_steps,
                       **{**dict(config.lr_schedule), **dict(group.overrides)})
    if not group.since:
        return base
    rewarm = config.get("unfreeze_warmup_steps")
    rewarm = warmup_steps if rewarm is None else int(rewarm)
    since = group.since

    def schedule(count: Any) -> Any:
        lr = base(count + since)
        return lr * jnp.minimum(1.0, count / rewarm) if rewarm > 0 else lr

    return schedule


def phase_optimizer(config: ml_collections.ConfigDict, plan: freeze.Plan, index: int,
                    total_steps: int, warmup_steps: int
                    ) -> tuple[optax.GradientTransformation, Any]:
    """(optimizer, label tree) of phase `index` of `plan`.

    One `config.optim` transform per distinct group (lr multiplier, weight-decay
    multiplier, schedule overrides, start step); frozen leaves go through
    `optax.set_to_zero()` and hold no state. Gradients of frozen leaves must be zero on
    input (the train step stops them), so clipping sees trainable gradients only.
    """
    optim = dict(config.optim)
    name = optim.pop("name")
    groups = {g for g in plan.groups(index).values() if g is not None}
    if any(g.wd_mult != 1.0 for g in groups) and "weight_decay" not in optim:
        raise ConfigError(f"wd_mults / wd_mult need an optimizer with weight_decay "
                          f"(config.optim.name={name!r} has none set).")
    transforms: dict[str, optax.GradientTransformation] = {FROZEN: optax.set_to_zero()}
    for group in sorted(groups, key=lambda g: g.label):
        kwargs = dict(optim)
        if "weight_decay" in kwargs:
            kwargs["weight_decay"] = kwargs["weight_decay"] * group.wd_mult
        transforms[group.label] = getattr(optax, name)(
            group_schedule(config, group, total_steps, warmup_steps), **kwargs)
    label_tree = plan.labels(index)
    tx = optax.multi_transform(transforms, label_tree)
    if config.get("grad_clip_norm"):
        tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
    return tx, label_tree


def make_optimizer(config: ml_collections.ConfigDict, params: Any, total_steps: int,
                   warmup_steps: int, *, blocks: Sequence[str] | None = None, step: int = 0,
                   steps_per_epoch: float | None = None
                   ) -> tuple[optax.GradientTransformation, Any]:
    """(optimizer, label tree) of the freeze phase in force at `step`."""
    plan = freeze.Plan(config, params, blocks, steps_per_epoch)
    return phase_optimizer(config, plan, plan.index_at(step), total_steps, warmup_steps)
