"""Audio pipeline pieces: decoding, folders, waveform ops, log-mel vs librosa, SpecAugment."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import soundfile

from tljax import data
from tljax.data import audio, preprocess, sources

# A real recording (LibriVox, 16 kHz mono) from Debian's pocketsphinx-testdata (`make setup`).
RECORDING = Path("/usr/share/pocketsphinx/test/data/librivox/"
                 "sense_and_sensibility_01_austen_64kb-0870.wav")


def _recording() -> tuple[np.ndarray, int]:
    if not RECORDING.exists():
        pytest.skip(f"{RECORDING} missing: apt-get install pocketsphinx-testdata (make setup)")
    return audio.decode_audio(RECORDING)


def _run(pp: str, example: dict, seed: int | None = 0) -> dict:
    ops = preprocess.Preprocess(pp)
    return ops.example(example, np.random.default_rng(seed) if ops.is_random else None)


def _snr_db(clean: np.ndarray, noisy: np.ndarray) -> float:
    return 10 * math.log10(audio.power(clean) / audio.power(noisy - clean))


def _sine(freq: float, rate: int, seconds: float, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(round(rate * seconds)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Decoding, resampling, folders.


@pytest.mark.parametrize("ext,subtype", [(".wav", "PCM_16"), (".flac", "PCM_16"),
                                         (".ogg", "VORBIS")])
def test_decode_formats_to_float32_mono(tmp_path, ext, subtype):
    left, right = _sine(440, 16000, 0.5, 0.4), _sine(440, 16000, 0.5, 0.2)
    path = tmp_path / f"stereo{ext}"
    soundfile.write(path, np.stack([left, right], axis=1), 16000, subtype=subtype)
    decoded, rate = audio.decode_audio(path)
    assert rate == 16000 and decoded.dtype == np.float32 and decoded.ndim == 1
    # The channel mean is a 0.3-amplitude sine; Vorbis is lossy, PCM_16 exact to 1/32768.
    tol = 0.02 if ext == ".ogg" else 1 / 32768
    assert decoded.size == left.size
    assert np.abs(decoded - (left + right) / 2)[1000:-1000].max() <= tol
    assert audio.decode_audio(path.read_bytes())[0].shape == decoded.shape


def test_resample_keeps_the_tone_and_sets_the_rate():
    tone = _sine(1000, 22050, 1.0)
    out = _run("resample(16000)", {"audio": tone, "sample_rate": 22050, "label": 0})
    assert out["sample_rate"] == 16000 and out["audio"].dtype == np.float32
    assert out["audio"].size == 16000
    spectrum = np.abs(np.fft.rfft(out["audio"]))
    assert np.argmax(spectrum) == 1000  # 1 Hz bins over one second
    # Same level: RMS of a 0.5 sine is 0.5 / sqrt(2) (edges excluded).
    assert math.sqrt(audio.power(out["audio"][500:-500])) == pytest.approx(0.5 / math.sqrt(2),
                                                                          rel=1e-3)


def test_corrupt_and_empty_files_name_the_file(tmp_path):
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    garbage = tmp_path / "garbage.flac"
    garbage.write_bytes(b"fLaC not really" * 10)
    no_samples = tmp_path / "no_samples.wav"
    soundfile.write(no_samples, np.zeros(0, np.float32), 16000)
    for path in (empty, garbage, no_samples):
        with pytest.raises(audio.AudioFileError, match=str(path)):
            audio.decode_audio(path)
    with pytest.raises(audio.AudioFileError, match="holds no samples"):
        audio.decode_audio(no_samples)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        audio.decode_audio(tmp_path / "missing.wav")
    # Through a source, the failing example names its file too.
    source = audio.AudioFileSource([garbage], [0])
    with pytest.raises(audio.AudioFileError, match="garbage.flac"):
        source[0]


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> Path:
    """root/{train,test}/{hum,whistle}/*.wav|flac|ogg; one clip's length is its index."""
    root = tmp_path_factory.mktemp("clips")
    layout = {"train": {"hum": 3, "whistle": 2}, "test": {"hum": 1, "whistle": 1}}
    n = 1
    for split, classes in layout.items():
        for name, count in classes.items():
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                ext = (".wav", ".flac", ".ogg")[i % 3]
                samples = np.full(800 * n, 0.25, np.float32)
                soundfile.write(root / split / name / f"{i}{ext}", samples, 8000)
                n += 1
    (root / "train" / "hum" / "notes.txt").write_text("not audio")
    return root


def test_audio_folder_source(clip_folder):
    train, info = data.get_source(f"audiofolder:{clip_folder}", "train")
    assert info.features["audio"].kind == "audio" and info.class_names() == ["hum", "whistle"]
    assert info.split_sizes["train"] == 5 and info.split_sizes["test"] == 2
    assert [train[i]["label"] for i in range(5)] == [0, 0, 0, 1, 1]
    example = train[1]  # hum/1.flac, the second clip written: 1600 samples
    assert example["sample_rate"] == 8000 and example["audio"].shape == (1600,)
    assert example["audio"].dtype == np.float32
    np.testing.assert_allclose(example["audio"], 0.25, atol=1 / 32768)
    sliced, _ = data.get_source(f"audiofolder:{clip_folder}", "train[-2:]")
    assert [sliced[i]["label"] for i in range(2)] == [1, 1]
    resampled = audio.folder_splits(clip_folder, sample_rate=16000)[1]["test"]
    assert resampled[0]["sample_rate"] == 16000 and resampled[0]["audio"].shape == (2 * 6 * 800,)


def test_unprepared_speech_dataset_says_how_to_prepare(tmp_path):
    with pytest.raises(sources.DatasetNotPreparedError, match="tools/prepare_data.py"):
        data.get_source("spoken_keywords", "train", data_dir=str(tmp_path))


# ---------------------------------------------------------------------------------------------
# Waveform ops on hand-checked signals.


def test_pad_or_crop_centre_and_random():
    x = np.arange(1, 11, dtype=np.float32)  # 10 samples
    crop = _run("pad_or_crop(samples=6)", {"audio": x})
    np.testing.assert_array_equal(crop["audio"], [3, 4, 5, 6, 7, 8])  # offset (10-6)//2 = 2
    pad = _run("pad_or_crop(samples=7)", {"audio": np.array([1, 2, 3], np.float32)})
    np.testing.assert_array_equal(pad["audio"], [0, 0, 1, 2, 3, 0, 0])
    seconds = _run("pad_or_crop(seconds=0.5)", {"audio": x, "sample_rate": 8})
    np.testing.assert_array_equal(seconds["audio"], [4, 5, 6, 7])
    assert not preprocess.Preprocess("pad_or_crop(samples=6)").is_random
    assert preprocess.Preprocess("pad_or_crop(samples=6, random=True)").is_random
    starts, pads = set(), set()
    for seed in range(200):
        out = _run("pad_or_crop(samples=6, random=True)", {"audio": x}, seed)["audio"]
        assert np.array_equal(out, np.arange(out[0], out[0] + 6))  # a contiguous window
        starts.add(int(out[0]))
        short = _run("pad_or_crop(samples=5, random=True)",
                     {"audio": np.array([7, 8], np.float32)}, seed)["audio"]
        offset = int(np.flatnonzero(short)[0])
        assert np.array_equal(short[offset:offset + 2], [7, 8]) and short.sum() == 15
        pads.add(offset)
    assert starts == set(range(1, 6)) and pads == {0, 1, 2, 3}  # every offset, nothing else
    with pytest.raises(ValueError, match="sample rate"):
        _run("pad_or_crop(seconds=1)", {"audio": x})


def test_time_shift_zero_fills():
    x = np.arange(1, 9, dtype=np.float32)
    np.testing.assert_array_equal(audio.shift(x, 3), [0, 0, 0, 1, 2, 3, 4, 5])
    np.testing.assert_array_equal(audio.shift(x, -2), [3, 4, 5, 6, 7, 8, 0, 0])
    np.testing.assert_array_equal(audio.shift(x, 0), x)
    seen = set()
    for seed in range(100):
        out = _run("time_shift(max_samples=2)", {"audio": x}, seed)["audio"]
        s = next(s for s in range(-2, 3) if np.array_equal(out, audio.shift(x, s)))
        seen.add(s)
    assert seen == {-2, -1, 0, 1, 2}
    out = _run("time_shift(max_seconds=0.5)", {"audio": x, "sample_rate": 4}, 3)["audio"]
    assert any(np.array_equal(out, audio.shift(x, s)) for s in range(-2, 3))


def test_gain_in_db_range():
    x = _sine(100, 8000, 0.1)
    gains = []
    for seed in range(50):
        out = _run("gain(-6, 6)", {"audio": x}, seed)["audio"]
        ratio = out[x != 0] / x[x != 0]
        np.testing.assert_allclose(ratio, ratio[0], rtol=1e-6)
        gains.append(20 * math.log10(ratio[0]))
    assert -6 <= min(gains) < -4 and 4 < max(gains) <= 6
    fixed = _run("gain(-6.0206, -6.0206)", {"audio": x})["audio"]
    np.testing.assert_allclose(fixed, x / 2, rtol=1e-4)  # -6.02 dB halves the amplitude


@pytest.mark.parametrize("noise", ["white", "pink", "folder"])
def test_add_noise_hits_the_requested_snr(noise, tmp_path):
    speech, rate = _recording()
    speech = speech[: rate * 2]
    if noise == "folder":
        hum = (_sine(50, 8000, 0.7) + 0.05 * np.random.default_rng(1).standard_normal(5600))
        soundfile.write(tmp_path / "hum.wav", hum.astype(np.float32), 8000)  # looped, resampled
        noise = str(tmp_path)
    example = {"audio": speech, "sample_rate": rate}
    for seed, snr in enumerate([0.0, 5.0, 12.5, 30.0]):
        out = _run(f"add_noise({snr}, {snr}, noise={noise!r})", example, seed)["audio"]
        assert abs(_snr_db(speech, out) - snr) <= 0.5
    snrs = [_snr_db(speech, _run(f"add_noise(5, 15, noise={noise!r})", example, s)["audio"])
            for s in range(20)]
    assert 4.5 <= min(snrs) and max(snrs) <= 15.5 and max(snrs) - min(snrs) > 3
    kept = _run(f"add_noise(5, 15, noise={noise!r}, p=0.0)", example)["audio"]
    assert kept is speech


def test_pink_noise_falls_3_db_per_octave():
    noise = audio.pink_noise(np.random.default_rng(0), 2**16)
    assert audio.power(noise) == pytest.approx(1.0, rel=1e-5)
    psd = np.abs(np.fft.rfft(noise)) ** 2
    octaves = [psd[2**k : 2 ** (k + 1)].mean() for k in range(4, 14)]
    slope_db = np.polyfit(np.arange(len(octaves)), 10 * np.log10(octaves), 1)[0]
    assert -3.5 < slope_db < -2.5


def test_bad_noise_folder_fails_when_parsed(tmp_path):
    with pytest.raises(FileNotFoundError, match="white"):
        preprocess.Preprocess(f"add_noise(5, 10, noise='{tmp_path / 'nope'}')")


# ---------------------------------------------------------------------------------------------
# Mel spectrograms against librosa.


@pytest.mark.parametrize("n_fft,n_mels,htk,norm,fmin,fmax", [
    (400, 40, False, "slaney", 0.0, None), (512, 64, True, "slaney", 20.0, 7600.0),
    (1024, 128, False, None, 50.0, 4000.0)])
def test_mel_filterbank_matches_librosa(n_fft, n_mels, htk, norm, fmin, fmax):
    librosa = pytest.importorskip("librosa")
    expected = librosa.filters.mel(sr=16000, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax,
                                   htk=htk, norm=norm)
    ours = audio.mel_filterbank(16000, n_fft, n_mels, fmin, fmax, htk, norm)
    np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("kwargs", [
    dict(n_fft=400, hop=160, n_mels=40),
    dict(n_fft=512, hop=160, n_mels=64, fmin=20.0, fmax=7600.0, htk=True),
    dict(n_fft=1024, hop=256, n_mels=128, win_length=800, norm=None, pad_mode="reflect"),
    dict(n_fft=400, hop=160, n_mels=40, center=False, window="hamming"),
])
def test_log_mel_matches_librosa_on_a_real_recording(kwargs):
    """dB mel within 1e-3 dB of librosa on every bin within 80 dB of the peak."""
    librosa = pytest.importorskip("librosa")
    speech, rate = _recording()
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    out = _run(f"log_mel(sample_rate={rate}, {args}, layout='frames')",
               {"audio": speech, "sample_rate": rate, "label": 3})
    assert set(out) == {"image", "sample_rate", "label"}  # 'audio' is consumed
    theirs = {"hop_length" if k == "hop" else k: v for k, v in kwargs.items()}
    expected = librosa.power_to_db(
        librosa.feature.melspectrogram(y=speech, sr=rate, **theirs), ref=1.0, amin=1e-10,
        top_db=None).T
    ours = out["image"]
    assert ours.shape == expected.shape and ours.dtype == np.float32
    near_peak = expected > expected.max() - 80
    assert np.abs(ours - expected)[near_peak].max() <= 1e-3

    linear = _run(f"mel_spectrogram(sample_rate={rate}, {args})", {"audio": speech,
                                                                     "sample_rate": rate})
    reference = librosa.feature.melspectrogram(y=speech, sr=rate, **theirs).T
    assert np.abs(linear["mel"] - reference).max() <= 1e-6 * reference.max()


def test_log_mel_image_layout_for_image_backbones():
    librosa = pytest.importorskip("librosa")
    speech, rate = _recording()
    pp = (f"log_mel(sample_rate={rate}, n_fft=400, hop=160, n_mels=64, ref='max', top_db=80, "
          "channels=3)|value_range(-1, 1, in_min=-80, in_max=0)")
    image = _run(pp, {"audio": speech, "sample_rate": rate})["image"]
    frames = 1 + speech.size // 160
    assert image.shape == (64, frames, 3) and image.dtype == np.float32
    assert np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(image[..., 0],
                                                                           image[..., 2])
    assert image.max() == pytest.approx(1.0) and image.min() >= -1.0
    db = librosa.power_to_db(librosa.feature.melspectrogram(
        y=speech, sr=rate, n_fft=400, hop_length=160, n_mels=64), ref=np.max, top_db=80)
    np.testing.assert_allclose(image[..., 0], db / 40 + 1, atol=1e-3 / 40 + 1e-6)
    with pytest.raises(ValueError, match="resample"):
        _run("log_mel(sample_rate=8000)", {"audio": speech, "sample_rate": rate})


def test_batches_of_spectrograms_and_mel_frames():
    rng = np.random.default_rng(0)
    examples = [{"audio": rng.standard_normal(n).astype(np.float32), "sample_rate": 16000,
                 "label": i} for i, n in enumerate([12000, 20000, 16000])]
    pp = ("pad_or_crop(seconds=1)|log_mel(sample_rate=16000, n_fft=400, hop=160, n_mels=32, "
          "channels=3)")
    batch = preprocess.Preprocess(pp)(examples, None)
    assert batch["image"].shape == (3, 32, 101, 3) and list(batch["label"]) == [0, 1, 2]
    mel = preprocess.Preprocess("pad_or_crop(samples=16000)|mel_spectrogram(sample_rate=16000, "
                                "n_fft=400, hop=160, n_mels=40)")(examples, None)
    assert mel["mel"].shape == (3, 101, 40)
    with pytest.raises(ValueError, match="pad_or_crop"):
        preprocess.Preprocess("mel_spectrogram(sample_rate=16000, n_mels=40)")(examples, None)


# ---------------------------------------------------------------------------------------------
# SpecAugment.


@pytest.mark.parametrize("layout", ["image", "frames"])
def test_spec_augment_masks_count_and_width(layout):
    n_mels, frames = 40, 120
    spec = np.ones((n_mels, frames, 1) if layout == "image" else (frames, n_mels), np.float32)
    pp = "spec_augment(time_masks=3, time_width=10, freq_masks=2, freq_width=6, value=0.0)"
    for seed in range(30):
        out = _run(pp, {"image": spec}, seed)["image"]
        rng = np.random.default_rng(seed)
        time_iv = audio.mask_intervals(rng, frames, 3, 10)
        freq_iv = audio.mask_intervals(rng, n_mels, 2, 6)
        assert len(time_iv) == 3 and len(freq_iv) == 2
        assert all(0 <= w <= 10 and 0 <= s <= frames - w for s, w in time_iv)
        assert all(0 <= w <= 6 and 0 <= s <= n_mels - w for s, w in freq_iv)
        expected = np.ones((n_mels, frames), bool)
        for s, w in time_iv:
            expected[:, s:s + w] = False
        for s, w in freq_iv:
            expected[s:s + w, :] = False
        kept = out[..., 0] if layout == "image" else out.T
        np.testing.assert_array_equal(kept != 0, expected)
    assert np.all(spec == 1)  # the input is not modified in place
    widths = {w for seed in range(200)
              for _, w in audio.mask_intervals(np.random.default_rng(seed), 100, 2, 5)}
    assert widths == set(range(6))


def test_spec_augment_fills_with_the_mean():
    spec = np.arange(50 * 30, dtype=np.float32).reshape(50, 30, 1)
    out = _run("spec_augment(time_masks=1, time_width=30, freq_masks=0)", {"image": spec}, 5)
    changed = out["image"] != spec
    assert np.all(out["image"][changed] == spec.mean())
