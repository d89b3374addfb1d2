"""Token classification: CoNLL reading, word-piece alignment, and NER on real tweets (WNUT-16)
through `python -m tljax.main` and `tools/predict.py`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tljax import data
from tljax.data.text import default_tokenizer_path, read_conll

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _align(words, tags, max_len, max_words=None):
    pp = data.Preprocess(f"tokenize_words(max_len={max_len}, max_words={max_words})")
    return pp([{"tokens": words, "tags": np.asarray(tags)}], np.random.default_rng(0))


def test_word_pieces_carry_the_tag_of_their_word_once():
    # MiniLM's uncased WordPiece: [CLS] apple opens in schwarz ##ene ##gger paris ! [SEP] ...
    words = ["Apple", "opens", "in", "Schwarzenegger", "Paris", "!"]
    tags = [1, 0, 0, 3, 5, 0]
    batch = _align(words, tags, max_len=12)
    assert batch["input_ids"][0, 0] == 101 and batch["input_ids"][0, 9] == 102  # CLS, SEP
    assert batch["word_ids"][0].tolist() == [-1, 0, 1, 2, 3, 3, 3, 4, 5, -1, -1, -1]
    # The first piece of each word has its tag; ##ene, ##gger, CLS, SEP and padding: ignored.
    assert batch["tags"][0].tolist() == [-1, 1, 0, 0, 3, -1, -1, 5, 0, -1, -1, -1]
    assert batch["word_tags"][0, :6].tolist() == tags and (batch["word_tags"][0, 6:] == -1).all()
    assert batch["attention_mask"][0].tolist() == [1] * 10 + [0] * 2
    assert "tokens" not in batch


def test_truncated_words_keep_their_gold_tags():
    words = ["Apple", "opens", "in", "Schwarzenegger", "Paris", "!"]
    batch = _align(words, [1, 0, 0, 3, 5, 0], max_len=6)
    # [CLS] apple opens in schwarz [SEP]: Paris and ! have no piece left.
    assert batch["word_ids"][0].tolist() == [-1, 0, 1, 2, 3, -1]
    assert batch["tags"][0].tolist() == [-1, 1, 0, 0, 3, -1]
    assert batch["word_tags"][0].tolist() == [1, 0, 0, 3, 5, 0]  # all six words, for metrics
    with pytest.raises(ValueError, match="max_words=4"):
        _align(words, [0] * 6, max_len=16, max_words=4)


def test_conll_files(tmp_path):
    train = tmp_path / "train.txt"
    train.write_text("-DOCSTART- -X- O O\n\nJohn NNP B-PER\nlives VBZ O\nin IN O\n"
                     "New NNP B-LOC\nYork NNP I-LOC\n\n\nHi UH O\n")
    test = tmp_path / "test.txt"
    test.write_text("Paris\tB-LOC\n \nBob\tB-PER\n")
    assert read_conll(train) == [(["John", "lives", "in", "New", "York"],
                                  ["B-PER", "O", "O", "B-LOC", "I-LOC"]), (["Hi"], ["O"])]
    source, info = data.get_source(f"conll:{train},{test}", "test")
    assert info.class_names("tags") == ["O", "B-LOC", "I-LOC", "B-PER"]
    assert [source[i]["tokens"] for i in range(len(source))] == [["Paris"], ["Bob"]]
    assert source[1]["tags"].tolist() == [3]
    test.write_text("Paris\tB-ORG\n")
    with pytest.raises(ValueError, match=r"tags \['B-ORG'\] do not occur in the training file"):
        data.get_source(f"conll:{train},{test}", "test")
    bad = tmp_path / "bad.txt"
    bad.write_text("John B-PER\nlonely\n")
    with pytest.raises(ValueError, match="bad.txt, line 2"):
        data.get_source(f"conll:{bad}", "train")


def test_wnut16_split():
    train, info = data.get_source("wnut16", "train")
    test, _ = data.get_source("wnut16", "test")
    assert (len(train), len(test)) == (1916, 478)
    words = sum(len(train[i]["tokens"]) for i in range(len(train)))
    words += sum(len(test[i]["tokens"]) for i in range(len(test)))
    assert words == 46469
    types = {t[2:] for t in info.class_names("tags") if t != "O"}
    assert types == {"company", "facility", "geo-loc", "movie", "musicartist", "other",
                     "person", "product", "sportsteam", "tvshow"}


# ---------------------------------------------------------------------------------------------
# A real run.


@pytest.fixture(scope="module")
def ner_run(tmp_path_factory):
    assert os.path.exists(default_tokenizer_path())
    workdir = tmp_path_factory.mktemp("ner") / "run"
    result = subprocess.run(
        [sys.executable, "-m", "tljax.main", "--config=configs/ner.py:runlocal",
         f"--workdir={workdir}"], cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


@pytest.mark.slow
def test_ner_runlocal_finds_entities_in_held_out_tweets(ner_run):
    """The majority-tag baseline (every word 'O') has entity F1 0; a short fine-tune of
    MiniLM must reach at least 0.2 on the 478 held-out tweets."""
    results = json.loads((ner_run / "results.json").read_text())
    final = results["final_eval"]
    print(f"WNUT-16 runlocal: F1 {final['f1']:.3f}, P {final['precision']:.3f}, "
          f"R {final['recall']:.3f}, token accuracy {final['token_accuracy']:.3f}")
    assert final["f1"] >= 0.2 and final["examples"] == 478
    assert results["task"] == "token_classification" and results["main_metric"] == "f1"


@pytest.mark.slow
def test_predict_prints_entities(ner_run):
    result = subprocess.run(
        [sys.executable, "tools/predict.py", f"--workdir={ner_run}",
         "Apple opens a new store in Paris", "the weather is nice today"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    first, second = result.stdout.strip().splitlines()
    found, _, shown = first.partition("\t")
    assert shown == "Apple opens a new store in Paris"
    assert "Paris [geo-loc]" in found, first
    assert second.startswith("no entities\t"), second
