"""Real text data for the examples: movie-review snippets (source) → Amazon product-review
snippets (target), binary sentiment.

Both come from the four human-rated corpora of Hutto & Gilbert (2014), "VADER: A Parsimonious
Rule-based Model for Sentiment Analysis of Social Media Text" (ICWSM), which ship inside the
source distribution of vaderSentiment 3.3.2 (``additional_resources/hutto_ICWSM_2014.tar.gz``;
MIT licence; the wheel does not carry them). Each ``*_GroundTruth.txt`` file has one snippet
per line, tab-separated: ``id``, the mean of about 20 human ratings on −4 … +4, the text.

- movie: 10,605 snippets of Rotten Tomatoes reviews (Pang & Lee 2005);
- amazon: 3,708 sentences of Amazon product reviews (Hu & Liu 2004);
- (also in the archive: 4,200 tweets and 5,190 New York Times editorial sentences.)

Nothing is committed to the repository: on first use ``pip download --no-deps --no-binary
:all: vaderSentiment==3.3.2`` fetches the sdist from the package index pip is configured with
into the cache folder ``$LEPTON_FAST_CACHE`` (default ``$XDG_CACHE_HOME/lepton_fast``, else
``~/.cache/lepton_fast``; :mod:`lepton_fast.tasks._fetch`). Every load checks its sha256
against :data:`SDIST_SHA256` and reads the corpora and VADER's lexicon straight from it, so
nothing unpacked can be stale or truncated; a damaged sdist is downloaded again. Offline,
put the file there yourself (the error says where).

Labels (:func:`binary_labels`): positive if the mean rating > 0.5, negative if < −0.5, the
rest (neutral or mixed) dropped: movie 10,043 snippets left, 49.6 % positive; Amazon 2,943,
58.6 % positive. :func:`sentiment_domains` splits the target once, stratified, into an
unlabeled adaptation pool and a test set that no training step sees.
"""
from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path
from typing import NamedTuple, Union

import numpy as np

from lepton_fast.tasks._fetch import DataUnavailable, fetch, how_to_fix

PACKAGE, VERSION = "vaderSentiment", "3.3.2"
SDIST = f"{PACKAGE}-{VERSION}.tar.gz"
#: sha256 of vaderSentiment-3.3.2.tar.gz as the package index served it on 2026-11-30.
SDIST_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
ARCHIVE = f"{PACKAGE}-{VERSION}/additional_resources/hutto_ICWSM_2014.tar.gz"
LEXICON = f"{PACKAGE}-{VERSION}/{PACKAGE}/vader_lexicon.txt"
CORPORA = {
    "movie": "movieReviewSnippets_GroundTruth.txt",
    "amazon": "amazonReviewSnippets_GroundTruth.txt",
    "tweets": "tweets_GroundTruth.txt",
    "nyt": "nytEditorialSnippets_GroundTruth.txt",
}
LEXICON_FILE = "vader_lexicon.txt"


def sdist(cache: Union[str, os.PathLike, None] = None, progress: bool = True) -> Path:
    """The verified ``vaderSentiment-3.3.2.tar.gz`` in the cache, downloaded on first use.

    Raises:
        DataUnavailable: pip could not download it (offline, no index), or its sha256 is not
            :data:`SDIST_SHA256`; the message says what to download and where to put it.
    """
    from tqdm.auto import tqdm

    with tqdm(total=1, desc=f"{PACKAGE} {VERSION} corpora", disable=not progress, leave=False) as bar:
        path = fetch(f"{PACKAGE}=={VERSION}", {SDIST: SDIST_SHA256}, cache, ("--no-binary", ":all:"), bar)
        bar.update(1)
    return path


def read_member(name: str, cache=None, progress: bool = True) -> str:
    """The text of one file of the sdist: a corpus of :data:`CORPORA` (by its file name) or
    :data:`LEXICON_FILE`, read from the verified archive (see the module docstring).

    Raises:
        DataUnavailable: as :func:`sdist`, or the archive lacks the file.
        ValueError: the file is not UTF-8; the message names the archive, the file and the byte.
    """
    path = sdist(cache, progress)
    try:
        with tarfile.open(path, "r:gz") as outer:
            if name == LEXICON_FILE:
                data = outer.extractfile(LEXICON).read()
            else:
                with tarfile.open(fileobj=io.BytesIO(outer.extractfile(ARCHIVE).read()), mode="r:gz") as inner:
                    members = {Path(m.name).name: m for m in inner.getmembers() if m.isfile()}
                    data = inner.extractfile(members[name]).read()
    except (KeyError, tarfile.TarError, AttributeError) as e:
        raise DataUnavailable(f"{path} does not hold {name} ({e}). Delete it. "
                              f"{how_to_fix(f'{PACKAGE}=={VERSION}', {SDIST: SDIST_SHA256}, path.parent)}") from e
    return decode(data, f"{path}:{name}")


def decode(data: bytes, where) -> str:
    """UTF-8 text (a byte-order mark is dropped); ValueError naming ``where`` and the byte
    offset where it is not UTF-8."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not UTF-8 at byte {e.start} ({e.reason})") from None


class Snippets(NamedTuple):
    ids: list        # str, the corpus's own ids
    ratings: np.ndarray  # float64 [N], mean human rating in [-4, 4]
    texts: list      # str


def load_snippets(path: Union[str, os.PathLike]) -> Snippets:
    """Read one ``*_GroundTruth.txt`` corpus file (the format of :func:`parse_snippets`).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: as :func:`parse_snippets`, or the file is not UTF-8; the message names the file.
    """
    return parse_snippets(decode(Path(path).read_bytes(), path), path)


def parse_snippets(text: str, where) -> Snippets:
    """One corpus: one snippet per line, ``id<TAB>mean rating<TAB>text``; blank lines are
    skipped.

    Raises:
        ValueError: a line without three tab-separated fields or with a rating that is not a
            number in [-4, 4]; the message names ``where`` (the file) and the line.
    """
    ids, ratings, texts = [], [], []
    for number, line in enumerate(io.StringIO(text, newline=""), 1):  # lines end as open(newline="") ends them
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        fields = line.split("\t", 2)
        if len(fields) != 3:
            raise ValueError(f"{where}:{number}: expected 'id<TAB>rating<TAB>text', got {line[:80]!r}")
        try:
            rating = float(fields[1])
        except ValueError:
            raise ValueError(f"{where}:{number}: the rating {fields[1]!r} is not a number") from None
        if not -4.0 <= rating <= 4.0:
            raise ValueError(f"{where}:{number}: the rating {rating} is outside [-4, 4]")
        ids.append(fields[0])
        ratings.append(rating)
        texts.append(fields[2])
    return Snippets(ids, np.asarray(ratings, dtype=np.float64), texts)


def binary_labels(ratings, margin: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """(keep bool [N], labels int64 [N_kept]): 1 = positive (rating > margin), 0 = negative
    (rating < −margin); ratings in [−margin, margin] are dropped."""
    ratings = np.asarray(ratings, dtype=np.float64)
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    keep = (ratings > margin) | (ratings < -margin)
    return keep, (ratings[keep] > margin).astype(np.int64)


class Corpus(NamedTuple):
    texts: list         # str [N]
    labels: np.ndarray  # int64 [N], 1 = positive


def load_corpus(name_or_path: str, cache: Union[str, os.PathLike, None] = None, progress: bool = True,
                margin: float = 0.5) -> Corpus:
    """A labeled binary corpus: ``name_or_path`` is one of :data:`CORPORA` ("movie",
    "amazon", "tweets", "nyt"; read from the sdist, see :func:`read_member`) or a path to a
    file in the corpus format. Neutral snippets (|rating| ≤ ``margin``) are dropped."""
    if name_or_path in CORPORA:
        name = CORPORA[name_or_path]
        snippets = parse_snippets(read_member(name, cache, progress), f"{SDIST}:{name}")
    elif os.path.exists(name_or_path):
        snippets = load_snippets(name_or_path)
    else:
        raise ValueError(f"name_or_path must be one of {tuple(CORPORA)} or an existing file, got {name_or_path!r}")
    keep, labels = binary_labels(snippets.ratings, margin)
    return Corpus([t for t, k in zip(snippets.texts, keep) if k], labels)


def load_lexicon(path: Union[str, os.PathLike, None] = None, cache=None, progress: bool = True) -> dict:
    """VADER's lexicon (Hutto & Gilbert 2014) as ``{token: mean valence in [-4, 4]}``, read
    from the downloaded sdist's ``vader_lexicon.txt`` (``token<TAB>mean<TAB>sd<TAB>ratings``),
    or from ``path``. vaderSentiment itself is never imported."""
    if path is None:
        text, where = read_member(LEXICON_FILE, cache, progress), f"{SDIST}:{LEXICON}"
    else:
        text, where = decode(Path(path).read_bytes(), path), path
    lexicon = {}
    for number, line in enumerate(io.StringIO(text, newline=None), 1):
        fields = line.rstrip("\n").split("\t")
        if len(fields) < 2 or not fields[0]:
            continue
        try:
            lexicon[fields[0]] = float(fields[1])
        except ValueError:
            raise ValueError(f"{where}:{number}: the valence {fields[1]!r} is not a number") from None
    return lexicon


class SentimentDomains(NamedTuple):
    source: Corpus   # every labeled source snippet
    adapt: Corpus    # target snippets for adaptation: their labels are for the bound only
    test: Corpus     # held-out target snippets: evaluation only


def sentiment_domains(source: str = "movie", target: str = "amazon", test_fraction: float = 0.4,
                      split_seed: int = 0, cache=None, progress: bool = True) -> SentimentDomains:
    """Source corpus, and the target corpus split once, stratified by label with
    ``split_seed``, into an adaptation pool (1 − ``test_fraction``) and a test set.
    For movie → amazon with the defaults: 10,043 source, 1,765 adapt, 1,178 test snippets."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    src, tgt = load_corpus(source, cache, progress), load_corpus(target, cache, progress)
    rng = np.random.default_rng(split_seed)
    test_idx = []
    for label in np.unique(tgt.labels):
        members = np.flatnonzero(tgt.labels == label)
        test_idx.extend(rng.choice(members, size=int(round(test_fraction * len(members))), replace=False))
    is_test = np.zeros(len(tgt.labels), dtype=bool)
    is_test[np.asarray(test_idx, dtype=np.int64)] = True
    pick = lambda mask: Corpus([t for t, m in zip(tgt.texts, mask) if m], tgt.labels[mask])  # noqa: E731
    return SentimentDomains(src, pick(~is_test), pick(is_test))


__all__ = ["CORPORA", "Corpus", "DataUnavailable", "SDIST_SHA256", "SentimentDomains", "Snippets",
           "binary_labels", "decode", "load_corpus", "load_lexicon", "load_snippets", "parse_snippets", "read_member",
           "sdist", "sentiment_domains"]
