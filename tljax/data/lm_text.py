"""Batch ops for language models: token rows with loss masks, packing, seq2seq pairs.

Tokenizers are `tokenizers` files (tokenizer.json; `tljax.pretrained.gguf` writes one for
a GGUF model); text is encoded without the tokenizer's own special tokens, and the ops
add the ones asked for by name (`bos='<|im_start|>'`, `eos='<|endoftext|>'`). Each part of
a row (prompt, text, suffix) is encoded on its own.

tokenize_lm (decoder LMs: causal_lm, classification from the last token, verbaliser)

    row       = [bos] + prompt + text + suffix + [eos]        right-padded to max_len
    loss_mask = 1 on text, suffix and eos tokens: what the causal_lm loss predicts

  `prompt` comes from batch[prompt_key] when the batch has it (instruction / completion
  data: no loss on the prompt), `text` from batch[key]. Rows longer than max_len lose the
  end of their text; if bos, prompt, suffix and eos alone do not fit, the prompt loses its
  beginning. A batch without `key` holds generation prompts (tools/predict.py): rows
  are [bos] + prompt, nothing after, for the model to continue.

pack(rows) (after tokenize_lm; training)

  The batch's B documents (each row's real tokens), in order, go each into the first of
  `rows` rows of max_len tokens with room for it (first fit); a document that fits in no
  row is left out (`documents` counts the documents in each row: choose `rows` so that
  B - sum(documents) is small). Each document gets its own `segment_ids` value (1, 2, ...
  within a row; 0 on padding): the decoders attend within a segment only and restart
  positions at each segment, so a packed document's logits equal its logits alone, and
  the causal_lm loss does not predict a document's first token from the one before it.
  Every other key of the batch (one value per document) is dropped. In evaluation, rows
  get `mask` True when they hold a real example; evaluate unpacked to score every
  document.

tokenize_seq2seq (encoder-decoder: the seq2seq task)

    input_ids / attention_mask       text + [eos], right-padded to max_len
    targets / target_mask            target + [eos], right-padded to max_target_len
    decoder_input_ids / _attention_mask  [decoder_start] + targets[:-1] (teacher forcing)

  Without `target_key` in the batch (prediction) only the encoder inputs are made.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np

from tljax.data.preprocess import Batch, BatchOp, register
from tljax.data.text import tokenizer_file


@functools.lru_cache(maxsize=8)
def load_raw_tokenizer(path: str):
    """A `tokenizers.Tokenizer` without truncation or padding."""
    from tokenizers import Tokenizer

    file = tokenizer_file(path)
    if file.suffix != ".json":
        raise ValueError(f"Language-model ops need a tokenizer.json, got {file}.")
    tok = Tokenizer.from_file(str(file))
    tok.no_truncation()
    tok.no_padding()
    return tok


def token_id(tokenizer: Any, token: str | int | None, what: str) -> int | None:
    """The id of special token `token` (a string or already an id), None for None."""
    if token is None or isinstance(token, int):
        return token
    found = tokenizer.token_to_id(token)
    if found is None:
        raise ValueError(f"{what}={token!r} is not a token of this tokenizer.")
    return found


def _texts(values: Any) -> list[str]:
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


def _encode(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in tokenizer.encode_batch(list(texts), add_special_tokens=False)]


@register("tokenize_lm", batched=True)
def tokenize_lm(max_len: int = 128, tokenizer: str | None = None, key: str = "text",
                prompt_key: str = "prompt", suffix: str = "", bos: str | int | None = None,
                eos: str | int | None = None, pad: str | int | None = None) -> BatchOp:
    """Texts -> input_ids, attention_mask, loss_mask (B, max_len); see the module docstring.

    `pad` (default: eos, else id 0) fills the padding; it is masked everywhere.
    """
    if tokenizer is None:
        raise ValueError("tokenize_lm needs tokenizer='/path/to/tokenizer.json'.")
    tok = load_raw_tokenizer(tokenizer)  # fails at parse time on a bad path
    bos_id, eos_id = token_id(tok, bos, "bos"), token_id(tok, eos, "eos")
    pad_id = token_id(tok, pad, "pad")
    pad_id = pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)
    suffix_ids = _encode(tok, [suffix])[0] if suffix else []
    head = [bos_id] if bos_id is not None else []

    def op(batch: Batch) -> Batch:
        batch = dict(batch)
        n = len(next(iter(batch.values())))
        has_text = key in batch
        texts = _encodings_or_empty(tok, batch.pop(key, None), n)
        prompts = _encodings_or_empty(tok, batch.pop(prompt_key, None), n)
        ids = np.full((n, max_len), pad_id, np.int32)
        mask = np.zeros((n, max_len), np.int32)
        loss = np.zeros((n, max_len), np.int32)
        for i, (prompt, text) in enumerate(zip(prompts, texts, strict=True)):
            if has_text:
                tail = suffix_ids + ([eos_id] if eos_id is not None else [])
                room = max(max_len - len(head) - len(tail), 0)
                prompt = prompt[max(len(prompt) - room, 0):]
                text = text[:room - len(prompt)]
                target = text + tail
            else:  # a generation prompt: the model continues after it
                prompt, target = prompt[max(len(prompt) - (max_len - len(head)), 0):], []
            row = (head + prompt + target)[:max_len]
            ids[i, :len(row)] = row
            mask[i, :len(row)] = 1
            start = min(len(head) + len(prompt), max_len)
            loss[i, start:len(row)] = 1
        return {**batch, "input_ids": ids, "attention_mask": mask, "loss_mask": loss}

    op.reads = key
    return op


def _encodings_or_empty(tokenizer: Any, values: Any, n: int) -> list[list[int]]:
    return [[] for _ in range(n)] if values is None else _encode(tokenizer, _texts(values))


@register("pack", batched=True)
def pack(rows: int) -> BatchOp:
    """Documents of a tokenize_lm batch -> `rows` packed rows; see the module docstring."""
    if not isinstance(rows, int) or rows < 1:
        raise ValueError(f"pack(rows={rows!r}): rows must be a positive integer.")

    def op(batch: Batch) -> Batch:
        missing = {"input_ids", "attention_mask", "loss_mask"} - set(batch)
        if missing:
            raise ValueError(f"pack needs tokenize_lm's outputs before it; the batch lacks "
                             f"{sorted(missing)}.")
        ids, mask, loss = (np.asarray(batch[k]) for k in ("input_ids", "attention_mask",
                                                           "loss_mask"))
        length = ids.shape[1]
        real = np.asarray(batch.get("mask", np.ones(len(ids), bool)), bool)
        out = {k: np.zeros((rows, length), np.int32) for k in ("input_ids", "attention_mask",
                                                               "loss_mask", "segment_ids")}
        used = np.zeros(rows, np.int64)
        documents = np.zeros(rows, np.int32)
        for i in np.flatnonzero(real):
            keep = mask[i] > 0
            size = int(keep.sum())
            fits = np.flatnonzero(used + size <= length)
            if size == 0 or not fits.size:
                continue
            r, start = fits[0], used[fits[0]]
            span = slice(start, start + size)
            out["input_ids"][r, span] = ids[i][keep]
            out["attention_mask"][r, span] = 1
            out["loss_mask"][r, span] = loss[i][keep]
            documents[r] += 1
            out["segment_ids"][r, span] = documents[r]
            used[r] += size
        out["documents"] = documents
        if "mask" in batch:
            out["mask"] = documents > 0
        return out

    return op


@register("tokenize_seq2seq", batched=True)
def tokenize_seq2seq(max_len: int = 128, max_target_len: int = 32, tokenizer: str | None = None,
                     key: str = "text", target_key: str = "target", eos: str | int | None = None,
                     pad: str | int = 0, decoder_start: str | int = 0) -> BatchOp:
    """Source and target texts -> encoder inputs, teacher-forcing decoder inputs and targets
    (see the module docstring). T5: eos='</s>', pad and decoder_start 0 ('<pad>')."""
    if tokenizer is None:
        raise ValueError("tokenize_seq2seq needs tokenizer='/path/to/tokenizer.json'.")
    tok = load_raw_tokenizer(tokenizer)
    eos_id = token_id(tok, eos, "eos")
    pad_id, start_id = token_id(tok, pad, "pad"), token_id(tok, decoder_start, "decoder_start")
    tail = [eos_id] if eos_id is not None else []

    def rows(sequences: list[list[int]], width: int) -> tuple[np.ndarray, np.ndarray]:
        ids = np.full((len(sequences), width), pad_id, np.int32)
        mask = np.zeros((len(sequences), width), np.int32)
        for i, seq in enumerate(sequences):
            seq = (seq[:width - len(tail)] + tail)[:width]
            ids[i, :len(seq)], mask[i, :len(seq)] = seq, 1
        return ids, mask

    def op(batch: Batch) -> Batch:
        batch = dict(batch)
        out = {}
        out["input_ids"], out["attention_mask"] = rows(_encode(tok, _texts(batch.pop(key))),
                                                       max_len)
        if target_key in batch:
            targets, target_mask = rows(_encode(tok, _texts(batch.pop(target_key))),
                                        max_target_len)
            start = np.full((len(targets), 1), start_id, np.int32)
            out["targets"], out["target_mask"] = targets, target_mask
            out["decoder_input_ids"] = np.concatenate([start, targets[:, :-1]], axis=1)
            out["decoder_attention_mask"] = np.concatenate(
                [np.ones_like(start), target_mask[:, :-1]], axis=1)
        return {**batch, **out}

    op.reads = key
    return op
