"""Synthesized speech datasets: deterministic builds, fixed splits, readable audio folders."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tljax import data
from tljax.data import audio, prepare, speech

TINY = {
    "spoken_keywords": dict(train_per_class=2, test_per_class=1),
    "spoken_speakers": dict(num_speakers=3, train_per_speaker=2, test_per_speaker=1),
    "spoken_languages": dict(train_per_language=2, test_per_language=1),
}

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                reason="espeak-ng missing: apt-get install espeak-ng (make setup)")


def _hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("speech")
    return {name: speech.build(name, root / name, **TINY[name]) for name in speech.NAMES}


@pytest.mark.parametrize("name", speech.NAMES)
def test_builds_are_identical(built, name, tmp_path):
    again = speech.build(name, tmp_path / name, workers=1, **TINY[name])
    first = _hashes(built[name])
    assert first == _hashes(again) and len(first) > 9
    manifest = json.loads((again / audio.MANIFEST).read_text())
    listed = {f["file"]: f["sha256"] for f in manifest["files"]}
    assert listed == {k: v for k, v in first.items() if k != audio.MANIFEST}
    assert manifest["synthesized"] and manifest["generator"]["espeak-ng"]
    other_seed = speech.build(name, tmp_path / "seed1", seed=1, **TINY[name])
    assert _hashes(other_seed) != first


def test_layout_is_an_audio_folder(built):
    expected_classes = {
        "spoken_keywords": sorted(speech.KEYWORDS),
        "spoken_speakers": sorted(f"{a}+{v}" for a, v, _ in speech.SPEAKERS[:3]),
        "spoken_languages": sorted(speech.SENTENCES),
    }
    for name, root in built.items():
        classes, splits = audio.folder_splits(root)
        assert classes == expected_classes[name]
        sizes = TINY[name]
        per_class = [v for k, v in sizes.items() if k.startswith("train_per")][0]
        assert len(splits["train"]) == per_class * len(classes)
        assert len(splits["test"]) == len(classes)
        for i in range(len(splits["test"])):
            example = splits["test"][i]
            assert example["sample_rate"] == 16000 and example["audio"].dtype == np.float32
            # Speech at >= -30 dBFS RMS peaks above 10^(-30/20); loud clips are scaled to 0.95.
            assert 0.03 < np.abs(example["audio"]).max() <= 0.95 + 1e-4
            if name == "spoken_keywords":
                assert example["audio"].shape == (16000,)


def test_splits_hold_out_speakers_and_sentences(built):
    files = {name: json.loads((root / audio.MANIFEST).read_text())["files"]
             for name, root in built.items()}
    variants = lambda split, name: {f["voice"].split("+")[1] for f in files[name]
                                    if f["split"] == split}
    for name in ("spoken_keywords", "spoken_languages"):
        assert not variants("train", name) & variants("test", name)
    texts = lambda split: {f["text"] for f in files["spoken_languages"] if f["split"] == split}
    assert not texts("train") & texts("test")
    voices = lambda split: {f["voice"] for f in files["spoken_speakers"] if f["split"] == split}
    assert voices("train") == voices("test")  # speaker identification: same voices


def test_prepare_and_read_by_name(tmp_path, monkeypatch):
    real_build = speech.build
    monkeypatch.setattr(speech, "build", lambda name, root: real_build(
        name, root, **TINY[name]))
    path = prepare.prepare("spoken_speakers", str(tmp_path))
    assert Path(path) == tmp_path / "spoken_speakers"
    before = _hashes(Path(path))
    assert prepare.prepare("spoken_speakers", str(tmp_path)) == path  # a no-op
    assert _hashes(Path(path)) == before
    source, info = data.get_source("spoken_speakers", "train[:4]", data_dir=str(tmp_path))
    assert (info.name, len(info.class_names()), len(source)) == ("spoken_speakers", 3, 4)
    assert info.features["audio"].kind == "audio"
    assert source[0]["label"] == 0


def test_unknown_variant_is_refused():
    clip = speech.plan_keywords(train_per_class=1, test_per_class=0)[0]
    bad = speech.Clip(**{**clip.__dict__, "voice": "en-us+nobody"})
    with pytest.raises(RuntimeError, match="nobody"):
        speech.check_voices([bad])
