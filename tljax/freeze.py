"""Freeze schedules: which parameters train when, and with what learning rate.

A schedule is a list of *phases*. Phase p starts at step s_p (the number of updates
already applied; s_0 = 0) and holds *rules* `(regex, None | dict)` over '/'-joined
parameter names, first match wins: `None` freezes the parameter, a dict trains it
(keys: `lr_mult`, `wd_mult`, `decay_type`, `linear_end`). Every parameter must match
a rule. A phase compiles to one label per leaf for `optax.multi_transform`.

Where the schedule comes from (config keys):
  freeze    one-line preset, e.g. "lp_ft(lp_steps=500)", "last_k_blocks(2)",
            "lora(rank=8, alpha=16)"; arguments are Python literals (ast.literal_eval).
  schedule  explicit rules instead of a preset: either one phase, a list of
            `(regex, None | dict)`, or several, a list of dicts
            `{'start_step': N | 'start_epoch': E, 'rules': [...] | 'freeze': PRESET}`.
  llrd      layer-wise lr decay d: block group l of the model's G groups
            (`model.blocks()`, input to head; groups holding no parameter are skipped)
            gets lr multiplier d^(G-1-l), so the head gets 1 and the stem d^(G-1).
            Parameters in no group get 1.
  lr_mults  [(regex, m), ...], first match wins: extra lr multiplier (default 1).
  wd_mults  [(regex, m), ...], first match wins: weight-decay multiplier (default 1).
  unfreeze_warmup_steps  lr warmup of a group that starts training after step 0
            (None: the run's warmup length; 0: none).

A leaf's lr multiplier is rule lr_mult * d^(G-1-l) * lr_mults match.

Semantics at a phase change (the trainer's contract):
  * frozen leaves hold no optimizer state (`optax.set_to_zero`);
  * a leaf that becomes trainable at step s starts with zero optimizer state (its
    Adam moments and count are fresh) and its lr warms up linearly from 0 over
    `unfreeze_warmup_steps`, then follows the global schedule at the global step:
    lr(t) = lr_global(t) * min(1, (t - s) / W);
  * a leaf that stays trainable keeps its optimizer state: labels name a group by
    (lr_mult, wd_mult, schedule overrides, step it last started training), so its
    state lives at the same path in the old and new optimizer state;
  * the trainer compiles one train step per phase, when the phase is first reached.
"""

from __future__ import annotations

import ast
import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections

from tljax import tree
from tljax.config import ConfigError
from tljax.models.model import HEAD

FROZEN = "frozen"
Rule = tuple[str, dict | None]
RULE_KEYS = {"decay_type", "linear_end", "lr_mult", "wd_mult"}
# BitFit trains every bias, every normalisation layer (LayerNorm, BatchNorm, GroupNorm
# and the models' *_norm/*_bn names) and the head.
BIAS = r"(^|/)bias$"
NORM = r"(?i)(norm|bn|ln)[^/]*/scale$"
LORA = "^lora/"

PRESETS = ("full", "linear_probe", "none_but(REGEX)", "last_k_blocks(k)",
           "surgical(blocks=[...])", "bitfit", "lp_ft(lp_steps=N | lp_epochs=E)",
           "gradual_unfreeze(every=N | every_epochs=E)", "lora(rank, alpha, targets)")


@dataclasses.dataclass(frozen=True)
class Phase:
    """Rules in force from update `start` (inclusive) until the next phase's start."""

    start: int
    rules: tuple[Rule, ...]
    name: str


# ---------------------------------------------------------------------------
# Presets.


def parse_call(spec: str) -> tuple[str, tuple, dict[str, Any]]:
    """'name(1, k=[2, 3])' -> ('name', (1,), {'k': [2, 3]}); arguments must be literals.

    'name=ARG' (the older form of `none_but=REGEX`) reads as name('ARG').
    """
    spec = spec.strip()
    name, eq, arg = spec.partition("=")
    if eq and "(" not in name:
        return name.strip(), (arg,), {}
    try:
        node = ast.parse(spec, mode="eval").body
    except SyntaxError as e:
        raise ConfigError(f"Cannot parse freeze preset {spec!r}: {e.msg}.") from None
    if isinstance(node, ast.Name):
        return node.id, (), {}
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
        raise ConfigError(f"Freeze preset {spec!r}: expected NAME or NAME(args).")
    try:
        args = tuple(ast.literal_eval(a) for a in node.args)
        kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
    except ValueError:
        raise ConfigError(f"Freeze preset {spec!r}: arguments must be literals "
                          f"(numbers, strings, lists).") from None
    return node.func.id, args, kwargs


def _bind(name: str, fn: Callable, args: tuple, kwargs: dict) -> dict[str, Any]:
    import inspect

    try:
        bound = inspect.signature(fn).bind(*args, **kwargs)
    except TypeError as e:
        raise ConfigError(f"Freeze preset {name}: {e}.") from None
    bound.apply_defaults()
    return dict(bound.arguments)


def _need_blocks(name: str, blocks: Sequence[str] | None) -> Sequence[str]:
    if not blocks:
        raise ConfigError(f"Freeze preset {name} needs the model's blocks() (block groups).")
    return blocks


def _to_steps(name: str, steps: int | None, epochs: float | None,
              steps_per_epoch: float | None) -> int:
    """A phase boundary given in steps or epochs (exactly one), in steps (rounded up)."""
    if (steps is None) == (epochs is None):
        raise ConfigError(f"Freeze preset {name}: give the boundary in steps or in epochs "
                          f"(exactly one).")
    if steps is not None:
        result = int(steps)
    else:
        if not steps_per_epoch:
            raise ConfigError(f"Freeze preset {name}: epochs need the dataset size.")
        result = math.ceil(epochs * steps_per_epoch)
    if result <= 0:
        raise ConfigError(f"Freeze preset {name}: the boundary must be positive, got {result}.")
    return result


def _trained(patterns: Sequence[str]) -> tuple[Rule, ...]:
    return tuple((p, {}) for p in patterns) + ((".*", None),)


def _head(blocks: Sequence[str] | None) -> str:
    return blocks[-1] if blocks else HEAD


def _p_full() -> None: ...
def _p_linear_probe() -> None: ...
def _p_bitfit() -> None: ...
def _p_none_but(regex: str) -> None: ...
def _p_last_k_blocks(k: int) -> None: ...
def _p_surgical(blocks: Sequence[int], head: bool = True) -> None: ...
def _p_lp_ft(lp_steps: int | None = None, lp_epochs: float | None = None) -> None: ...
def _p_gradual_unfreeze(every: int | None = None, every_epochs: float | None = None) -> None: ...
def _p_lora(rank: int = 8, alpha: float = 16.0,
            targets: Sequence[str] | None = None) -> None: ...


_SIGNATURES = {name[3:]: fn for name, fn in globals().items() if name.startswith("_p_")}


def preset_phases(spec: str, blocks: Sequence[str] | None = None,
                  steps_per_epoch: float | None = None) -> list[Phase]:
    """Phases of a one-line preset; block presets count groups of `blocks` (input to head).

    full                 everything, all run.
    linear_probe         the head (blocks[-1]) only.
    none_but(REGEX)      parameters matching REGEX only.
    last_k_blocks(k)     the head and the k block groups below it.
    surgical(blocks=[i, ...], head=True)  the chosen block groups (indices into
                         blocks(), negative from the end) and the head.
    bitfit               biases, normalisation scales and the head (Ben Zaken et al. 2022).
    lp_ft(lp_steps=N)    linear_probe for N steps, then full (Kumar et al. 2022).
    gradual_unfreeze(every=N)  ULMFiT: head only, then one more group from the top
                         every N steps, down to the stem; `every_epochs` for epochs.
    lora(rank, alpha, targets)  LoRA adapters (tljax.models.lora) and the head;
                         every base parameter frozen.
    """
    name, args, kwargs = parse_call(spec)
    if name not in _SIGNATURES:
        raise ConfigError(f"Unknown freeze preset {spec!r}: expected one of "
                          f"{', '.join(PRESETS)}.")
    a = _bind(name, _SIGNATURES[name], args, kwargs)
    head = _head(blocks)
    if name == "full":
        return [Phase(0, ((".*", {}),), "full")]
    if name == "linear_probe":
        return [Phase(0, _trained([head]), "linear_probe")]
    if name == "bitfit":
        return [Phase(0, _trained([BIAS, NORM, head]), "bitfit")]
    if name == "none_but":
        try:
            re.compile(a["regex"])
        except re.error as e:
            raise ConfigError(f"Freeze preset {spec!r}: bad regex ({e}).") from None
        return [Phase(0, _trained([a["regex"]]), f"none_but({a['regex']})")]
    if name == "lora":
        return [Phase(0, _trained([LORA, head]), "lora")]
    if name == "lp_ft":
        start = _to_steps(name, a["lp_steps"], a["lp_epochs"], steps_per_epoch)
        return [Phase(0, _trained([head]), "linear_probe"),
                Phase(start, ((".*", {}),), "full")]
    blocks = _need_blocks(name, blocks)
    n = len(blocks)
    if name == "last_k_blocks":
        k = a["k"]
        if not isinstance(k, int) or not 0 <= k < n:
            raise ConfigError(f"last_k_blocks({k!r}): k must be an integer in [0, {n - 1}] "
                              f"(the model has {n} block groups including the head).")
        return [Phase(0, _trained(blocks[n - 1 - k:]), f"last_k_blocks({k})")]
    if name == "surgical":
        chosen = a["blocks"]
        if isinstance(chosen, int):
            chosen = [chosen]
        bad = [i for i in chosen if not isinstance(i, int) or not -n <= i < n]
        if bad or not chosen:
            raise ConfigError(f"surgical(blocks={chosen!r}): indices must be integers in "
                              f"[{-n}, {n - 1}] (the model's {n} block groups).")
        indices = sorted({i % n for i in chosen} | ({n - 1} if a["head"] else set()))
        return [Phase(0, _trained([blocks[i] for i in indices]),
                      f"surgical({sorted(i % n for i in chosen)})")]
    if name == "gradual_unfreeze":
        every = _to_steps(name, a["every"], a["every_epochs"], steps_per_epoch)
        phases = [Phase(i * every, _trained(blocks[n - 1 - i:]), f"top_{i + 1}_groups")
                  for i in range(n - 1)]
        # The last phase trains everything, including parameters in no block group.
        return phases + [Phase((n - 1) * every, ((".*", {}),), "full")]
    raise AssertionError(name)


def lora_options(config: ml_collections.ConfigDict) -> dict[str, Any] | None:
    """{'rank', 'alpha', 'targets'} when `config.freeze` is a lora(...) preset, else None."""
    spec = config.get("freeze") or ""
    if not spec or config.get("schedule"):
        return None
    name, args, kwargs = parse_call(spec)
    if name != "lora":
        return None
    options = _bind(name, _SIGNATURES[name], args, kwargs)
    if not isinstance(options["rank"], int) or options["rank"] <= 0:
        raise ConfigError(f"lora(rank={options['rank']!r}): rank must be a positive integer.")
    return options


# ---------------------------------------------------------------------------
# Config -> phases.


def _check_rules(rules: Any, where: str) -> tuple[Rule, ...]:
    out = []
    for item in rules:
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise ConfigError(f"{where}: each rule must be (regex, None | dict), got {item!r}.")
        pattern, group = item
        try:
            re.compile(pattern)
        except (re.error, TypeError) as e:
            raise ConfigError(f"{where}: bad regex {pattern!r} ({e}).") from None
        if group is not None:
            group = dict(group)
            unknown = set(group) - RULE_KEYS
            if unknown:
                raise ConfigError(f"Schedule rule {pattern!r} has unknown keys {sorted(unknown)};"
                                  f" valid: {sorted(RULE_KEYS)}.")
        out.append((pattern, group))
    return tuple(out)


def phases_of(config: ml_collections.ConfigDict, blocks: Sequence[str] | None = None,
              steps_per_epoch: float | None = None) -> list[Phase]:
    """The phases of `config` (`schedule` if set, else the `freeze` preset), checked."""
    schedule = config.get("schedule")
    if not schedule:
        return preset_phases(config.get("freeze") or "full", blocks, steps_per_epoch)
    if config.get("freeze") not in (None, "", "full"):
        raise ConfigError(f"Both config.schedule and config.freeze={config.freeze!r} are set; "
                          f"keep one.")
    schedule = list(schedule)
    if not all(hasattr(p, "keys") for p in schedule):
        return [Phase(0, _check_rules(schedule, "config.schedule"), "schedule")]
    phases = []
    for i, p in enumerate(schedule):
        p = dict(p)
        where = f"config.schedule[{i}]"
        unknown = set(p) - {"start_step", "start_epoch", "rules", "freeze", "name"}
        if unknown:
            raise ConfigError(f"{where} has unknown keys {sorted(unknown)}; valid: start_step "
                              f"or start_epoch, rules or freeze, name.")
        if i == 0 and p.get("start_step") is None and p.get("start_epoch") is None:
            start = 0
        elif (p.get("start_step") is None) == (p.get("start_epoch") is None):
            raise ConfigError(f"{where}: set exactly one of start_step, start_epoch.")
        elif p.get("start_step") is not None:
            start = int(p["start_step"])
        else:
            if not steps_per_epoch:
                raise ConfigError(f"{where}: start_epoch needs the dataset size.")
            start = math.ceil(p["start_epoch"] * steps_per_epoch)
        if ("rules" in p) == ("freeze" in p):
            raise ConfigError(f"{where}: set exactly one of rules, freeze.")
        if "rules" in p:
            rules = _check_rules(p["rules"], where)
        else:
            sub = preset_phases(p["freeze"], blocks, steps_per_epoch)
            if len(sub) != 1:
                raise ConfigError(f"{where}: freeze={p['freeze']!r} has several phases; "
                                  f"a schedule phase takes a one-phase preset.")
            rules = sub[0].rules
        phases.append(Phase(start, rules, p.get("name") or f"phase_{i}"))
    starts = [p.start for p in phases]
    if starts[0] != 0 or any(b <= a for a, b in zip(starts, starts[1:], strict=False)):
        raise ConfigError(f"config.schedule phase starts {starts}: the first must be 0 and "
                          f"they must increase.")
    return phases


# ---------------------------------------------------------------------------
# Phases -> per-leaf groups and labels.


@dataclasses.dataclass(frozen=True)
class Group:
    """How a trainable leaf is optimised; equal groups share one optax transform."""

    lr_mult: float
    wd_mult: float
    since: int  # the step at which the leaf (last) started training
    overrides: tuple[tuple[str, Any], ...] = ()  # decay_type / linear_end for this group

    @property
    def label(self) -> str:
        extra = "".join(f",{k}={v}" for k, v in self.overrides)
        return f"lr={self.lr_mult:.6g},wd={self.wd_mult:.6g},from={self.since}{extra}"


def block_index(name: str, blocks: Sequence[str]) -> int | None:
    """Index of the block group of parameter `name` (LoRA adapters count as their kernel's)."""
    if name.startswith("lora/"):
        name = name[len("lora/"):]
    return tree.first_match(name, blocks)


def llrd_multiplier(index: int | None, num_groups: int, decay: float | None) -> float:
    """decay^(num_groups - 1 - index): 1 for the head group, decay^(G-1) for the stem."""
    if not decay or index is None:
        return 1.0
    return float(decay) ** (num_groups - 1 - index)


def _mult(name: str, pairs: Sequence[tuple[str, float]] | None) -> float:
    if not pairs:
        return 1.0
    index = tree.first_match(name, [p for p, _ in pairs])
    return 1.0 if index is None else float(pairs[index][1])


def _check_mults(config: ml_collections.ConfigDict, key: str) -> list[tuple[str, float]]:
    pairs = list(config.get(key) or [])
    for item in pairs:
        if not (isinstance(item, (tuple, list)) and len(item) == 2
                and isinstance(item[1], (int, float))):
            raise ConfigError(f"config.{key}: each entry must be (regex, multiplier), "
                              f"got {item!r}.")
    return [(p, float(m)) for p, m in pairs]


class Plan:
    """A compiled freeze schedule over one parameter tree.

    `groups(i)` maps every leaf name to its `Group` (None: frozen) in phase i;
    `labels(i)` is the same as an optax label tree.
    """

    def __init__(self, config: ml_collections.ConfigDict, params: Any,
                 blocks: Sequence[str] | None = None, steps_per_epoch: float | None = None):
        names = list(tree.flatten(params))
        # Groups with no parameters (e.g. BERT's pooler when unused) are not counted, so
        # last_k_blocks, surgical indices and LLRD depths refer to groups that exist. The
        # head group stays even when empty (a language model tied to its embedding): the
        # presets that train "the head" then train nothing there, and say so.
        blocks = list(blocks or [])
        blocks = [b for b in blocks if b == HEAD and b == blocks[-1]
                  or any(block_index(n, [b]) == 0 for n in names)]
        self.phases = phases_of(config, blocks, steps_per_epoch)
        self.blocks = blocks
        self._params = params
        self.param_shapes = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
        self._names = names
        decay = config.get("llrd")
        if decay is not None and not (isinstance(decay, (int, float)) and 0 < decay <= 1):
            raise ConfigError(f"config.llrd={decay!r}: expected a decay in (0, 1].")
        if decay is not None and not self.blocks:
            raise ConfigError("config.llrd needs the model's blocks().")
        self._decay = decay
        self._lr_mults = _check_mults(config, "lr_mults")
        self._wd_mults = _check_mults(config, "wd_mults")
        self._groups: dict[int, dict[str, Group | None]] = {}
        for index, phase in enumerate(self.phases):
            if not self.trainable_names(index):
                hint = ("" if any(n.startswith("head/") for n in names) else
                        "; this model has no head/ parameters (a language model whose output "
                        "is tied to its embedding): train LoRA adapters (lora(...)) or blocks")
                raise ConfigError(f"Freeze phase {phase.name!r} trains no parameter{hint}.")

    def index_at(self, step: int) -> int:
        """The phase of the update applied at `step` (0-based count of earlier updates)."""
        return max(i for i, p in enumerate(self.phases) if p.start <= step)

    def _rules_for(self, index: int) -> dict[str, dict | None]:
        """name -> the dict of its matching rule (None: frozen) in phase `index`."""
        phase = self.phases[index]
        patterns = [p for p, _ in phase.rules]
        result, unmatched = {}, []
        for name in self._names:
            i = tree.first_match(name, patterns)
            if i is None:
                unmatched.append(name)
            else:
                result[name] = phase.rules[i][1]
        if unmatched:
            shown = ", ".join(unmatched[:5]) + (f" and {len(unmatched) - 5} more"
                                                if len(unmatched) > 5 else "")
            raise ConfigError(f"{len(unmatched)} parameters match no schedule rule ({shown}) in "
                              f"phase {phase.name!r}; add a catch-all rule such as "
                              f"('.*', None).")
        return result

    def groups(self, index: int) -> dict[str, Group | None]:
        if index not in self._groups:
            self._groups[index] = self._compile(index)
        return self._groups[index]

    def _compile(self, index: int) -> dict[str, Group | None]:
        previous = self.groups(index - 1) if index > 0 else {}
        start = self.phases[index].start
        result: dict[str, Group | None] = {}
        n = len(self.blocks)
        for name, rule in self._rules_for(index).items():
            if rule is None:
                result[name] = None
                continue
            rule = dict(rule)
            lr = (rule.pop("lr_mult", 1.0) * _mult(name, self._lr_mults)
                  * llrd_multiplier(block_index(name, self.blocks), n, self._decay))
            wd = rule.pop("wd_mult", 1.0) * _mult(name, self._wd_mults)
            before = previous.get(name)
            since = before.since if before is not None else start
            result[name] = Group(float(lr), float(wd), since, tuple(sorted(rule.items())))
        return result

    def labels(self, index: int) -> Any:
        groups = self.groups(index)
        return tree.map_with_names(
            lambda name, _: FROZEN if groups[name] is None else groups[name].label, self._params)

    def trainable_names(self, index: int) -> set[str]:
        return {n for n, g in self.groups(index).items() if g is not None}


def frozen_names(plan: Plan) -> set[str]:
    """Parameters that no phase of `plan` trains."""
    trained = set().union(*(plan.trainable_names(i) for i in range(len(plan.phases))))
    return set(tree.flatten(plan.param_shapes)) - trained


def store_frozen(params: Any, plan: Plan, dtype: Any) -> Any:
    """`params` with every parameter no phase trains cast to `dtype` (e.g. bfloat16).

    Storage only: layers cast weights to their compute dtype where they use them, so a
    float32 model computes in float32 with the rounded weights. The trained parameters
    (adapters, heads) keep their dtype, and the optimizer, which holds no state for frozen
    parameters, never sees the narrow ones.
    """
    import jax.numpy as jnp

    frozen = frozen_names(plan)
    return tree.map_with_names(
        lambda name, x: x.astype(jnp.dtype(dtype)) if name in frozen else x, params)


def carry_state(old_state: Any, new_state: Any) -> Any:
    """`new_state` with every leaf that `old_state` holds at the same path (and shape) copied.

    Optimizer state is addressed by group label and parameter name, so the moments and
    counts of groups that keep training across a phase change carry over, and groups
    that start training keep the fresh (zero) state of `new_state`.
    """
    old = {tree.path_name(p): x for p, x in jax.tree_util.tree_leaves_with_path(old_state)}
    leaves, treedef = jax.tree_util.tree_flatten_with_path(new_state)

    def pick(path: tuple, leaf: Any) -> Any:
        previous = old.get(tree.path_name(path))
        if previous is not None and getattr(previous, "shape", None) == getattr(
                leaf, "shape", None) and getattr(previous, "dtype", None) == getattr(
                leaf, "dtype", None):
            return previous
        return leaf

    return jax.tree_util.tree_unflatten(treedef, [pick(p, x) for p, x in leaves])
