"""GE2E speaker encoder: parity with resemblyzer's torch VoiceEncoder and mel front end."""

from __future__ import annotations

import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tljax import load_pretrained, tree
from tljax.data import audio, preprocess
from tljax.models import build_backbone
from tljax.pretrained import CheckpointMismatchError, UnsafeCheckpointError, ge2e, readers

torch = pytest.importorskip("torch")

LIBRIVOX = Path("/usr/share/pocketsphinx/test/data/librivox")
READER_A = LIBRIVOX / "sense_and_sensibility_01_austen_64kb-0870.wav"
READER_B = LIBRIVOX / "sense_and_sensibility_01_austen_64kb-0880.wav"
OTHER_SPEAKER = Path("/usr/share/pocketsphinx/test/data/cards/001.wav")


def _wav(path: Path) -> tuple[np.ndarray, int]:
    if not path.exists():
        pytest.skip(f"{path} missing: apt-get install pocketsphinx-testdata (make setup)")
    return audio.decode_audio(path)


@pytest.fixture(scope="module")
def resemblyzer():
    # resemblyzer imports webrtcvad and librosa (installed for the tests, see `make setup`).
    return pytest.importorskip("resemblyzer")


@pytest.fixture(scope="module")
def encoder(resemblyzer):
    return resemblyzer.VoiceEncoder(device="cpu", verbose=False)


@pytest.fixture(scope="module")
def loaded():
    pytest.importorskip("resemblyzer")
    return load_pretrained("ge2e")


def test_random_lstm_stack_matches_torch():
    """Any size: the converter's mapping and the Flax LSTM against torch.nn.LSTM + Linear."""
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(24, 32, 2, batch_first=True)
    linear = torch.nn.Linear(32, 16)
    state = {**{f"lstm.{k}": v for k, v in lstm.state_dict().items()},
             **{f"linear.{k}": v for k, v in linear.state_dict().items()}}
    variables, kwargs = ge2e.convert({k: v.numpy() for k, v in state.items()})
    assert kwargs == {"n_mels": 24, "hidden_size": 32, "embedding_size": 16, "num_layers": 2}
    mel = np.random.default_rng(0).random((3, 50, 24), dtype=np.float32)
    with torch.no_grad():
        hs, (h, _) = lstm(torch.from_numpy(mel))
        raw = torch.relu(linear(h[-1]))
        expected = (raw / raw.norm(dim=1, keepdim=True)).numpy()
    embedding, out = build_backbone("ge2e", **kwargs).apply(variables, {"mel": mel})
    np.testing.assert_allclose(np.asarray(out["frames"]), hs.numpy(), atol=1e-6)
    np.testing.assert_allclose(np.asarray(embedding), expected, atol=1e-6)


def test_real_weights_match_voice_encoder(resemblyzer, encoder, loaded):
    """Embeddings of 1.6 s windows of a real recording, on resemblyzer's own mel: <= 1e-5."""
    model, variables, _ = loaded
    wav, rate = _wav(READER_A)
    mel = resemblyzer.wav_to_mel_spectrogram(resemblyzer.preprocess_wav(wav, source_sr=rate))
    windows = np.stack([mel[i:i + 160] for i in range(0, mel.shape[0] - 160, 77)])
    with torch.no_grad():
        expected = encoder(torch.from_numpy(windows)).numpy()
    embedding, out = model.backbone.apply(variables, windows)
    assert embedding.shape == (windows.shape[0], 256) and out["frames"].shape[1:] == (160, 256)
    assert np.abs(np.asarray(embedding) - expected).max() <= 1e-5


def test_front_end_and_utterance_embedding_match_resemblyzer(resemblyzer, encoder, loaded):
    model, variables, _ = loaded
    wav, rate = _wav(READER_A)
    prepared = resemblyzer.preprocess_wav(wav, source_sr=rate)  # includes its VAD trimming
    theirs = resemblyzer.wav_to_mel_spectrogram(prepared)
    ours = ge2e.mel_frames(prepared)
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() <= 1e-6 * theirs.max()
    expected = encoder.embed_utterance(prepared)
    embedding = ge2e.embed_utterance(model, variables, prepared, preprocess=False)
    assert np.abs(embedding - expected).max() <= 1e-5
    # Resampling and volume normalisation without the package (VAD trimming aside).
    wav8k = audio.resample(wav, rate, 8000)
    librosa = pytest.importorskip("librosa")
    reference = resemblyzer.normalize_volume(librosa.resample(wav8k, orig_sr=8000,
                                                              target_sr=16000),
                                             -30, increase_only=True)
    np.testing.assert_allclose(ge2e.preprocess_wav(wav8k, 8000), reference, atol=1e-6)


def test_real_weights_tell_speakers_apart(loaded):
    """Two clips of one LibriVox reader are closer than either is to another speaker."""
    model, variables, _ = loaded
    embed = lambda path: ge2e.embed_utterance(model, variables, *_wav(path))
    a, b, other = embed(READER_A), embed(READER_B), embed(OTHER_SPEAKER)
    assert a @ b > 0.8 and a @ b > a @ other + 0.1 and a @ b > b @ other + 0.1


def test_load_pretrained_describes_the_input(loaded):
    model, variables, info = loaded
    assert info.model_name == "ge2e" and info.sample_rate == 16000
    assert info.audio_frontend["n_mels"] == 40 and info.audio_frontend["hop"] == 160
    assert model.inputs == ("mel",)
    names = list(tree.flatten(variables["params"]))
    # Every encoder tensor of the checkpoint is used, the GE2E loss's two scalars are not.
    state = readers.read_torch(ge2e.weights_file())
    assert len(names) == len(state) - 2 == 14
    assert sum(np.size(v) for v in tree.flatten(variables).values()) == sum(
        np.size(v) for k, v in state.items() if not k.startswith("similarity_"))
    blocks = model.blocks()
    groups = [tree.first_match(n, blocks) for n in names]
    assert None not in groups and sorted(set(groups)) == [0, 1, 2, 3]  # 3 LSTM layers, linear
    classifier, with_head, _ = load_pretrained("ge2e", num_classes=5)
    logits = classifier.apply(with_head, np.zeros((2, 160, 40), np.float32))
    assert logits.shape == (2, 5) and not np.asarray(logits).any()  # a zero-initialised head


def test_frontend_pp_makes_one_window(loaded):
    model, variables, info = loaded
    wav, rate = _wav(READER_A)
    ops = preprocess.Preprocess(info.audio_frontend["pp"])
    example = ops.example({"audio": wav, "sample_rate": rate, "label": 0}, None)
    assert example["mel"].shape == (160, 40)
    batch = ops.collate([example, example])
    assert batch["mel"].shape == (2, 160, 40)
    level = ge2e.preprocess_wav(wav, rate)
    start = (level.size - 25440) // 2
    np.testing.assert_allclose(example["mel"], ge2e.mel_frames(level[start:start + 25440]),
                               rtol=1e-5, atol=1e-7)
    embedding = model.apply(variables, batch["mel"])
    np.testing.assert_allclose(np.linalg.norm(embedding, axis=1), 1.0, rtol=1e-5)


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.write_text, (pathlib.Path(self.marker), "pwned"))


def test_malicious_legacy_pickle_is_refused(tmp_path):
    marker = tmp_path / "marker.txt"
    evil = tmp_path / "evil.pt"
    state = {"linear.weight": torch.zeros(2, 2), "hook": _Payload(str(marker))}
    # The legacy (non-zip) stream, the format of resemblyzer's pretrained.pt.
    torch.save({"step": 1, "model_state": state}, evil, _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafeCheckpointError, match="Refusing"):
        ge2e.load_ge2e(evil)
    assert not marker.exists()
    torch.load(evil, weights_only=False)  # The payload is real: unrestricted loading runs it.
    assert marker.read_text() == "pwned"


def test_converter_is_strict():
    torch.manual_seed(0)
    lstm, linear = torch.nn.LSTM(8, 4, 1, batch_first=True), torch.nn.Linear(4, 4)
    state = {**{f"lstm.{k}": v.numpy() for k, v in lstm.state_dict().items()},
             **{f"linear.{k}": v.numpy() for k, v in linear.state_dict().items()},
             "similarity_weight": np.ones(1), "similarity_bias": np.zeros(1)}
    ge2e.convert(state)  # the GE2E loss scalars are skipped on purpose
    broken = {k: v for k, v in state.items() if k != "lstm.bias_hh_l0"}
    broken["lstm.weight_hh_l0"] = np.zeros((16, 5), np.float32)
    broken["decoder.weight"] = np.zeros(3, np.float32)
    with pytest.raises(CheckpointMismatchError) as err:
        ge2e.convert(broken)
    message = str(err.value)
    for needle in ("lstm.bias_hh_l0", "missing", "lstm.weight_hh_l0", "(16, 5)", "(16, 4)",
                   "decoder.weight", "unexpected"):
        assert needle in message


def test_compute_dtype_bfloat16(loaded):
    model, variables, info = loaded
    mel = np.random.default_rng(0).random((2, 40, 40), dtype=np.float32)
    full = model.apply(variables, mel)
    half, _ = build_backbone("ge2e", **{**info.model_kwargs, "dtype": jnp.bfloat16}).apply(
        variables, mel)
    assert half.dtype == jnp.float32 and float(jnp.abs(half - full).max()) < 0.05
    assert jax.tree.leaves(variables)[0].dtype == np.float32


def test_synthesized_speech_embeds(loaded):
    """An espeak-ng voice (decoded from its wav bytes at 22,050 Hz) embeds to a unit vector."""
    model, variables, _ = loaded
    try:
        wav = subprocess.run(["espeak-ng", "-v", "en-us", "--stdout", "The birch canoe slid "
                              "on the smooth planks."], capture_output=True, check=True).stdout
    except FileNotFoundError:
        pytest.skip("espeak-ng missing: apt-get install espeak-ng (make setup)")
    samples, rate = audio.decode_audio(wav)
    assert rate == 22050
    embedding = ge2e.embed_utterance(model, variables, samples, rate)
    assert embedding.shape == (256,) and abs(np.linalg.norm(embedding) - 1) < 1e-5
