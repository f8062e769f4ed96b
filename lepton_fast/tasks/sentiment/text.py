"""A small, fast text classifier and its views, for the sentiment example.

Text enters the models as one tensor, so that the trainers treat it like any other input:
``x`` int64 [N, L], one stable 31-bit hash per word (1 … 2³¹−1), 0 = padding after the last
word. :func:`encode` makes it from strings with :func:`tokenize` (a regular expression, no
download).

- :class:`HashedNgramClassifier` (fastText-style; Joulin et al. 2017, "Bag of Tricks for
  Efficient Text Classification"): word unigrams and bigrams, hashed into ``buckets`` rows of
  one ``nn.EmbeddingBag`` and averaged (``features``: x → [N, dim], the pooled embedding),
  then a linear ``classifier``. Bigram hashes are computed inside ``forward`` from the word
  hashes, so a view that drops or swaps words changes the bigrams consistently.
- :func:`word_dropout` and :func:`word_swap`, and :func:`weak_text_view` /
  :func:`strong_text_view` built from them: FixMatch's two views for text (Sohn et al.
  2020; word dropout as in Iyyer et al. 2015, swaps as in EDA, Wei & Zou 2019). Each is
  ``f(x, generator) -> x`` on a batch.
- :class:`LexiconTeacher`: a rule-based teacher from a sentiment lexicon, VADER's rules
  (Hutto & Gilbert 2014) on the same tensor (negation, boosters, "but", exclamation marks),
  giving two-class logits, so it distils through :func:`lepton_fast.fused_kd_loss`.
"""
from __future__ import annotations

import math
import re
import zlib
from typing import Iterable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PAD = 0
_HASH_MOD = 2**31 - 1
# Words with inner apostrophes or hyphens ("don't", "well-made"), numbers, "!" and "?".
_TOKEN = re.compile(r"[a-z0-9]+(?:['\-][a-z0-9]+)*|[!?]")


def tokenize(text: str) -> list[str]:
    """Lower-case words (inner ' and - kept: "doesn't", "well-made"), numbers, "!" and "?"."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return _TOKEN.findall(text.lower().replace("\u2019", "'"))


def token_hash(token: str) -> int:
    """A stable hash of a token in 1 … 2³¹−1 (CRC-32, the same in every process)."""
    return zlib.crc32(token.encode("utf-8")) % _HASH_MOD + 1


def encode(texts: Sequence[str], max_len: int = 64) -> Tensor:
    """Strings → int64 [N, max_len] word hashes (:func:`token_hash` of :func:`tokenize`),
    0-padded; words after ``max_len`` are cut."""
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not one string")
    if not isinstance(max_len, int) or max_len < 2:
        raise ValueError(f"max_len must be an int >= 2, got {max_len!r}")
    cache: dict = {}
    out = torch.zeros(len(texts), max_len, dtype=torch.int64)
    for i, text in enumerate(texts):
        ids = []
        for token in tokenize(text)[:max_len]:
            h = cache.get(token)
            if h is None:
                h = cache[token] = token_hash(token)
            ids.append(h)
        if ids:
            out[i, :len(ids)] = torch.tensor(ids, dtype=torch.int64)
    return out


def _check_ids(name: str, x: Tensor) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != torch.int64 or x.dim() != 2:
        raise ValueError(f"{name} must be int64 word hashes [N, L], got {x.dtype} of shape {tuple(x.shape)}")
    return x


def _compact(x: Tensor) -> Tensor:
    """Move every padding entry of each row after its words, keeping the words' order."""
    order = torch.sort((x == PAD).to(torch.int8), dim=1, stable=True).indices
    return x.gather(1, order)


def word_dropout(x: Tensor, generator: Optional[torch.Generator] = None, p: float = 0.1) -> Tensor:
    """Drop each word with probability ``p`` (the rest close up, so new bigrams form); a
    row keeps at least its first word. x int64 [N, L] → int64 [N, L]."""
    _check_ids("x", x)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"p must be in [0, 1), got {p}")
    drop = torch.rand(x.shape, generator=generator, device=x.device) < p
    emptied = ((x != PAD) & ~drop).sum(1) == 0
    drop[:, 0] &= ~emptied
    return _compact(x.masked_fill(drop, PAD))


def word_swap(x: Tensor, generator: Optional[torch.Generator] = None, p: float = 0.1) -> Tensor:
    """Swap each pair of neighbouring words (i, i+1), i even, with probability ``p``.
    x int64 [N, L] → int64 [N, L]."""
    _check_ids("x", x)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    n, length = x.shape
    pairs = length // 2
    swap = torch.rand(n, pairs, generator=generator, device=x.device) < p
    left, right = x[:, 0:2 * pairs:2], x[:, 1:2 * pairs:2]
    swap &= (left != PAD) & (right != PAD)
    out = x.clone()
    out[:, 0:2 * pairs:2] = torch.where(swap, right, left)
    out[:, 1:2 * pairs:2] = torch.where(swap, left, right)
    return out


def weak_text_view(x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """FixMatch's weak view of text: word dropout p = 0.1."""
    return word_dropout(x, generator, 0.1)


def strong_text_view(x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """FixMatch's strong view of text: word dropout p = 0.3, then neighbour swaps p = 0.3."""
    return word_swap(word_dropout(x, generator, 0.3), generator, 0.3)


class HashedNgrams(nn.Module):
    """Word hashes [N, L] → mean of the embeddings of their hashed 1…``ngrams``-grams [N, dim].

    n-gram k at position i hashes (x_i, …, x_{i+k−1}) with a polynomial hash; every id is
    reduced to 1 … buckets−1 (0 is padding, excluded from the mean). A row of padding alone
    gives zeros. With ``sparse`` the table's gradient is a sparse tensor of the rows a batch
    used (train it with SGD, Adagrad or SparseAdam; Adam refuses sparse gradients).
    """

    def __init__(self, buckets: int = 2**18, dim: int = 64, ngrams: int = 2, sparse: bool = True):
        super().__init__()
        if not isinstance(buckets, int) or buckets < 2:
            raise ValueError(f"buckets must be an int >= 2, got {buckets!r}")
        if not isinstance(ngrams, int) or ngrams < 1:
            raise ValueError(f"ngrams must be an int >= 1, got {ngrams!r}")
        self.buckets, self.ngrams = buckets, ngrams
        weight = torch.empty(buckets, dim).normal_(0.0, 0.1)  # initialised once: 2^18 x 64 takes 0.3 s
        weight[PAD] = 0.0
        self.bag = nn.EmbeddingBag(buckets, dim, mode="mean", padding_idx=PAD, sparse=sparse, _weight=weight)

    def ids(self, x: Tensor) -> Tensor:
        """x [N, L] → bucket ids [N, L·ngrams − …] of every n-gram (0 = none)."""
        _check_ids("x", x)
        parts = [torch.where(x == PAD, 0, x % (self.buckets - 1) + 1)]
        h, valid = x, x != PAD
        for k in range(1, self.ngrams):
            if x.shape[1] <= k:
                break
            h = (h[:, :-1] * 1000003 + x[:, k:] * (2 * k + 1)) % _HASH_MOD
            valid = valid[:, :-1] & (x[:, k:] != PAD)
            parts.append(torch.where(valid, h % (self.buckets - 1) + 1, 0))
        return torch.cat(parts, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.bag(self.ids(x))


class HashedNgramClassifier(nn.Module):
    """fastText-style classifier (Joulin et al. 2017): ``classifier(features(x))``.

    Args:
        num_classes: C (2 for sentiment).
        buckets: rows of the hashed n-gram embedding table.
        dim: embedding width = feature width (``feature_dim``).
        ngrams: word n-grams up to this length (2: unigrams and bigrams).
        dropout: dropout on the pooled features before the classifier.
        sparse: sparse gradients for the embedding table (default True): a step then
            touches the rows of the batch's n-grams only, 5–10× faster on a CPU than a dense
            gradient of the whole table; needs an optimizer that takes sparse gradients
            (``torch.optim.Adagrad``, ``SGD``, ``SparseAdam``), not ``Adam``.

    ``forward(x)``: x int64 [N, L] word hashes (:func:`encode`) → float32 logits [N, C].
    ``features(x)`` → [N, dim], the pooled embedding: the domain discriminator reads it,
    and perturbing it is an adversarial perturbation of the word embeddings (for a mean of
    embeddings, every word's gradient is the pooled gradient / L; Miyato et al. 2017).
    """

    def __init__(self, num_classes: int = 2, buckets: int = 2**18, dim: int = 64, ngrams: int = 2,
                 dropout: float = 0.0, sparse: bool = True):
        super().__init__()
        self.feature_dim = dim
        self.features = nn.Sequential(HashedNgrams(buckets, dim, ngrams, sparse), nn.Dropout(dropout))
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


# VADER's constants and word lists (Hutto & Gilbert 2014; vaderSentiment 3.3.2).
B_INCR, N_SCALAR = 0.293, -0.74
NEGATIONS = (
    "aint arent cannot cant couldnt darent didnt doesnt ain't aren't can't couldn't daren't didn't doesn't dont "
    "hadnt hasnt havent isnt mightnt mustnt neither don't hadn't hasn't haven't isn't mightn't mustn't neednt "
    "needn't never none nope nor not nothing nowhere oughtnt shant shouldnt uhuh wasnt werent oughtn't shan't "
    "shouldn't uh-uh wasn't weren't without wont wouldnt won't wouldn't rarely seldom despite").split()
BOOSTERS_UP = (
    "absolutely amazingly awfully completely considerable considerably decidedly deeply effing enormous "
    "enormously entirely especially exceptional exceptionally extreme extremely fabulously flipping flippin "
    "frackin fracking fricking frickin frigging friggin fully fuckin fucking fuggin fugging greatly hella highly "
    "hugely incredible incredibly intensely major majorly more most particularly purely quite really remarkably "
    "so substantially thoroughly total totally tremendous tremendously uber unbelievably unusually utter utterly "
    "very").split()
BOOSTERS_DOWN = (
    "almost barely hardly kinda kindof kind-of less little marginal marginally occasional occasionally partly "
    "scarce scarcely slight slightly somewhat sorta sortof sort-of").split()


class LexiconTeacher(nn.Module):
    """A rule-based sentiment teacher on word hashes: VADER (Hutto & Gilbert 2014), simplified
    to what a tensor of lower-cased words keeps.

    Per word with lexicon valence v: each of the 3 preceding words that is a booster adds
    ±0.293 (scaled 1, 0.95, 0.9 by distance, signed like v); a negation among them
    multiplies by −0.74; words before a "but" count 0.5×, after it 1.5×. The sum s gets
    0.292 per "!" (at most 4) in its own sign, and compound = s / √(s² + 15) ∈ (−1, 1).
    Left out: capitals, "least", idioms, "?" and emoji.

    ``forward(x)``: x int64 [N, L] (:func:`encode`) → float32 logits [N, 2] =
    ``scale · compound · [−1, 1] / 2`` (negative, positive), so that softmax gives
    P(positive) = sigmoid(scale · compound); a snippet with no lexicon word gives 0.5 / 0.5.
    It has no parameters and ignores ``train()``.

    Args:
        lexicon: {token: valence in [-4, 4]} (lepton_fast.tasks.sentiment.data.load_lexicon).
        scale: logit scale (default 4: compound ±0.5 → 88 %).
    """

    def __init__(self, lexicon: Mapping[str, float], scale: float = 4.0):
        super().__init__()
        if not isinstance(lexicon, Mapping) or not lexicon:
            raise ValueError("lexicon must be a non-empty mapping of token -> valence")
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a finite number > 0, got {scale}")
        self.scale = float(scale)
        table = {}
        for token, valence in lexicon.items():
            words = tokenize(token)
            if len(words) == 1:  # multi-token entries (emoticons) cannot match single words
                table[token_hash(words[0])] = float(valence)
        keys = sorted(table)
        self.register_buffer("keys", torch.tensor(keys, dtype=torch.int64), persistent=False)
        self.register_buffer("values", torch.tensor([table[k] for k in keys], dtype=torch.float32), persistent=False)
        self.register_buffer("negations", self._hashes(NEGATIONS), persistent=False)
        self.register_buffer("boost_up", self._hashes(BOOSTERS_UP), persistent=False)
        self.register_buffer("boost_down", self._hashes(BOOSTERS_DOWN), persistent=False)
        self.but, self.bang, self.no = token_hash("but"), token_hash("!"), token_hash("no")

    @staticmethod
    def _hashes(words: Iterable[str]) -> Tensor:
        return torch.tensor(sorted({token_hash(w) for w in words}), dtype=torch.int64)

    def valence(self, x: Tensor) -> Tensor:
        """[N, L] → float32 [N, L]: each word's lexicon valence (0 if none)."""
        pos = torch.searchsorted(self.keys, x).clamp(max=self.keys.numel() - 1)
        return torch.where(self.keys[pos] == x, self.values[pos], 0.0)

    @torch.no_grad()
    def compound(self, x: Tensor) -> Tensor:
        """[N, L] → float32 [N]: VADER's normalised compound score."""
        _check_ids("x", x)
        v = self.valence(x)
        n, length = x.shape
        negation = torch.isin(x, self.negations)
        in_lexicon = v != 0
        boost = torch.isin(x, self.boost_up).float() * B_INCR - torch.isin(x, self.boost_down).float() * B_INCR
        boost = torch.where(in_lexicon, 0.0, boost)  # a lexicon word is not also a booster
        negation = negation & ~in_lexicon
        no = x == self.no
        # "no" before a lexicon word negates it instead of counting as -1.2 itself.
        v = torch.where(no & F.pad(in_lexicon[:, 1:], (0, 1)), 0.0, v)
        sign = torch.sign(v)
        scaled = v.clone()
        factor = torch.ones_like(v)
        for back, decay in ((1, 1.0), (2, 0.95), (3, 0.9)):
            if back >= length:
                break
            shift = lambda t: F.pad(t[:, :-back], (back, 0))  # noqa: E731  (the word `back` places before)
            scaled = scaled + sign * shift(boost) * decay
            factor = torch.where(shift(negation), factor * N_SCALAR, factor)
            if back <= 2:
                factor = torch.where(shift(no), factor * N_SCALAR, factor)
        scaled = scaled * factor
        is_but = x == self.but
        first_but = torch.where(is_but.any(1), is_but.float().argmax(1), length)
        position = torch.arange(length, device=x.device).expand(n, length)
        but = torch.where(position < first_but[:, None], 0.5, torch.where(position > first_but[:, None], 1.5, 1.0))
        but = torch.where(is_but.any(1, keepdim=True), but, 1.0)
        s = (scaled * but).sum(1)
        bangs = (x == self.bang).sum(1).clamp(max=4).float() * 0.292
        s = s + torch.sign(s) * bangs
        return s / torch.sqrt(s * s + 15.0)

    def forward(self, x: Tensor) -> Tensor:
        c = self.compound(x) * (self.scale / 2)
        return torch.stack([-c, c], -1)


__all__ = ["HashedNgramClassifier", "HashedNgrams", "LexiconTeacher", "encode", "strong_text_view", "token_hash",
           "tokenize", "weak_text_view", "word_dropout", "word_swap"]
