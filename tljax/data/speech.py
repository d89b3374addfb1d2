"""Synthesized speech datasets, built offline with Debian's espeak-ng into audio class folders.

This is synthetic speech: formant (and Klatt) synthesis by espeak-ng 1.51 from text, with
voices made by combining espeak-ng's language voices (accents) with its voice variants
(m1..m7, f1..f5, klatt, ...), random speaking rates and pitches, random levels and added
white or pink background noise. (The MBROLA diphone voices, recorded from real speakers, are
not in Debian main and are not used.) It is good for testing audio pipelines and for
transfer experiments between synthetic and real speech, not as a benchmark of real speech.

Each dataset is written to ``data_dir/<name>/{train,test}/<class>/<NNNNN>.wav`` (16 kHz mono,
16-bit PCM) plus ``manifest.json`` (written last: the generator's versions, the seed, and per
file its text, voice, rate, pitch, level, noise, SNR and sha256). Read it with
``dataset='<name>'`` (or ``'audiofolder:DIR'``; see tljax.data.audio). Every random choice
comes from numpy generators seeded by (seed, dataset, clip index), and espeak-ng is
deterministic, so a build gives the same bytes on every machine with the same espeak-ng and
soxr versions (the manifest's hashes tell).

* ``spoken_keywords`` (keyword recognition): 12 classes - the ten digits 'zero'..'nine',
  'yes' and 'no' - each clip one word at a random position in 1.000 s of noise. English
  accents x voice variants; the test split is spoken by voice variants that never occur in
  train (held-out speakers). Default 40 train + 10 test clips per class (600 clips, 19 MB).
* ``spoken_speakers`` (speaker identification): 12 voices (accent + variant + base pitch),
  class = voice, each clip three random words from the keyword vocabulary. Train and test
  are different clips (other word sequences, rates and noise) of the same voices. Default
  20 train + 5 test clips per voice (300 clips).
* ``spoken_languages`` (language identification): six languages (de, en, es, fr, it, nl),
  ten everyday sentences each; the test split holds sentences 8-10 spoken by voice variants
  not used in train (held-out sentences and speakers). Default 42 train + 9 test clips per
  language (306 clips).

Build times (2 cores): under a minute for all three at the default sizes.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tljax.data import audio

RATE = 16000
PEAK = 0.95  # clips whose peak would exceed this are scaled down to it
VERSION = "1.0.0"
DEFAULT_SEED = 0
NAMES = ("spoken_keywords", "spoken_speakers", "spoken_languages")

KEYWORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
            "yes", "no")
ENGLISH_ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan",
                   "en-gb-x-gbcwmd", "en-029", "en-us-nyc")
# espeak-ng voice variants that sound like people (no robots, whispers or effects).
TRAIN_VARIANTS = ("m1", "m2", "m3", "m4", "m6", "m7", "f1", "f2", "f4", "f5", "klatt",
                  "klatt3", "Andy", "aunty", "belinda", "linda", "max", "travis")
TEST_VARIANTS = ("m5", "f3", "klatt2", "Annie", "david", "steph")  # held-out speakers

# (accent, variant, base pitch): distinct voices for speaker identification.
SPEAKERS = (("en-us", "m1", 40), ("en-us", "f2", 60), ("en-gb", "m3", 35),
            ("en-gb-x-rp", "f4", 55), ("en-gb-scotland", "m7", 45), ("en-029", "f1", 65),
            ("en-us-nyc", "m2", 50), ("en-gb-x-gbclan", "f5", 45), ("en-gb-x-gbcwmd", "m4", 55),
            ("en-us", "klatt3", 50), ("en-gb", "aunty", 60), ("en-us", "travis", 30),
            ("en-gb-x-rp", "m6", 40), ("en-us", "linda", 55), ("en-029", "max", 45),
            ("en-gb", "belinda", 50))

LANGUAGE_VOICES = {"de": ("de",), "en": ("en-us", "en-gb"), "es": ("es", "es-419"),
                   "fr": ("fr-fr", "fr-be"), "it": ("it",), "nl": ("nl",)}
LANGUAGE_TRAIN_VARIANTS = ("m1", "m3", "m4", "f2", "f4", "klatt", "Andy", "linda")
LANGUAGE_TEST_VARIANTS = ("m5", "f3", "klatt2", "david")
SENTENCES = {
    "en": ("The weather is very nice today.", "I would like a cup of coffee, please.",
           "Where is the train station?", "My brother lives in a small town by the sea.",
           "We are going to the market tomorrow morning.",
           "The children are playing in the garden.", "Please close the window, it is cold.",
           "This book is more interesting than the film.", "How much does this bicycle cost?",
           "I have been learning to cook for a year."),
    "de": ("Das Wetter ist heute sehr schön.", "Ich hätte gern eine Tasse Kaffee, bitte.",
           "Wo ist der Bahnhof?", "Mein Bruder wohnt in einer kleinen Stadt am Meer.",
           "Wir gehen morgen früh auf den Markt.", "Die Kinder spielen im Garten.",
           "Mach bitte das Fenster zu, es ist kalt.",
           "Dieses Buch ist interessanter als der Film.", "Wie viel kostet dieses Fahrrad?",
           "Ich lerne seit einem Jahr kochen."),
    "es": ("Hoy hace muy buen tiempo.", "Quisiera una taza de café, por favor.",
           "¿Dónde está la estación de tren?",
           "Mi hermano vive en un pueblo pequeño junto al mar.",
           "Mañana por la mañana vamos al mercado.", "Los niños están jugando en el jardín.",
           "Cierra la ventana, por favor, hace frío.",
           "Este libro es más interesante que la película.",
           "¿Cuánto cuesta esta bicicleta?", "Llevo un año aprendiendo a cocinar."),
    "fr": ("Il fait très beau aujourd'hui.", "Je voudrais une tasse de café, s'il vous plaît.",
           "Où est la gare ?", "Mon frère habite dans une petite ville au bord de la mer.",
           "Nous allons au marché demain matin.", "Les enfants jouent dans le jardin.",
           "Ferme la fenêtre, s'il te plaît, il fait froid.",
           "Ce livre est plus intéressant que le film.", "Combien coûte ce vélo ?",
           "J'apprends à cuisiner depuis un an."),
    "it": ("Oggi il tempo è molto bello.", "Vorrei una tazza di caffè, per favore.",
           "Dov'è la stazione dei treni?",
           "Mio fratello vive in una piccola città sul mare.",
           "Domani mattina andiamo al mercato.", "I bambini giocano in giardino.",
           "Chiudi la finestra, per favore, fa freddo.",
           "Questo libro è più interessante del film.", "Quanto costa questa bicicletta?",
           "Sto imparando a cucinare da un anno."),
    "nl": ("Het weer is vandaag erg mooi.", "Ik wil graag een kopje koffie, alstublieft.",
           "Waar is het treinstation?", "Mijn broer woont in een klein stadje aan zee.",
           "Morgenochtend gaan we naar de markt.", "De kinderen spelen in de tuin.",
           "Doe het raam dicht, alsjeblieft, het is koud.",
           "Dit boek is interessanter dan de film.", "Hoeveel kost deze fiets?",
           "Ik leer al een jaar koken."),
}
TEST_SENTENCES = 3  # the last three sentences of each language are test-only


@dataclasses.dataclass(frozen=True)
class Clip:
    """One file to synthesize: everything random about it is fixed here."""

    split: str
    label: str
    text: str
    voice: str  # espeak-ng voice: language voice + '+' + variant
    speed: int  # words per minute
    pitch: int  # espeak-ng pitch, 0..99
    level_dbfs: float  # RMS of the speech before noise
    noise: str  # 'white' or 'pink'
    snr_db: float
    seed: tuple[int, ...]  # noise and placement
    length: int | None = None  # fixed clip length in samples (keywords), else the speech's


# ---------------------------------------------------------------------------------------------
# Plans: the clips of each dataset, drawn from seeded generators.


def _rng(seed: int, name: str, *parts: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode()), *parts])


def _pick(rng: np.random.Generator, items: Sequence[Any]) -> Any:
    return items[int(rng.integers(len(items)))]


def plan_keywords(seed: int = DEFAULT_SEED, train_per_class: int = 40,
                  test_per_class: int = 10) -> list[Clip]:
    clips = []
    for split, per_class, variants in (("train", train_per_class, TRAIN_VARIANTS),
                                       ("test", test_per_class, TEST_VARIANTS)):
        for c, word in enumerate(KEYWORDS):
            for i in range(per_class):
                rng = _rng(seed, "spoken_keywords", split == "test", c, i)
                voice = f"{_pick(rng, ENGLISH_ACCENTS)}+{_pick(rng, variants)}"
                clips.append(Clip(
                    split, word, word, voice, speed=int(rng.integers(120, 221)),
                    pitch=int(rng.integers(20, 81)), level_dbfs=float(rng.uniform(-30, -18)),
                    noise=_pick(rng, ("white", "pink")), snr_db=float(rng.uniform(5, 30)),
                    seed=(seed, 1, split == "test", c, i), length=RATE))
    return clips


def plan_speakers(seed: int = DEFAULT_SEED, num_speakers: int = 12, train_per_speaker: int = 20,
                  test_per_speaker: int = 5) -> list[Clip]:
    if not 2 <= num_speakers <= len(SPEAKERS):
        raise ValueError(f"num_speakers={num_speakers}: between 2 and {len(SPEAKERS)}.")
    clips = []
    for s, (accent, variant, base_pitch) in enumerate(SPEAKERS[:num_speakers]):
        label = f"{accent}+{variant}"
        for split, count in (("train", train_per_speaker), ("test", test_per_speaker)):
            for i in range(count):
                rng = _rng(seed, "spoken_speakers", split == "test", s, i)
                words = [_pick(rng, KEYWORDS) for _ in range(3)]
                clips.append(Clip(
                    split, label, " ".join(words), label, speed=int(rng.integers(140, 191)),
                    pitch=int(np.clip(base_pitch + rng.integers(-3, 4), 0, 99)),
                    level_dbfs=float(rng.uniform(-30, -18)),
                    noise=_pick(rng, ("white", "pink")), snr_db=float(rng.uniform(15, 35)),
                    seed=(seed, 2, split == "test", s, i)))
    return clips


def plan_languages(seed: int = DEFAULT_SEED, train_per_language: int = 42,
                   test_per_language: int = 9) -> list[Clip]:
    clips = []
    for g, language in enumerate(sorted(SENTENCES)):
        sentences = SENTENCES[language]
        parts = (("train", train_per_language, sentences[:-TEST_SENTENCES],
                  LANGUAGE_TRAIN_VARIANTS),
                 ("test", test_per_language, sentences[-TEST_SENTENCES:],
                  LANGUAGE_TEST_VARIANTS))
        for split, count, texts, variants in parts:
            for i in range(count):
                rng = _rng(seed, "spoken_languages", split == "test", g, i)
                voice = f"{_pick(rng, LANGUAGE_VOICES[language])}+{_pick(rng, variants)}"
                clips.append(Clip(
                    split, language, texts[i % len(texts)], voice,
                    speed=int(rng.integers(130, 201)), pitch=int(rng.integers(25, 76)),
                    level_dbfs=float(rng.uniform(-30, -18)),
                    noise=_pick(rng, ("white", "pink")), snr_db=float(rng.uniform(10, 30)),
                    seed=(seed, 3, split == "test", g, i)))
    return clips


PLANS = {"spoken_keywords": plan_keywords, "spoken_speakers": plan_speakers,
         "spoken_languages": plan_languages}


# ---------------------------------------------------------------------------------------------
# Synthesis.


def espeak_version() -> str:
    """'eSpeak NG text-to-speech: 1.51  Data at: ...' -> '1.51'; raises when missing."""
    try:
        out = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True,
                             check=True).stdout
    except (FileNotFoundError, subprocess.CalledProcessError):
        raise RuntimeError("Building synthesized speech needs espeak-ng: apt-get install "
                           "espeak-ng (make setup does it).") from None
    match = re.search(r"text-to-speech:\s*(\S+)", out)
    return match.group(1) if match else out.strip()


def _espeak_data_dir() -> Path:
    out = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True).stdout
    match = re.search(r"Data at:\s*(\S+)", out)
    return Path(match.group(1)) if match else Path("/usr/lib/x86_64-linux-gnu/espeak-ng-data")


def check_voices(clips: Sequence[Clip]) -> None:
    """espeak-ng falls back silently on an unknown variant: check every variant file exists."""
    variants_dir = _espeak_data_dir() / "voices" / "!v"
    missing = sorted({c.voice.split("+")[1] for c in clips
                      if not (variants_dir / c.voice.split("+")[1]).exists()})
    if missing:
        raise RuntimeError(f"espeak-ng has no voice variant(s) {missing} in {variants_dir}.")


def speak(text: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    """espeak-ng's float32 speech for `text`, resampled from its 22,050 Hz to 16 kHz."""
    result = subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch),
                             "--stdout", text], capture_output=True, check=True)
    samples, rate = audio.decode_audio(result.stdout, name=f"espeak-ng -v {voice} {text!r}")
    return audio.resample(samples, rate, RATE)


def _trim(x: np.ndarray, margin: int = RATE // 20) -> np.ndarray:
    """Drops the silence espeak-ng puts around speech, keeping `margin` samples (50 ms)."""
    loud = np.flatnonzero(np.abs(x) > 1e-3 * np.abs(x).max())
    if loud.size == 0:
        return x
    return x[max(0, loud[0] - margin) : loud[-1] + 1 + margin]


def render(clip: Clip) -> np.ndarray:
    """The clip as int16 samples: speech at its RMS level, placed in its window, with noise at
    its SNR; scaled down as a whole if its peak would exceed 0.95 of full scale."""
    rng = np.random.default_rng(list(clip.seed))
    speech = _trim(speak(clip.text, clip.voice, clip.speed, clip.pitch))
    speech = audio.normalize_volume(speech, clip.level_dbfs)
    if clip.length is not None:
        slack = abs(speech.size - clip.length)
        speech = audio.pad_or_crop_to(speech, clip.length, int(rng.integers(0, slack + 1)))
    # The SNR is measured against the speech, over the clip, silence included.
    noise = (rng.standard_normal(speech.size).astype(np.float32) if clip.noise == "white"
             else audio.pink_noise(rng, speech.size))
    mixed = audio.mix_at_snr(speech, noise, clip.snr_db)
    peak = float(np.abs(mixed).max())
    if peak > PEAK:  # Loud variants with a high crest factor: scale down rather than clip.
        mixed *= np.float32(PEAK / peak)
    return np.round(mixed * 32767).astype(np.int16)


def _write_wav(path: Path, samples: np.ndarray) -> None:
    import soundfile

    soundfile.write(path, samples, RATE, subtype="PCM_16", format="WAV")


def build(name: str, root: str | os.PathLike, seed: int = DEFAULT_SEED, workers: int = 2,
          **sizes: int) -> Path:
    """Writes dataset `name` to folder `root` (replaced when complete); returns it.

    `sizes` override the plan's defaults, e.g. `train_per_class=4` (see the plan_* functions).
    Files go to a temporary sibling folder first, so an interrupted build leaves nothing
    that looks complete.
    """
    if name not in PLANS:
        raise ValueError(f"Unknown speech dataset {name!r}; known: {', '.join(NAMES)}.")
    generator = {"espeak-ng": espeak_version(), "soxr": _version("soxr"),
                 "soundfile": _version("soundfile")}
    clips = PLANS[name](seed, **sizes)
    check_voices(clips)
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        counters: dict[tuple[str, str], int] = {}
        paths = []
        for clip in clips:
            n = counters[clip.split, clip.label] = counters.get((clip.split, clip.label), -1) + 1
            paths.append(Path(clip.split, clip.label, f"{n:05d}.wav"))
        for folder in {p.parent for p in paths}:
            (tmp / folder).mkdir(parents=True, exist_ok=True)

        def make(i: int) -> dict[str, Any]:
            samples = render(clips[i])
            _write_wav(tmp / paths[i], samples)
            return {"file": paths[i].as_posix(), **dataclasses.asdict(clips[i]),
                    "sha256": hashlib.sha256((tmp / paths[i]).read_bytes()).hexdigest()}

        with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
            files = list(pool.map(make, range(len(clips))))
        splits: dict[str, int] = {}
        for clip in clips:
            splits[clip.split] = splits.get(clip.split, 0) + 1
        manifest = {
            "name": name, "version": VERSION, "seed": seed, "sizes": sizes,
            "sample_rate": RATE, "generator": generator, "synthesized": True,
            "classes": sorted({c.label for c in clips}), "splits": splits, "files": files,
        }
        (tmp / audio.MANIFEST).write_text(json.dumps(manifest, indent=1, ensure_ascii=False))
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return root


def _version(module: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(module)
    except metadata.PackageNotFoundError:
        return "unknown"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
