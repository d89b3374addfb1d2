"""Language models (GPT-2, Llama, T5): parity with HF transformers, KV cache, generation,
conversion both ways, block groups, LoRA targets, remat and dtypes.

References are live `transformers` models (CPU torch) whose every tensor (norm scales
included) is random, with unusual shapes (odd widths, head_dim != width / heads, GQA with
3 key/value heads, few layers, tied and untied outputs) and padded batches (one row
left-padded, one right-padded). HF forward calls get `position_ids = cumsum(mask) - 1`,
what tljax computes from the mask (and HF's `generate` passes). Logits are compared on
real tokens only, in float32.
"""

from __future__ import annotations

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tljax
from tljax import generate as gen
from tljax import tree
from tljax.models import Model, build_backbone, lm, lora
from tljax.models import t5 as t5_lib
from tljax.pretrained import gpt2 as pretrained_gpt2
from tljax.pretrained import hf_lm
from tljax.pretrained import llama as pretrained_llama

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 97
TOL = 1e-4


def _hf_case(name: str):
    """(tljax family, random HF model) for a named configuration."""
    t = transformers
    if name.startswith("gpt2"):
        config = t.GPT2Config(vocab_size=VOCAB, n_embd=36, n_layer=2, n_head=3, n_positions=24,
                              n_inner=50, bos_token_id=0, eos_token_id=0,
                              tie_word_embeddings=name == "gpt2-tied")
        return "gpt2", t.GPT2LMHeadModel(config)
    if name == "llama-gqa-tied":  # 9 query heads on 3 KV heads, head_dim 8, width 54
        config = t.LlamaConfig(vocab_size=VOCAB, hidden_size=54, num_hidden_layers=2,
                               num_attention_heads=9, num_key_value_heads=3, head_dim=8,
                               intermediate_size=70, rope_theta=500.0, rms_norm_eps=1e-5,
                               tie_word_embeddings=True)
        return "llama", t.LlamaForCausalLM(config)
    if name == "llama-untied-bias":  # 6 heads on 3 KV heads, biases, untied head
        config = t.LlamaConfig(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=3,
                               num_attention_heads=6, num_key_value_heads=3, head_dim=10,
                               intermediate_size=38, attention_bias=True, mlp_bias=True,
                               tie_word_embeddings=False)
        return "llama", t.LlamaForCausalLM(config)
    if name.startswith("t5"):
        v11 = name == "t5-v1.1"  # gated-GELU, own lm_head, no output scale
        config = t.T5Config(vocab_size=VOCAB, d_model=30, d_kv=7, d_ff=44, num_layers=2,
                            num_decoder_layers=3, num_heads=3, relative_attention_num_buckets=8,
                            relative_attention_max_distance=20,
                            feed_forward_proj="gated-gelu" if v11 else "relu",
                            tie_word_embeddings=not v11)
        model = t.T5ForConditionalGeneration(config)
        if v11:  # transformers 5 ties lm_head at init; give it its own tensor
            model.lm_head.weight = torch.nn.Parameter(torch.empty(VOCAB, 30))
        return "t5", model
    raise KeyError(name)


CASES = ["gpt2-tied", "gpt2-untied", "llama-gqa-tied", "llama-untied-bias", "t5-v1.0", "t5-v1.1"]


def _randomize(model):
    """Every tensor random, so a swapped or untransposed mapping cannot pass by accident."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm = any(s in name for s in ("norm", "ln_")) and name.endswith("weight")
            p.copy_((1.0 if is_norm else 0.0) + 0.2 * torch.randn_like(p))
    return model.eval()


def _state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _batch(length: int = 9, seed: int = 0) -> dict[str, np.ndarray]:
    """3 rows: full, left-padded (3 pads), right-padded (3 pads)."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(3, VOCAB, (3, length)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    mask[2, -3:] = 0
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _seq2seq_batch() -> dict[str, np.ndarray]:
    batch = _batch()
    rng = np.random.RandomState(1)
    dec = rng.randint(3, VOCAB, (3, 6)).astype(np.int32)
    dec_mask = np.ones_like(dec)
    dec_mask[2, 4:] = 0
    return {**batch, "decoder_input_ids": dec, "decoder_attention_mask": dec_mask}


def _hf_logits(family: str, model, batch: dict[str, np.ndarray]) -> np.ndarray:
    t = {k: torch.tensor(np.asarray(v), dtype=torch.long) for k, v in batch.items()}
    with torch.no_grad():
        if family == "t5":
            return model(**t).logits.numpy()
        positions = torch.clamp(torch.cumsum(t["attention_mask"], 1) - 1, min=0)
        return model(**t, position_ids=positions).logits.numpy()


@functools.partial(jax.jit, static_argnums=0)
def _jit_logits(model, variables, batch):
    if isinstance(model, Model):  # a backbone with its LM head (load_pretrained)
        return model.apply(variables, batch)
    features, out = model.apply(variables, batch)
    return lm.lm_logits(model, variables, features, out)


def _logits(model, variables, batch) -> np.ndarray:
    """Logits of one uncached forward pass (jit-compiled: faster than op-by-op on CPU)."""
    return np.asarray(_jit_logits(model, variables, {k: jnp.asarray(v) for k, v in batch.items()}))


def _real(family: str, batch) -> np.ndarray:
    return np.asarray(batch["decoder_attention_mask" if family == "t5" else "attention_mask"]) > 0


def _converter(family: str):
    import importlib

    return importlib.import_module(f"tljax.pretrained.{family}")


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(case):
    family, hf = _hf_case(case)
    hf = _randomize(hf)
    batch = _seq2seq_batch() if family == "t5" else _batch()
    variables, kwargs = _converter(family).convert_hf(_state(hf), hf.config.to_dict())
    model = build_backbone(family, **kwargs)
    assert model.tie_word_embeddings == (case.endswith("-tied") or case == "t5-v1.0")
    assert ("head" in variables["params"]) != model.tie_word_embeddings
    ours, ref = _logits(model, variables, batch), _hf_logits(family, hf, batch)
    real = _real(family, batch)
    assert np.abs(ref[real]).max() > 0.5  # logits are not trivially small
    np.testing.assert_allclose(ours[real], ref[real], rtol=0, atol=TOL)


def test_relative_position_buckets_match_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = np.arange(-300, 301)[None, :] - np.zeros((1, 1), np.int64)
    for bidirectional in (True, False):
        for buckets, distance in ((32, 128), (8, 20)):
            ref = T5Attention._relative_position_bucket(torch.tensor(rel), bidirectional,
                                                        buckets, distance).numpy()
            ours = t5_lib.relative_position_bucket(jnp.asarray(rel), bidirectional, buckets,
                                                   distance)
            np.testing.assert_array_equal(np.asarray(ours), ref)


# ---------------------------------------------------------------------------------------------
# KV cache and generation on tiny random models.

TINY = {
    "gpt2": dict(vocab_size=VOCAB, hidden_size=24, num_layers=2, num_heads=3,
                 max_position_embeddings=32, dropout=0.1, attention_dropout=0.1),
    "llama": dict(vocab_size=VOCAB, hidden_size=30, num_layers=2, num_heads=6, num_kv_heads=3,
                  head_dim=6, intermediate_size=40, rope_theta=100.0),
    "t5": dict(vocab_size=VOCAB, hidden_size=24, num_layers=2, num_decoder_layers=2,
               num_heads=3, head_dim=6, intermediate_size=40, relative_attention_num_buckets=8,
               relative_attention_max_distance=12, feed_forward_proj="gated-gelu",
               tie_word_embeddings=False),
}


@functools.cache
def _tiny(family: str):
    """A tiny model with random weights large enough for O(1) logits."""
    model = build_backbone(family, **TINY[family])
    variables = lm.init(model, jax.random.PRNGKey(0))
    rng = jax.random.PRNGKey(1)
    variables = tree.map_with_names(
        lambda n, x: x + 0.3 * jax.random.normal(jax.random.fold_in(rng, zlib.crc32(n.encode())),
                                                 x.shape), variables)
    return model, variables


def _full_logits(model, variables, prompt, new):
    """Logits (B, T + 1, V) predicting each of new[:, 0..T-1] and the token after them, from
    one full forward pass (no cache): causal attention makes position t see only tokens up
    to t. Decoder-only rows read at their last real prompt token, then at the new slots."""
    if "decoder_input_ids" in model.inputs:
        start = np.full((new.shape[0], 1), model.decoder_start_token_id, np.int32)
        batch = {**prompt, "decoder_input_ids": np.concatenate([start, new], axis=1)}
        return _logits(model, variables, batch)
    mask = prompt["attention_mask"]
    batch = {"input_ids": np.concatenate([prompt["input_ids"], new], axis=1),
             "attention_mask": np.concatenate([mask, np.ones_like(new)], axis=1)}
    logits = _logits(model, variables, batch)
    length = mask.shape[1]
    last = length - 1 - np.argmax(mask[:, ::-1] > 0, axis=1)
    first = logits[np.arange(len(mask)), last][:, None]
    return np.concatenate([first, logits[:, length:]], axis=1)


@pytest.mark.parametrize("family", ["gpt2", "llama", "t5"])
def test_kv_cache_decoding_equals_full_recomputation(family):
    model, variables = _tiny(family)
    prompt = _batch(length=7)
    new = np.random.RandomState(3).randint(3, VOCAB, (3, 4)).astype(np.int32)
    full = _full_logits(model, variables, prompt, new)
    assert np.abs(full).max() > 0.5
    decoder = model.clone(decode=True)
    seq2seq = family == "t5"
    encoded = model.apply(variables, prompt, method="encode") if seq2seq else None

    @jax.jit
    def step(cache, ids, mask):
        inputs = {"input_ids": ids, "attention_mask": mask}
        kwargs = {}
        if seq2seq:
            inputs = {**prompt, "decoder_input_ids": ids, "decoder_attention_mask": mask}
            kwargs = {"encoded": encoded}
        (features, out), state = decoder.apply({**variables, "cache": cache}, inputs,
                                               mutable=["cache"], **kwargs)
        return lm.lm_logits(model, variables, features, out), state["cache"]

    cache = lm.init_cache(model, 3, (1 if seq2seq else 7) + new.shape[1])
    if seq2seq:
        start = np.full((3, 1), model.decoder_start_token_id, np.int32)
        logits, cache = step(cache, start, np.ones_like(start))
    else:  # prefill: every real prompt position matches the uncached forward pass
        logits, cache = step(cache, prompt["input_ids"], prompt["attention_mask"])
        real = prompt["attention_mask"] > 0
        np.testing.assert_allclose(np.asarray(logits)[real],
                                   _logits(model, variables, prompt)[real], rtol=0, atol=TOL)
        logits = logits[np.arange(3), 6 - np.argmax(real[:, ::-1], axis=1)][:, None]
    np.testing.assert_allclose(np.asarray(logits)[:, -1], full[:, 0], rtol=0, atol=TOL)
    for t in range(new.shape[1]):
        logits, cache = step(cache, new[:, t:t + 1], np.ones((3, 1), np.int32))
        np.testing.assert_allclose(np.asarray(logits)[:, -1], full[:, t + 1], rtol=0, atol=TOL)


@pytest.mark.parametrize("family", ["gpt2", "llama", "t5"])
def test_greedy_generation_is_argmax_of_full_recomputation(family):
    model, variables = _tiny(family)
    prompt = _batch(length=6, seed=5)
    steps = 5
    tokens = gen.generate(model, variables, prompt["input_ids"], prompt["attention_mask"],
                          max_new_tokens=steps)
    assert tokens.shape == (3, steps)
    expected = _full_logits(model, variables, prompt, tokens)[:, :steps].argmax(-1)
    np.testing.assert_array_equal(tokens, expected)


def test_padding_side_does_not_change_real_tokens():
    """A sequence alone, left-padded and right-padded gives the same states for its tokens."""
    ids = np.array([[11, 12, 13, 14]], np.int32)
    padded = np.array([[0, 0, 11, 12, 13, 14], [11, 12, 13, 14, 0, 0]], np.int32)
    mask = (padded > 0).astype(np.int32)
    for family in ("gpt2", "llama"):
        model, variables = _tiny(family)
        features = jax.jit(lambda v, b, m=model: m.apply(v, b)[0])
        alone = np.asarray(features(variables, {"input_ids": ids}))[0]
        feats = np.asarray(features(variables, {"input_ids": padded, "attention_mask": mask}))
        for row in range(2):
            np.testing.assert_allclose(feats[row][mask[row] > 0], alone, rtol=0, atol=1e-5)


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
    probs = np.array([0.05, 0.5, 0.15, 0.3])  # sorted: 0.5 (1), 0.3 (3), 0.15 (2), 0.05 (0)
    logits = jnp.log(jnp.asarray(probs))[None]
    kept = lambda p: set(np.flatnonzero(np.isfinite(np.asarray(gen.nucleus_logits(logits,
                                                                                 p))[0])))
    assert kept(0.01) == {1}  # the most likely token always stays
    assert kept(0.5) == {1}
    assert kept(0.51) == {1, 3}
    assert kept(0.8) == {1, 3}  # 0.5 + 0.3 reaches 0.8
    assert kept(0.81) == {1, 3, 2}
    assert kept(1.0) == {0, 1, 2, 3}


def test_sampling_draws_from_the_renormalised_nucleus():
    probs = np.array([0.05, 0.5, 0.15, 0.3])
    logits = jnp.tile(jnp.log(jnp.asarray(probs))[None], (20000, 1))
    draws = np.asarray(gen.choose(logits, jax.random.PRNGKey(0), 1.0, 0.7))
    assert set(np.unique(draws)) == {1, 3}
    assert abs(np.mean(draws == 1) - 0.5 / 0.8) < 0.02
    # Temperature 0.5 squares the odds: p ~ (0.5^2, 0.3^2) within the same nucleus.
    draws = np.asarray(gen.choose(logits, jax.random.PRNGKey(1), 0.5, 0.7))
    assert abs(np.mean(draws == 1) - 0.25 / 0.34) < 0.02


def test_sampled_generation_is_reproducible_and_stops_at_eos():
    model, variables = _tiny("llama")
    prompt = _batch(length=6, seed=5)
    args = (model, variables, prompt["input_ids"], prompt["attention_mask"], 6)
    a = gen.generate(*args, temperature=1.0, top_p=0.9, rng=jax.random.PRNGKey(4))
    b = gen.generate(*args, temperature=1.0, top_p=0.9, rng=jax.random.PRNGKey(4))
    np.testing.assert_array_equal(a, b)
    greedy = gen.generate(*args)
    eos = int(greedy[0, 1])  # row 0 meets it at step 1 (or before)
    stopped = gen.generate(*args, eos_id=eos)
    for row in stopped:
        hits = np.flatnonzero(row == eos)
        if hits.size:
            assert np.all(row[hits[0]:] == eos)
    first = np.flatnonzero(greedy[0] == eos)[0]
    np.testing.assert_array_equal(stopped[0, :first + 1], greedy[0, :first + 1])


def test_generate_rejects_bad_arguments():
    model, variables = _tiny("gpt2")
    with pytest.raises(ValueError, match="max_position_embeddings"):
        gen.generate(model, variables, np.ones((1, 30)), max_new_tokens=3)  # 33 > 32
    with pytest.raises(ValueError, match="top_p"):
        gen.generate(model, variables, np.ones((1, 3)), top_p=0.0)
    with pytest.raises(ValueError, match="real token"):
        gen.generate(model, variables, np.ones((1, 3)), np.zeros((1, 3)))


# ---------------------------------------------------------------------------------------------
# Conversion both ways and loading.


@pytest.mark.parametrize("case", ["gpt2-tied", "gpt2-untied", "llama-gqa-tied",
                                  "llama-untied-bias"])
def test_export_round_trip_through_transformers(case, tmp_path):
    family, hf = _hf_case(case)
    hf = _randomize(hf)
    state = _state(hf)
    variables, kwargs = _converter(family).convert_hf(state, hf.config.to_dict())
    export = {"gpt2": pretrained_gpt2.export_gpt2_to_hf,
              "llama": pretrained_llama.export_llama_to_hf}[family]
    export(variables, kwargs, str(tmp_path))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert type(reloaded) is type(hf)
    for name, value in _state(reloaded).items():
        if name in state:
            np.testing.assert_array_equal(value, state[name], err_msg=name)
    batch = _batch()
    model = build_backbone(family, **kwargs)
    real = _real(family, batch)
    np.testing.assert_allclose(_logits(model, variables, batch)[real],
                               _hf_logits(family, reloaded, batch)[real], rtol=0, atol=TOL)


@pytest.mark.parametrize("case", ["gpt2-untied", "llama-gqa-tied", "t5-v1.1"])
def test_load_pretrained_hf_directory(case, tmp_path):
    family, hf = _hf_case(case)
    hf = _randomize(hf)
    sharded = case.startswith("llama")  # model-0000i-of-0000n.safetensors + index.json
    hf.save_pretrained(str(tmp_path), max_shard_size="20KB" if sharded else "5GB")
    assert (tmp_path / "model.safetensors.index.json").exists() == sharded
    (tmp_path / "tokenizer.json").write_text("{}")
    model, variables, info = tljax.load_pretrained(f"hf:{tmp_path}")
    assert info.model_name == family and info.tokenizer_path == str(tmp_path / "tokenizer.json")
    assert isinstance(model, Model) and isinstance(model.head, lm.LMHead)
    assert info.task == ("seq2seq" if family == "t5" else "causal_lm")
    batch = _seq2seq_batch() if family == "t5" else _batch()
    real = _real(family, batch)
    np.testing.assert_allclose(_logits(model, variables, batch)[real],
                               _hf_logits(family, hf, batch)[real], rtol=0, atol=TOL)
    with pytest.raises(ValueError, match="num_classes"):
        tljax.load_pretrained(f"hf:{tmp_path}", num_classes=3)


def test_converter_reports_unused_and_missing_tensors():
    family, hf = _hf_case("llama-gqa-tied")
    state, config = _state(hf), hf.config.to_dict()
    with pytest.raises(ValueError, match="no place"):
        pretrained_llama.convert_hf({**state, "model.extra.weight": np.zeros(3)}, config)
    del state["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(KeyError, match="up_proj"):
        pretrained_llama.convert_hf(state, config)
    with pytest.raises(ValueError, match="rope"):
        pretrained_llama.convert_hf(_state(hf), {**config, "rope_parameters": {
            "rope_type": "llama3", "rope_theta": 5e5}})
    assert hf_lm.FAMILIES == ("gpt2", "llama", "t5")


# ---------------------------------------------------------------------------------------------
# Contract with the trainer: block groups, LoRA targets, remat, dtypes, dropout.


@pytest.mark.parametrize("family", ["gpt2", "llama", "t5"])
def test_blocks_cover_every_parameter_once_in_order(family):
    model, variables = _tiny(family)
    blocks = model.blocks()
    for name in tree.flatten(variables["params"]):
        hits = [i for i, b in enumerate(blocks) if tree.first_match(name, [b]) is not None]
        assert len(hits) == 1, (name, hits)
    assert tree.first_match("embed/embedding", blocks[:1]) == 0 and blocks[-1] == "^head/"
    assert tree.first_match("norm/scale", blocks) in (len(blocks) - 2, None)


@pytest.mark.parametrize("family,adapted", [("gpt2", 2 * 6), ("llama", 2 * 7), ("t5", 2 * 7 + 2 * 11)])
def test_lora_default_targets_cover_attention_and_mlp(family, adapted):
    model, variables = _tiny(family)
    inputs = lm.example_inputs(model, 2, 5)
    lora_model = lora.LoRA(model, rank=2, alpha=4.0)
    with_adapters = lora_model.add_adapters(variables, jax.random.PRNGKey(2), inputs)
    assert lora.count_adapters(with_adapters["params"])[0] == adapted
    names = tree.flatten(with_adapters["params"]["lora"])
    assert any("/attn/q/" in n for n in names) and any("/mlp/down/" in n for n in names)
    base = model.apply(variables, inputs)[0]
    np.testing.assert_array_equal(lora_model.apply(with_adapters, inputs)[0], base)


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_remat_gives_the_same_values_and_gradients(family):
    model, variables = _tiny(family)
    remat = model.clone(remat=True)
    inputs = {k: v for k, v in (_seq2seq_batch() if family == "t5" else _batch()).items()}

    def loss(m, v):
        features, out = m.apply(v, inputs)
        return jnp.mean(lm.lm_logits(m, v, features, out) ** 2)

    value, grads = jax.jit(jax.value_and_grad(lambda v: loss(model, v)))(variables)
    remat_value, remat_grads = jax.jit(jax.value_and_grad(lambda v: loss(remat, v)))(variables)
    np.testing.assert_allclose(remat_value, value, rtol=1e-6)
    for (n, a), b in zip(tree.flatten(grads).items(), tree.flatten(remat_grads).values(),
                         strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=n)


@pytest.mark.parametrize("family", ["gpt2", "llama", "t5"])
def test_bfloat16_compute_and_storage(family):
    model = build_backbone(family, **TINY[family])
    variables = lm.init(model, jax.random.PRNGKey(0))  # the family's own initialisation
    batch = _seq2seq_batch() if family == "t5" else _batch()
    ref = _logits(model, variables, batch)
    got = _logits(model.clone(dtype=jnp.bfloat16), variables, batch)
    assert got.dtype == np.float32
    real = _real(family, batch)
    assert np.abs(got[real] - ref[real]).max() < 0.03 * np.abs(ref[real]).max()
    shapes = lm.abstract_variables(model.clone(param_dtype=jnp.bfloat16))
    assert {x.dtype for x in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.bfloat16)}


def test_dropout_only_in_training():
    model, variables = _tiny("gpt2")
    batch = _batch()
    a = model.apply(variables, batch)[0]
    np.testing.assert_array_equal(a, model.apply(variables, batch)[0])
    b = model.apply(variables, batch, train=True, rngs={"dropout": jax.random.PRNGKey(0)})[0]
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3


def test_shift_right_builds_teacher_forcing_inputs():
    labels = np.array([[5, 6, 7, -100]])
    np.testing.assert_array_equal(t5_lib.shift_right(labels, 0, 0), [[0, 5, 6, 7]])
    np.testing.assert_array_equal(t5_lib.shift_right(np.array([[5, -100, 7]]), 2, 0),
                                  [[2, 5, 0]])
