"""The pamfn audio front end (`--audio-frontend pamfn`): the audio rows of PAMFN's published features,
slips included, made from real files: a video with a 48 kHz stereo PCM track (a distinct tone and DC
offset in each channel, longer than the video so equal chunks differ from the segments' spans) and one
with the 44.1 kHz mono AAC track the sample clips carry."""

from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torchaudio

from extractors.audio_ast import FBANK_OPTIONS, pamfn_filterbank, time_positions
from extractors.base import WeightsSource, build_extractors
from extractors.config import ExtractionConfig
from extractors.decode import AudioChunk, DecodeError, ffmpeg_binary, open_track_chunks, read_track
from manifests.cache import FeatureCache
from pipeline.cli import main
from pipeline.extraction.source import open_video
from pipeline.samples import ClipSpec, write_clip
from pipeline.videos import VideoSource

CPU = torch.device("cpu")
STEREO_RATE, STEREO_SECONDS = 48000, 4.0  # the video: 3.84 s at 25 fps, 96 frames, 3 segments of 32
TONES_HZ, OFFSETS = (1000.0, 2500.0), (0.1, -0.05)  # channel 0, channel 1


def stereo_track(rate: int = STEREO_RATE, seconds: float = STEREO_SECONDS) -> np.ndarray:
    """(2, N) int16: a tone plus a DC offset in each channel."""
    t = np.arange(int(rate * seconds)) / rate
    channels = [0.3 * np.sin(2 * np.pi * hz * t) + offset for hz, offset in zip(TONES_HZ, OFFSETS)]
    return np.round(np.stack(channels) * 32768).clip(-32768, 32767).astype(np.int16)


def with_track(video: Path, track: np.ndarray, rate: int, path: Path) -> Path:
    """`video`'s picture with `track` ((channels, N) int16) as its sound, stored losslessly (PCM in mkv)."""
    raw = path.with_suffix(".s16")
    np.ascontiguousarray(track.T).tofile(raw)
    command = [ffmpeg_binary(), "-y", "-loglevel", "error", "-i", str(video), "-f", "s16le", "-ar", str(rate),
               "-ac", str(track.shape[0]), "-i", str(raw), "-map", "0:v", "-map", "1:a", "-c:v", "copy",
               "-c:a", "pcm_s16le", str(path)]
    subprocess.run(command, check=True, capture_output=True)
    raw.unlink()
    return path


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("recipe")
    silent = write_clip(ClipSpec("silent", 0.5, seconds=3.84, with_audio=False, seed=11), root / "silent.mp4")
    with_track(silent, stereo_track(), STEREO_RATE, root / "stereo48.mkv")
    with_track(silent, stereo_track(seconds=0.05), STEREO_RATE, root / "blip.mkv")
    write_clip(ClipSpec("aac", 0.6, seconds=2.56, seed=12), root / "aac44.mp4")
    return root


def expected_chunks(track: np.ndarray, rate: int, segments: int) -> list[np.ndarray]:
    """PAMFN's cut of a known int16 track: read as a WAV, resampled, one mean removed, equal chunks."""
    wave = torchaudio.transforms.Resample(rate, 16000)(torch.from_numpy(track.astype(np.float32) / 32768))
    wave = wave - wave.mean()
    size = wave.shape[1] // segments
    return [wave[:, i * size : (i + 1) * size].numpy() for i in range(segments)]


def peak_hz(fbank: torch.Tensor, told_rate: int) -> float:
    """The centre frequency of the loudest of kaldi's 128 mel bins (20 Hz to the told rate's Nyquist)."""
    mel = lambda hz: 1127.0 * math.log(1.0 + hz / 700.0)
    low, high = mel(20.0), mel(told_rate / 2)
    centre = low + (int(fbank.mean(0).argmax()) + 1) * (high - low) / (FBANK_OPTIONS["num_mel_bins"] + 1)
    return 700.0 * (math.exp(centre / 1127.0) - 1.0)


def pamfn_config(**overrides) -> ExtractionConfig:
    return ExtractionConfig(modalities=("audio",), backbones={"audio": "ast"}, weights="random", arch_size="tiny",
                            settings={"audio": {"audio_frontend": "pamfn"}}, **overrides)


# ----------------------------------------------------------------------------- decoding and cutting


def test_the_stereo_track_is_resampled_once_centred_and_cut_into_equal_chunks(clips):
    # Broken on purpose: the mean removed per channel (wave.mean(1, keepdim=True)) fails the comparison
    # and the channel means; the chunks cut at the segments' spans (20480 samples) fail the size.
    track = stereo_track()
    chunks = open_track_chunks(clips / "stereo48.mkv", 3, 16000)
    resampled = math.ceil(track.shape[1] * 16000 / STEREO_RATE)
    assert chunks.source_rate == STEREO_RATE and chunks.chunk_samples == resampled // 3 == 21333
    got = chunks.chunks(range(3))
    for chunk, expected in zip(got, expected_chunks(track, STEREO_RATE, 3)):
        assert chunk.source_rate == STEREO_RATE and chunk.samples.dtype == np.float32
        assert chunk.samples.shape == (2, 21333)
        np.testing.assert_array_equal(chunk.samples, expected)
    whole = np.concatenate([c.samples for c in got], axis=1)
    # one mean over both channels: each keeps half the offsets' difference, of opposite signs
    np.testing.assert_allclose(whole.mean(axis=1), [0.075, -0.075], atol=2e-4)
    assert abs(whole.mean()) < 1e-5
    chunks.close()


def test_the_chunks_are_at_16_khz(clips):
    # Broken on purpose: Resample(48000, 48000) (no resampling) puts the 1000 Hz tone at 333 Hz.
    chunk = open_track_chunks(clips / "stereo48.mkv", 3, 16000).chunks(range(1, 2))[0]
    for channel, hz in enumerate(TONES_HZ):
        spectrum = np.abs(np.fft.rfft(chunk.samples[channel]))
        assert np.fft.rfftfreq(chunk.samples.shape[1], 1 / 16000)[spectrum[1:].argmax() + 1] == pytest.approx(hz, abs=1)


def test_a_44k_aac_track_is_read_at_its_rate_and_its_chunks_cut_to_41_frames(clips):
    samples, rate = read_track(clips / "aac44.mp4")
    assert rate == 44100 and samples.shape[0] == 1
    chunks = open_track_chunks(clips / "aac44.mp4", 2, 16000)
    assert chunks.chunk_samples == math.ceil(samples.shape[1] * 16000 / 44100) // 2
    chunk = chunks.chunks(range(1))[0]
    full = torchaudio.compliance.kaldi.fbank(torch.from_numpy(chunk.samples),
                                             **{**FBANK_OPTIONS, "sample_frequency": 44100})
    assert full.shape[0] == 44  # 1.28 s at 16 kHz, read as 44.1 kHz frames: 3 frames too many
    torch.testing.assert_close(pamfn_filterbank(chunk), ((full - 4.26) / 9.14)[:41], rtol=0, atol=0)


def test_no_track_is_none_and_a_track_too_short_for_a_frame_per_chunk_a_decode_error(clips):
    assert open_track_chunks(clips / "silent.mp4", 3, 16000) is None
    with pytest.raises(DecodeError, match=r"audio track too short: 800 samples .* 266 per segment .* \(1200\)"):
        open_track_chunks(clips / "blip.mkv", 3, 16000)
    job = open_video(VideoSource("blip", clips / "blip.mkv"), pamfn_config(), with_audio=True)
    assert job.failed and job.record.error.startswith("audio track too short")


# ----------------------------------------------------------------------------- the filterbank


def test_the_filterbank_is_told_the_source_rate_and_reads_channel_0(clips):
    # Broken on purpose: sample_frequency 16000 puts the peak at 1000 Hz; the channels averaged
    # (samples.mean(0, keepdims=True)) makes the stereo filterbank differ from channel 0's.
    chunk = open_track_chunks(clips / "stereo48.mkv", 3, 16000).chunks(range(1))[0]
    fbank = pamfn_filterbank(chunk)
    assert fbank.shape == (41, 128)  # 1.33 s read as 48 kHz: 41 frames of 1200 every 480
    # channel 0's 1000 Hz tone, its samples read as 48 kHz ones, shows at 3000 Hz
    assert peak_hz(fbank, STEREO_RATE) == pytest.approx(3000, abs=80)
    torch.testing.assert_close(fbank, pamfn_filterbank(AudioChunk(chunk.samples[:1], STEREO_RATE)), rtol=0, atol=0)
    assert not torch.equal(fbank, pamfn_filterbank(AudioChunk(chunk.samples[1:], STEREO_RATE)))


def test_pamfn_constants_and_zero_padding_after_normalisation():
    # Broken on purpose: AST's constants ((fbank + 4.2677) / 9.138) give -1.28 for silence, not -2.21;
    # padding before normalisation (rows of -4.26 / 9.14) fails the zero rows.
    silence = AudioChunk(np.zeros((2, 10000), np.float32), STEREO_RATE)  # 19 frames of 1200 every 480
    fbank = pamfn_filterbank(silence)
    floor = (math.log(torch.finfo(torch.float32).eps) - 4.26) / (4.57 * 2)  # kaldi's log floor, normalised
    assert fbank.shape == (41, 128)
    torch.testing.assert_close(fbank[:19], torch.full((19, 128), floor), rtol=1e-6, atol=0)
    assert torch.count_nonzero(fbank[19:]) == 0


# ----------------------------------------------------------------------------- AST on the chunks


def test_time_positions_make_pamfn_asts_centre_cut():
    # PAMFN's AST cuts time columns [50 - t // 2, 50 - t // 2 + t) of the 12 x 101 table, and keeps it
    # whole at 101. Broken on purpose: a start of (101 - t + 1) // 2 fails every even t.
    trained = torch.randn(1, 2 + 12 * 101, 8)
    grid = trained[:, 2:].reshape(1, 12, 101, 8)
    for t in range(1, 102):
        table = time_positions(trained, 12, t)
        torch.testing.assert_close(table[:, :2], trained[:, :2], rtol=0, atol=0)
        expected = grid[:, :, 50 - t // 2 : 50 - t // 2 + t] if t < 101 else grid
        torch.testing.assert_close(table[:, 2:].reshape(1, 12, t, 8), expected, rtol=0, atol=0)


def test_ast_runs_41_frames_on_3_time_patches_pooled_after_the_final_norm(clips):
    # PAMFN's stop='avg': (norm(x)[:, 0] + norm(x)[:, 1]) / 2. Broken on purpose: the pooled row taken as
    # the mean of every token after the norm (last_hidden_state.mean(1)) fails the comparison.
    extractor = build_extractors(pamfn_config(), CPU, WeightsSource())["audio"]
    normed = []
    hook = extractor.model.layernorm.register_forward_hook(lambda module, inputs, output: normed.append(output))
    chunks = open_track_chunks(clips / "stereo48.mkv", 3, 16000).chunks(range(3))
    try:
        rows = extractor.embed(chunks)
    finally:
        hook.remove()
    assert rows.shape == (3, extractor.feature_dim)
    assert [x.shape[:2] for x in normed] == [(1, 2 + 12 * 3)] * 3  # one chunk per call, 3 time patches each
    torch.testing.assert_close(rows, torch.cat([(x[:, 0] + x[:, 1]) / 2 for x in normed]), rtol=0, atol=0)
    with pytest.raises(ValueError, match="pamfn audio front end takes AudioChunks"):
        extractor.embed([chunks[0].samples[0]])
    project = build_extractors(ExtractionConfig(modalities=("audio",), backbones={"audio": "ast"}, weights="random",
                                                arch_size="tiny"), CPU, WeightsSource())["audio"]
    with pytest.raises(ValueError, match="project audio front end takes mono waveforms"):
        project.embed(chunks[:1])


def test_extract_with_the_pamfn_front_end_end_to_end(clips, tmp_path):
    # Broken on purpose: open_video reading the AudioStream whatever the setting fails the rows' values.
    videos = tmp_path / "videos"
    videos.mkdir()
    for name in ("stereo48.mkv", "silent.mp4"):
        shutil.copy(clips / name, videos / name)
    flags = ["--modalities", "audio", "--backbones", "random", "--arch-size", "tiny", "--device", "cpu", "--quiet"]
    assert main(["extract", "--videos", str(videos), "--out", str(tmp_path / "out"), *flags,
                 "--audio-frontend", "pamfn"]) == 0
    cache = FeatureCache.open(tmp_path / "out")
    record = cache.read_record("stereo48")
    assert record.frame_count == 96 and record.num_segments == 96 // 32
    rows = cache.load_features("stereo48")["audio"]
    assert rows.shape == (3, 32)
    extractor = build_extractors(pamfn_config(), CPU, WeightsSource())["audio"]
    expected = extractor.embed(open_track_chunks(clips / "stereo48.mkv", 3, 16000).chunks(range(3)))
    np.testing.assert_array_equal(rows, expected.numpy())
    assert cache.read_record("silent").modalities["audio"].status == "missing"
    described = cache.config.extractors["audio"]
    assert described["audio_frontend"].startswith("pamfn")
    assert described["normalisation"] == {"mean": 4.26, "std": 4.57, "formula": "(fbank - mean) / (2 * std)"}
    assert cache.config.extraction["settings"]["audio"]["audio_frontend"] == "pamfn"
