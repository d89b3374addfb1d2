"""Optimizer factory: learning-rate schedules and per-parameter freeze rules.

Rules are `(regex, None | dict)` pairs over parameter names, first match wins
(big_vision's `config.schedule`). `None` freezes the parameter: it is labelled
'frozen' for `optax.multi_transform`, goes through `optax.set_to_zero()` and
so holds no optimizer state. A dict trains it; its keys override
`config.lr_schedule` for that group, and `lr_mult` scales its learning rate.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import optax

from tljax import tree
from tljax.config import ConfigError

FROZEN = "frozen"
Rules = list[tuple[str, dict | None]]
RULE_KEYS = {"decay_type", "linear_end", "lr_mult"}


def preset(spec: str) -> Rules:
    """Freeze rules of a named preset: 'full', 'linear_probe' or 'none_but=REGEX'."""
    name, _, arg = spec.partition("=")
    if name == "full":
        return [(".*", {})]
    if name == "linear_probe":
        return [("^head/", {}), (".*", None)]
    if name == "none_but" and arg:
        re.compile(arg)
        return [(arg, {}), (".*", None)]
    raise ConfigError(f"Unknown freeze preset {spec!r}: expected full, linear_probe or "
                      f"none_but=REGEX.")


def rules_of(config: ml_collections.ConfigDict) -> Rules:
    """`config.schedule` when given, else the rules of the `config.freeze` preset."""
    if config.get("schedule"):
        if config.get("freeze") not in (None, "", "full"):
            raise ConfigError(f"Both config.schedule and config.freeze={config.freeze!r} are set; "
                              f"keep one.")
        rules = [(pattern, None if group is None else dict(group))
                 for pattern, group in config.schedule]
    else:
        rules = preset(config.get("freeze") or "full")
    for pattern, group in rules:
        unknown = set(group or {}) - RULE_KEYS
        if unknown:
            raise ConfigError(f"Schedule rule {pattern!r} has unknown keys {sorted(unknown)}; "
                              f"valid: {sorted(RULE_KEYS)}.")
    return rules


def labels(params: Any, rules: Sequence[tuple[str, dict | None]]) -> Any:
    """A tree of group labels: 'rule_<i>' for trainable leaves, 'frozen' otherwise.

    Every parameter must match a rule: an unmatched one is an error, since
    silently training (or freezing) it is what makes ablations wrong.
    """
    patterns = [pattern for pattern, _ in rules]
    unmatched = []

    def label(name: str, _: Any) -> str:
        index = tree.first_match(name, patterns)
        if index is None:
            unmatched.append(name)
            return FROZEN
        return FROZEN if rules[index][1] is None else f"rule_{index}"

    result = tree.map_with_names(label, params)
    if unmatched:
        shown = ", ".join(unmatched[:5]) + (f" and {len(unmatched) - 5} more" if
                                            len(unmatched) > 5 else "")
        raise ConfigError(f"{len(unmatched)} parameters match no schedule rule ({shown}); "
                          f"add a catch-all rule such as ('.*', None).")
    return result


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


def make_optimizer(config: ml_collections.ConfigDict, params: Any, total_steps: int,
                   warmup_steps: int) -> tuple[optax.GradientTransformation, Any]:
    """(optimizer, label tree). Gradients of frozen leaves must be zero on input
    (the train step stops them), so clipping sees trainable gradients only."""
    rules = rules_of(config)
    label_tree = labels(params, rules)
    optim = dict(config.optim)
    name = optim.pop("name")
    transforms: dict[str, optax.GradientTransformation] = {FROZEN: optax.set_to_zero()}
    for index, (_, group) in enumerate(rules):
        if group is None:
            continue
        group = dict(group)
        lr_mult = group.pop("lr_mult", 1.0)
        schedule = lr_schedule(config.lr * lr_mult, total_steps, warmup_steps,
                               **{**dict(config.lr_schedule), **group})
        transforms[f"rule_{index}"] = getattr(optax, name)(schedule, **optim)
    tx = optax.multi_transform(transforms, label_tree)
    if config.get("grad_clip_norm"):
        tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
    return tx, label_tree
