"""The trainer: one fine-tuning run, top to bottom.

    config -> mesh -> data -> model -> pretrained init -> optimizer -> resume
           -> jit-compiled, sharded train step -> periodic eval/checkpoint -> results

Everything a run writes lands in WORKDIR: config.json, metrics.jsonl,
tensorboard/, checkpoints/, results.json and curves.png. Starting a run on a
workdir that holds a checkpoint resumes it exactly.

Regularisers that live in the train state or the loop have their own modules: the weight
average (tljax.ema, `config.ema_decay`) and best-checkpoint selection with early stopping
(tljax.selection, `config.early_stopping`).

What goes wrong is handled where it is first seen: mistakes of input before anything is
written (tljax.validate, tljax.workdir), a non-finite loss inside the step
(tljax.nonfinite), SIGTERM at the next step boundary (tljax.preemption), an unreadable
checkpoint at resume (tljax.checkpoint).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils

from tljax import (
    accumulate,
    data,
    ema,
    features,
    freeze,
    models,
    nonfinite,
    optim,
    outputs,
    preemption,
    selection,
    sharding,
    tasks,
    tree,
    validate,
)
from tljax import config as config_lib
from tljax.checkpoint import RunCheckpoints
from tljax.models import lora
from tljax.pretrained import loading
from tljax.workdir import RunDir, write_json


def enable_compilation_cache() -> None:
    """Persistent XLA cache: a re-run (or a resumed run) skips compilation."""
    cache_dir = os.environ.get("TLJAX_COMPILATION_CACHE",
                               os.path.expanduser("~/.cache/tljax/xla"))
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


# ---------------------------------------------------------------------------
# The run.


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       dry_run: bool = False) -> dict[str, Any]:
    """Fine-tunes as `config` says, writing into `workdir`; returns the final eval metrics.

    Every check of the input (tljax.validate) runs before anything is compiled or written;
    `dry_run` stops after them, printing the plan.
    """
    enable_compilation_cache()
    validate.check_config(config)  # every key, value and name, before any data is read
    is_chief = jax.process_index() == 0
    run = RunDir(workdir, probe_lock=is_chief)  # a folder we may write that no other run holds
    run.check_resume(config)  # a run saved there continues only with its model and data

    # Mesh: the batch is split over all devices; parameters follow config.sharding_rules.
    mesh = sharding.make_mesh(config.mesh)
    batch_sharding = sharding.batch_sharding(mesh)
    validate.check_batch_sizes(config, jax.device_count(), jax.process_count())

    # Data. Durations in epochs or examples resolve against the training split's size.
    source, info = data.get_source(config.input.dataset, config.input.split,
                                   config.input.get("data_dir"))
    train_size = len(source)
    batch_size = config.input.batch_size
    total_steps = config_lib.steps(config, "total", batch_size=batch_size, train_size=train_size)
    every = {prefix: config_lib.steps(config, prefix, batch_size=batch_size,
                                      train_size=train_size, total=total_steps)
             for prefix in ("warmup", "log_every", "eval_every", "checkpoint_every")}
    train_iter = data.train_batches(
        dataset=config.input.dataset, split=config.input.split, pp=config.input.pp,
        batch_size=batch_size, seed=config.seed, data_dir=config.input.get("data_dir"),
        process_index=jax.process_index(), process_count=jax.process_count(),
        on_bad_example=config.input.on_bad_example, workers=config.input.get("workers"))

    def global_batch(local_batch: dict) -> dict:
        # Strings and ragged lists (object arrays) stay on the host.
        return {k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(x))
                for k, x in local_batch.items() if np.asarray(x).dtype != object}

    # Task and model: the task (targets, head, loss, metrics) comes from the config and the
    # dataset's features; the model is the backbone with the task's head attached as `head`.
    task = tasks.build_task(config.get("task"), info)
    model = models.from_config(config, task)
    first_batch = train_iter.batch_at(0)
    sample = models.inputs_of(model, {k: np.asarray(v)[:1] for k, v in first_batch.items()})

    # Initialised straight into its shardings: eval_shape gives the tree without
    # computing it, the jitted init writes each shard where it lives.
    base_model = model.base if isinstance(model, lora.LoRA) else model

    def init_variables(rng: jax.Array) -> dict:
        return base_model.init({"params": rng, "dropout": rng}, sample, train=False)

    root_rng = jax.random.PRNGKey(config.seed)
    init_rng, train_rng = jax.random.split(root_rng)
    variable_shapes = validate.variable_shapes(init_variables, init_rng, config)
    variable_shardings = variable_shardings_of(config, variable_shapes, mesh)
    pretrained = None
    if config.init.get("source"):
        # Read before compiling anything: a missing or unreachable checkpoint fails in seconds.
        pretrained = loading.read_init_checkpoint(config.init, variable_shapes)
    lora_options = freeze.lora_options(config)

    def add_adapters(variables: dict) -> dict:
        # Adapters join the (pretrained) base variables: B = 0, so step 0 is the base model.
        return model.add_adapters(variables, jax.random.fold_in(init_rng, 1), sample,
                                  train=False)

    if lora_options:
        variable_shapes = jax.eval_shape(add_adapters, variable_shapes)

    # Freeze schedule: phases of (labels, optimizer, compiled step), each built when first
    # reached; frozen parameters carry no optimizer state and no gradient.
    plan = freeze.Plan(config, variable_shapes["params"], model.blocks(),
                       steps_per_epoch=train_size / batch_size)
    validate.check_plan(plan)
    cached = None
    if config.get("cache_features"):
        cached = features.check_cacheable(config, plan, lora_options)
    # The eval pipeline is built and read now, so an eval mistake fails before training.
    eval_batch, eval_size = validate.first_eval_batch(config, jax.process_index(),
                                                      jax.process_count())
    validate.check_batches(model, task, variable_shapes, first_batch, eval_batch)
    if dry_run:
        print(validate.describe(config, mesh=mesh, info=info, train_size=train_size,
                                total_steps=total_steps, every=every, plan=plan,
                                param_shapes=variable_shapes["params"], eval_size=eval_size,
                                run=run), flush=True)
        return {}

    # Nothing is written before this line. The workdir is this run's from here (a lock).
    run.claim(is_chief, jax.process_count())
    variables = jax.jit(init_variables, out_shardings=variable_shardings)(init_rng)
    if pretrained is not None:
        loaded, dont_load = pretrained
        variables = jax.device_put(loading.merge_pretrained(variables, loaded, dont_load),
                                   variable_shardings)
    if lora_options:
        variables = add_adapters(variables)
        variable_shardings = variable_shardings_of(config, variables, mesh)
        variables = jax.device_put(variables, variable_shardings)
    params = variables["params"]
    model_state = {k: v for k, v in variables.items() if k != "params"}

    if config.get("frozen_dtype"):
        # Parameters no phase trains are stored narrower; the optimizer holds nothing for them.
        params = freeze.store_frozen(params, plan, config.frozen_dtype)
        plan = freeze.Plan(config, params, model.blocks(), steps_per_epoch=train_size / batch_size)
    checkpoints = RunCheckpoints(workdir, keep=config.keep_checkpoints)
    forward = features.head_forward(model) if cached else model_forward(model)
    phases = Phases(config, plan, forward, task.loss, mesh, variable_shardings, total_steps,
                    every["warmup"] or 0, prepare=task.train_batch)
    # A checkpoint's optimizer state is that of the phase of its last update.
    phase_at = lambda step: phases.get(plan.index_at(max(step - 1, 0)))  # noqa: E731

    def new_state(phase: CompiledPhase) -> dict:
        return ema.init_state({"step": jnp.zeros((), jnp.int32), "params": params,
                               "model_state": model_state, "opt_state": phase.init(params),
                               "rng": train_rng}, config.get("ema_decay"))

    def abstract_state(step: int) -> dict:
        phase = phase_at(step)
        return jax.tree_util.tree_map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            jax.eval_shape(lambda: new_state(phase)), phase.state_shardings)

    # Resume: the newest checkpoint that restores brings back params, optimizer state,
    # step, RNG and the data iterator's position.
    first_step = 0
    restored = checkpoints.restore_latest(abstract_state)
    if restored is None:
        phase = phase_at(0)
        state = jax.device_put(new_state(phase), phase.state_shardings)
    else:
        first_step, state, data_state = restored
        phase = phase_at(first_step)
        train_iter.set_state(data_state)
        print(f"Resumed from {workdir}/checkpoints at step {first_step} (freeze phase "
              f"{plan.phases[phase.index].name!r}).", flush=True)
    # Evaluations so far and the best weights (config.early_stopping); a run that stopped
    # early is finished.
    select = selection.Selection(config, workdir, first_step, is_chief)
    if (first_step == total_steps or select.stopped) and run.results is not None:
        print(f"The run in {workdir} is finished (results.json); nothing to do.", flush=True)
        checkpoints.close()
        run.release()
        return run.results["final_eval"]
    run.write_config(config, is_chief)
    report_start(config, params, phase.labels, mesh, total_steps, train_size, is_chief)
    if cached:
        # The frozen backbone's features, computed once; batches follow train_iter's order.
        train_iter = features.cached_batches(config, model, state, train_iter, workdir,
                                             global_batch)

    evaluate = make_evaluator(config, model, task, global_batch)
    lr_at = optim.lr_schedule(config.lr, total_steps, every["warmup"] or 0,
                              **dict(config.lr_schedule))

    writer = outputs.MetricWriter(workdir, total_steps, enabled=is_chief, resume_step=first_step)
    losses = nonfinite.Losses(config.on_nonfinite, checkpoints)  # NaN/inf: stop or skip
    stop = preemption.Watch()  # SIGTERM/SIGINT: save at the next step boundary, then stop
    initial = None
    if config.get("eval_at_start"):  # the starting point, for comparison
        initial = next((r for r in outputs.read_metrics(workdir, strict=False)
                        if r["kind"] == "eval" and r["step"] == 0), None)
        if initial is None and first_step == 0:  # a resumed run reads it back
            initial = evaluate(state)
            writer.write(0, initial, kind="eval")
        initial = {k: v for k, v in (initial or {}).items() if k not in ("step", "kind")}
    step = first_step
    try:
        for step in range(first_step + 1, (select.stopped or total_steps) + 1):
            if plan.index_at(step - 1) != phase.index:
                phase, state = phases.switch(state, plan.index_at(step - 1))
                if is_chief:
                    print(f"Step {step - 1}: freeze phase {plan.phases[phase.index].name!r}, "
                          f"{phase.num_trainable:,} trainable parameters.", flush=True)
            state, metrics = phase.step(state, global_batch(next(train_iter)))
            losses.add(step, metrics)
            if step == first_step + 1:
                jax.block_until_ready(metrics)
                writer.start_clock(step)  # rates exclude the first step's compilation
            if _due(step, every["log_every"], total_steps) or step == first_step + 1:
                writer.write(step, {**losses.flush(), "grad_norm": metrics["grad_norm"],
                                    "lr": lr_at(step - 1), **train_iter.bad_examples.counts()},
                             examples_per_step=batch_size)
            if every["eval_every"] and step % every["eval_every"] == 0 and step != total_steps:
                metrics = evaluate(state)
                writer.write(step, metrics, kind="eval")
                select.observe(step, metrics, state)
            stopping = stop.requested()
            if _due(step, every["checkpoint_every"], total_steps) or stopping or select.stopped:
                losses.check()  # a non-finite state is never saved
                checkpoints.save(step, state, train_iter.get_state())
            if stopping:
                raise stop.stopped(step, os.path.join(workdir, "checkpoints"))
            if select.stopped:
                print(f"Step {step}: no better {select.metric} in {select.patience} "
                      f"evaluations; stopping (best at step {select.best['step']}).", flush=True)
                break

        if not select.stopped:
            final = evaluate(state)
            writer.write(total_steps, final, kind="eval")
            select.observe(total_steps, final, state)
        final = select.final_eval()  # with early_stopping: the best evaluation's
        checkpoints.close()
        if is_chief:
            parameters = {"total": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)),
                          "trainable": phase.num_trainable}
            write_results(workdir, config, final, info, task, total_steps, parameters,
                          {"skipped_updates": losses.skipped,
                           "bad_examples_skipped": train_iter.bad_examples.count,
                           **select.summary()}, initial)
            outputs.plot_curves(workdir, task.main_metric)
    finally:
        stop.close()
        checkpoints.close()
        writer.close()
        run.release()
    return final


def variable_shardings_of(config: ml_collections.ConfigDict, variables: Any, mesh: Any) -> dict:
    """Parameters sharded by config.sharding_rules; other collections replicated."""
    return {"params": sharding.param_shardings(variables["params"], mesh, config.sharding_rules),
            **{k: jax.tree_util.tree_map(lambda _: sharding.replicated(mesh), v)
               for k, v in variables.items() if k != "params"}}


Forward = Callable[[Any, dict, dict, jax.Array], tuple[Any, dict]]


def model_forward(model: Any) -> Forward:
    """(params, model_state, batch, dropout rng) -> (outputs, new model_state), train mode."""

    def forward(params: Any, model_state: dict, batch: dict, rng: jax.Array
                ) -> tuple[Any, dict]:
        inputs = models.inputs_of(model, batch)
        variables = {"params": params, **model_state}
        if model_state:
            return model.apply(variables, inputs, train=True, rngs={"dropout": rng},
                               mutable=list(model_state))
        return model.apply(variables, inputs, train=True, rngs={"dropout": rng}), {}

    return forward


def make_train_step(forward: Forward, loss_fn: Callable[[Any, dict], jnp.ndarray],
                    tx: optax.GradientTransformation, trainable: Any, accum_steps: int = 1,
                    prepare: Callable[[dict, jax.Array], dict] | None = None
                    ) -> Callable[[dict, dict], tuple[dict, dict]]:
    """One update: state -> state with the trainable leaves moved by `tx`.

    Frozen leaves (trainable False) enter the loss through `stop_gradient`, so no gradient
    reaches them and XLA drops the backward pass of a fully frozen prefix; they are
    returned as they came (bitwise unchanged, not p + 0). With accum_steps > 1 the batch
    goes through the model in that many microbatches (`tljax.accumulate`). `prepare(batch,
    rng)` is the task's `train_batch` (label smoothing, mixup, ...), drawn from its own
    stream of the step's RNG.
    """

    def train_step(state: dict, batch: dict) -> tuple[dict, dict]:
        step_rng = jax.random.fold_in(state["rng"], state["step"])
        if prepare is not None:
            batch = prepare(batch, jax.random.fold_in(step_rng, 1))

        def loss_of(params: Any, model_state: dict, batch: dict, rng: jax.Array
                    ) -> tuple[jnp.ndarray, dict]:
            params = jax.tree_util.tree_map(
                lambda p, t: p if t else jax.lax.stop_gradient(p), params, trainable)
            outputs, new_model_state = forward(params, model_state, batch, rng)
            return loss_fn(outputs, batch), new_model_state

        (loss, new_model_state), grads = accumulate.value_and_grad(loss_of, accum_steps)(
            state["params"], state["model_state"], batch, step_rng)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def update(grads: Any, params: Any, opt_state: Any, model_state: dict) -> tuple:
            updates, opt_state = tx.update(grads, opt_state, params)
            params = jax.tree_util.tree_map(lambda p, u, t: p + u.astype(p.dtype) if t else p,
                                            params, updates, trainable)
            return params, model_state, opt_state

        def keep(grads: Any, params: Any, opt_state: Any, new_model_state: dict) -> tuple:
            return params, state["model_state"], opt_state  # the batch statistics as they were

        # A NaN/inf loss or gradient leaves the state as it was (config.on_nonfinite). A
        # branch rather than a select of new against old: the select keeps the old state
        # alive beside the new one, which costs a copy of every donated parameter and
        # optimizer moment per step (1-2% of a ViT-S/16 or Lite0 step on a CPU).
        updated = jax.lax.cond(finite, update, keep, grads, state["params"],
                               state["opt_state"], new_model_state)
        new_state = {"step": state["step"] + 1, "params": updated[0],
                     "model_state": updated[1], "opt_state": updated[2], "rng": state["rng"]}
        return new_state, {"loss": loss, "grad_norm": grad_norm, "finite": finite}

    return train_step


@dataclasses.dataclass
class CompiledPhase:
    """One freeze phase: its labels, optimizer, state shardings and compiled step."""

    index: int
    labels: Any
    tx: optax.GradientTransformation
    state_shardings: dict
    init: Callable[[Any], Any]  # params -> fresh optimizer state, placed in its shardings
    step: Callable[[dict, dict], tuple[dict, dict]]
    num_trainable: int


class Phases:
    """Builds each phase of a `freeze.Plan` once, when first needed (one compile per phase).

    `switch(state, index)` moves a train state into phase `index`: a fresh optimizer state
    for that phase with every leaf the old state holds at the same path carried over
    (`freeze.carry_state`): groups that keep training keep their moments and counts,
    newly trainable groups start from zero, newly frozen ones drop theirs.
    """

    def __init__(self, config: ml_collections.ConfigDict, plan: freeze.Plan, forward: Forward,
                 loss_fn: Any, mesh: Any, variable_shardings: dict, total_steps: int,
                 warmup_steps: int, prepare: Callable[[dict, jax.Array], dict] | None = None):
        self._config, self._plan, self._forward, self._loss_fn = config, plan, forward, loss_fn
        self._prepare = prepare
        self._mesh, self._shardings = mesh, variable_shardings
        self._total, self._warmup = total_steps, warmup_steps
        self._built: dict[int, CompiledPhase] = {}

    @property
    def num_compiled(self) -> int:
        return len(self._built)

    def get(self, index: int) -> CompiledPhase:
        if index not in self._built:
            self._built[index] = self._build(index)
        return self._built[index]

    def _build(self, index: int) -> CompiledPhase:
        mesh, param_shardings = self._mesh, self._shardings["params"]
        tx, labels = optim.phase_optimizer(self._config, self._plan, index, self._total,
                                           self._warmup)
        trainable = optim.trainable_mask(labels)
        param_shapes = self._plan.param_shapes
        opt_shapes = jax.eval_shape(tx.init, param_shapes)
        opt_shardings = sharding.like_params(opt_shapes, param_shapes, param_shardings, mesh)
        state_shardings = {"step": sharding.replicated(mesh), "params": param_shardings,
                           "model_state": {k: v for k, v in self._shardings.items()
                                           if k != "params"},
                           "opt_state": opt_shardings, "rng": sharding.replicated(mesh)}
        decay = self._config.get("ema_decay")
        state_shardings = ema.shardings(state_shardings, decay)
        step = jax.jit(ema.with_ema(make_train_step(self._forward, self._loss_fn, tx, trainable,
                                                    self._config.get("accum_steps") or 1,
                                                    self._prepare), decay),
                       donate_argnums=(0,),
                       out_shardings=(state_shardings, sharding.replicated(mesh)))
        sizes = {n: int(np.prod(x.shape)) for n, x in tree.flatten(param_shapes).items()}
        num_trainable = sum(sizes[n] for n in self._plan.trainable_names(index))
        return CompiledPhase(index, labels, tx, state_shardings,
                             jax.jit(tx.init, out_shardings=opt_shardings), step, num_trainable)

    def switch(self, state: dict, index: int) -> tuple[CompiledPhase, dict]:
        phase = self.get(index)
        opt_state = freeze.carry_state(state["opt_state"], phase.init(state["params"]))
        state = jax.device_put({**state, "opt_state": opt_state}, phase.state_shardings)
        return phase, state


def _due(step: int, interval: int | None, total_steps: int) -> bool:
    return step == total_steps or bool(interval and step % interval == 0)


def make_evaluator(config: ml_collections.ConfigDict, model: Any, task: tasks.Task,
                   global_batch: Any) -> Callable[[dict], dict[str, float]]:
    """The task's metrics over the whole eval split and each of `config.extra_evals`
    (prefixed 'NAME/'), for the weights and for their average ('ema/', tljax.ema).

    The last batch is padded and masked, so no example is dropped or counted twice.
    """

    @jax.jit
    def eval_step(params: Any, model_state: dict, batch: dict) -> dict:
        outputs = task.eval_forward(model, {"params": params, **model_state},
                                    models.inputs_of(model, batch))
        return task.eval_outputs(outputs, batch)

    def metrics_of(params: Any, model_state: dict, where: dict[str, Any]) -> dict[str, float]:
        batches: Iterable[dict] = data.eval_batches(
            dataset=where["dataset"], split=where["split"], pp=where["pp"],
            batch_size=where["batch_size"], data_dir=config.input.get("data_dir"),
            process_index=jax.process_index(), process_count=jax.process_count())
        metrics = task.metrics()
        for batch in batches:
            arrays = eval_step(params, model_state, global_batch(batch))
            metrics.update(multihost_utils.process_allgather(arrays, tiled=True))
        return metrics.result()

    def evaluate(state: dict) -> dict[str, float]:
        return {f"{weights}{prefix}{key}": value
                for weights, params in ema.weights_to_evaluate(state)
                for prefix, where in config_lib.eval_sets(config)
                for key, value in metrics_of(params, state["model_state"], where).items()}

    return evaluate


def report_start(config: ml_collections.ConfigDict, params: Any, labels: Any, mesh: Any,
                 total_steps: int, train_size: int, is_chief: bool) -> None:
    if not is_chief:
        return
    sizes = [(int(np.prod(p.shape)), label) for p, label in zip(
        jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(labels), strict=True)]
    total = sum(n for n, _ in sizes)
    trainable = sum(n for n, label in sizes if label != optim.FROZEN)
    print(f"Model {config.model_name}: {total:,} parameters, {trainable:,} trainable "
          f"({100 * trainable / max(total, 1):.1f}%). Mesh {dict(mesh.shape)} on "
          f"{jax.device_count()} {jax.devices()[0].platform} device(s), "
          f"{jax.process_count()} process(es).", flush=True)
    print(f"Training {total_steps} steps of {config.input.batch_size} examples "
          f"({total_steps * config.input.batch_size / train_size:.2f} epochs of "
          f"{train_size:,}).", flush=True)


def write_results(workdir: str, config: ml_collections.ConfigDict, final: dict[str, float],
                  info: data.DatasetInfo, task: tasks.Task, total_steps: int,
                  parameters: dict[str, int], skipped: dict[str, int] | None = None,
                  initial: dict[str, float] | None = None) -> None:
    results: dict[str, Any] = {
        "final_eval": final, "main_metric": task.main_metric, "steps": total_steps,
        "parameters": parameters,  # trainable: in the last freeze phase
        **(skipped or {}),
        "dataset": info.name, "eval_split": config.eval.split, "task": task.name,
        "class_names": task.output_names, "features": info.features_json(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if initial:
        results["initial_eval"] = initial
    expected = config.get("expected")
    if expected and expected.get("value") is not None:
        metric = expected.get("metric") or task.main_metric
        measured = 100 * final[metric]
        results["expected"] = {**dict(expected), "measured": measured,
                               "within_tolerance": abs(measured - expected.value)
                               <= expected.get("tolerance", 0.0)}
    write_json(os.path.join(workdir, "results.json"), results)
