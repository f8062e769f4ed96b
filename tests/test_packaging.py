"""Packaging: the import-time check of the build record, the sdist and the wheels.

Tests marked ``packaging`` build in fresh virtual environments and take minutes. CI runs
them with everything else (``pytest -q``); ``pytest -m "not packaging"`` leaves them out.
They build offline: pip takes torch from the wheels on local disk (PIP_FIND_LINKS,
/opt/wheels) and the tests skip, saying which, when those or a compiler are missing.
"""
from __future__ import annotations

import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import textwrap
import time
import zipfile
from pathlib import Path

import pytest
import torch
from packaging.version import Version

from lepton_fast import _backend, _extension
from lepton_fast.version import __version__

REPO = Path(__file__).resolve().parents[1]
CPU_TORCH = "2.13.0"  # the torch CPU build that lies on local disk here
STEP_TIMEOUT_S = 900


# --- the build record check, in process -------------------------------------------------

RUNNING_CUDA = {"torch": "2.14.1", "cuda": "13.0", "cxx11_abi": True}
RUNNING_CPU = {"torch": "2.14.1", "cuda": None, "cxx11_abi": True}


def record(**changes):
    return {"extension": True, "torch": "2.14.1", "cuda": "13.0", "archs": "8.0;9.0+PTX", "cxx11_abi": True,
            "impl_only": True, **changes}


@pytest.mark.parametrize(
    "built, running",
    [
        pytest.param(record(), RUNNING_CUDA, id="same-build"),
        # torch keeps its C++ ABI within a minor release, the wheel label says torch2.14
        pytest.param(record(torch="2.14.0"), RUNNING_CUDA, id="other-patch-release"),
        pytest.param(record(cuda="13.1"), RUNNING_CUDA, id="other-cuda-minor"),
        # a CPU-only build runs its CPU kernels under a CUDA torch; CUDA ops go to Triton
        pytest.param(record(cuda=None, archs=None), RUNNING_CUDA, id="cpu-build-cuda-torch"),
    ],
)
def test_build_record_accepted(built, running):
    assert _extension.build_mismatch(built, running) is None


@pytest.mark.parametrize(
    "built, running, expected",
    [
        pytest.param(record(torch="2.13.0"), RUNNING_CUDA, "needs torch 2.13.x", id="other-torch-minor"),
        pytest.param(record(torch="3.14.1"), RUNNING_CUDA, "needs torch 3.14.x", id="other-torch-major"),
        pytest.param(record(), RUNNING_CPU, "needs a CUDA build of torch", id="cuda-build-cpu-torch"),
        pytest.param(record(cuda="12.8"), RUNNING_CUDA, "needs CUDA 12.x", id="other-cuda-major"),
        pytest.param(record(cxx11_abi=False), RUNNING_CUDA, "needs _GLIBCXX_USE_CXX11_ABI=0", id="other-cxx-abi"),
        pytest.param(
            record(torch="2.13.0", cuda="12.8"), RUNNING_CUDA, "needs torch 2.13.x and CUDA 12.x", id="two-at-once"
        ),
        pytest.param({"extension": True, "torch": "2.14.1"}, RUNNING_CUDA, "unreadable build record", id="truncated"),
        # an extension that defines the schemas itself would abort the process on import
        pytest.param(record(impl_only=None), RUNNING_CUDA, "needs a rebuild", id="defines-schemas"),
    ],
)
def test_build_record_refused_says_expected_and_found(built, running, expected):
    message = _extension.build_mismatch(built, running)
    assert message is not None and expected in message
    if not message.startswith("unreadable"):
        assert f"running torch {running['torch']}" in message


@pytest.mark.parametrize("recorded, expected", [
    ("no GPU is visible (TORCH_CUDA_ARCH_LIST builds them anyway)",
     "no GPU is visible (TORCH_CUDA_ARCH_LIST builds them anyway)"),
    (None, "a CPU-only torch, no nvcc, or no GPU at build time"),  # a record from before the reason was kept
], ids=["recorded", "older-record"])
def test_info_says_why_the_build_has_no_cuda_kernels(monkeypatch, recorded, expected):
    """setup.py records why it compiled no CUDA kernels, and the backend table repeats it (a
    new user was told "a CPU-only torch, no nvcc, or LEPTON_FAST_SKIP_CUDA=1" when none held)."""
    if _extension.extension().module is None or _extension.build_record().get("cuda"):
        pytest.skip("needs a compiled extension without CUDA kernels (with them, CUDA tensors run them)")
    monkeypatch.setattr(_backend, "build_record", lambda: record(cuda=None, archs=None, no_cuda_because=recorded))
    from lepton_fast.ops.kd_loss import SPEC

    assert _backend.unavailable(SPEC, "cuda", "cuda") == f"lepton_fast._C was built without CUDA ({expected})"


@pytest.mark.packaging  # two setup.py runs, each importing torch
@pytest.mark.parametrize("labelled", [False, True], ids=["default", "LEPTON_FAST_LOCAL_VERSION=1"])
def test_version_label_is_opt_in(labelled):
    """A wheel built from the sdist must keep the sdist's version, or pip refuses it when
    it comes from an index ("inconsistent version"): the label is for release wheels only."""
    env = _clean_env(LEPTON_FAST_SKIP_CUDA="1", **({"LEPTON_FAST_LOCAL_VERSION": "1"} if labelled else {}))
    version = _run([sys.executable, "setup.py", "--version"], cwd=REPO, env=env).stdout.split()[-1]
    label = f"+cputorch{'.'.join(torch.__version__.split('.')[:2])}" if labelled else ""
    assert version == __version__ + label
    assert str(Version(version)) == version  # PEP 440, already in normal form


# --- what the build needs, and the supported range ---------------------------------------

def test_old_setuptools_stops_with_the_command_that_fixes_it():
    """--no-build-isolation installs nothing the build lists: setup.py checks setuptools
    itself, before setuptools reads pyproject.toml, and says in one line what to run."""
    code = ("import runpy, sys, setuptools; setuptools.__version__ = '65.5.0'; "
            "sys.argv = ['setup.py', '--version']; runpy.run_path('setup.py', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=_clean_env())
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    from importlib import metadata

    fix = f'pip install "setuptools>=77" "torch=={metadata.version("torch")}"'
    assert "needs setuptools>=77" in lines[0] and "found 65.5.0" in lines[0] and fix in lines[0], lines[0]


@pytest.mark.packaging
def test_bundled_old_setuptools_fails_fast_in_a_fresh_venv(tmp_path):
    """The report of issue 16 as a user meets it: a venv whose bundled setuptools is too old
    (Python 3.11's 65.5), then the README's editable install without isolation."""
    timings = {}
    bin_dir = _venv(tmp_path / "venv", timings)
    probe = _run([str(bin_dir / "python"), "-c", "import setuptools; print(setuptools.__version__)"], env=_clean_env())
    found = probe.stdout.strip()
    if tuple(int(p) for p in found.split(".")[:2]) >= (77, 0):
        pytest.skip(f"this Python's venv comes with setuptools {found}, new enough")
    src = _copy_sources(tmp_path / "src")
    proc = subprocess.run([str(bin_dir / "pip"), "install", "--no-build-isolation", "--no-deps", "--no-index", "-e",
                           str(src)], capture_output=True, text=True, timeout=STEP_TIMEOUT_S,
                          env=_clean_env(LEPTON_FAST_SKIP_EXT="1"))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"needs setuptools>=77 to read pyproject.toml and found {found}" in out, out[-3000:]
    assert 'run  pip install "setuptools>=77"' in out and "project.license" not in out, out[-3000:]


def test_supported_versions_agree():
    """The range stated in the README is the one the metadata, setup.py, the GPU check and
    the CI job on the oldest versions use."""
    import importlib.util
    import re
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["project"]["requires-python"] == ">=3.11"
    assert "setuptools>=77" in project["build-system"]["requires"]
    assert project["project"]["optional-dependencies"]["triton"] == ["triton>=3.6"]
    setup_py = (REPO / "setup.py").read_text()
    assert "TORCH_OLDEST = (2, 11)" in setup_py and "SETUPTOOLS_FLOOR = (77, 0)" in setup_py
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    assert gpu_check.OLDEST_TORCH == (2, 11) and gpu_check.OLDEST_PYTHON == (3, 11)
    assert "setuptools>=77" in gpu_check.NEEDED
    assert re.search(r"^TORCH=2\.11\.0$", (REPO / "scripts" / "ci_oldest.sh").read_text(), re.MULTILINE)
    readme = (REPO / "README.md").read_text()
    for row in ("| Python | 3.11 | 3.12 |", "| torch | 2.11 | 2.14 (2.14.1) |", "| Triton | 3.6 (torch 2.11's) | 3.8",
                "| setuptools | 77 |"):
        assert row in readme, row
    assert 'pip install torch==2.14.1 ninja "setuptools>=77"' in readme
    makefile = (REPO / "Makefile").read_text()  # `make test`, what .ci/run runs
    assert "TORCH ?= torch==2.14.1" in makefile and '$(TORCH) ninja "setuptools>=77"' in makefile
    assert "make test" in (REPO / ".ci" / "run").read_text() and "make test" in readme


def test_cpu_kernels_run_on_the_threads_torch_has():
    """at::parallel_for is inline: built without -fopenmp, its pragma vanishes and every CPU
    kernel runs on one thread, which no result shows, only the time (this went unnoticed
    for a round). The extension reports the threads its parallel_for really uses."""
    from lepton_fast import _backend

    module = _backend.extension().module
    if module is None:
        pytest.skip("the extension is not built")
    if (os.cpu_count() or 1) < 2:
        pytest.skip("one core")
    previous = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            assert module.parallel_threads() == n
    finally:
        torch.set_num_threads(previous)


def test_gpu_check_reads_the_running_build():
    """The GPU check's look at the build (in a fresh interpreter) runs against the package as it
    is: the op table it walks is _backend.OPS. It once read an attribute the op layer had
    dropped, and only a dry run on another machine showed it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    proc = subprocess.run([sys.executable, "-c", gpu_check.VERIFY_BUILD], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(report["ops"]) == set(_backend.OPS) and all(set(v) == {"cuda", "triton"} for v in report["ops"].values())


# --- helpers for the builds ---------------------------------------------------------------

def _clean_env(**extra):
    """The environment of a user's shell: none of this process's venv, PYTHONPATH or
    lepton_fast switches, so a subprocess sees only what the test sets."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "TORCH_CUDA_ARCH_LIST")
           and not k.startswith("LEPTON_FAST_")}
    env.setdefault("MAX_JOBS", "2")
    env.update(extra)
    return env


def _run(cmd, timings=None, label=None, **kwargs):
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=STEP_TIMEOUT_S, **kwargs)
    if timings is not None:
        timings[label or cmd[0]] = round(time.perf_counter() - start, 1)
    if proc.returncode != 0:  # a build's cause is in ninja's FAILED lines and the compiler's errors, far from the tail
        lines = (proc.stdout + proc.stderr).splitlines()
        causes = [line for line in lines if "FAILED:" in line or "error" in line.lower()]
        pytest.fail(f"{cmd} failed ({proc.returncode}):\n" + "\n".join(causes[:40]) +
                    f"\n...\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def _venv(path: Path, timings) -> Path:
    _run([sys.executable, "-m", "venv", str(path)], timings, f"venv {path.name}", env=_clean_env())
    return path / "bin"


def _copy_sources(dest: Path) -> Path:
    """The work tree without what a build leaves in it, so builds here never touch it."""
    shutil.copytree(REPO, dest, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "__pycache__", "*.so", "_build_info.py",
        ".venv*", ".benchmarks", ".pytest_cache"))
    return dest


def _local_wheel(pattern: str) -> str | None:
    dirs = os.environ.get("PIP_FIND_LINKS", "").split() + ["/opt/wheels"]
    for d in dirs:
        found = glob.glob(os.path.join(d.removeprefix("file://"), pattern))
        if found:
            return found[0]
    return None


def _nvcc() -> str | None:
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return os.path.join(CUDA_HOME, "bin", "nvcc")
    return None


def _check_wheel_contents(wheel: Path, sources: Path) -> dict:
    """The wheel holds the package, the Triton kernels as lepton_fast.kernels, the
    compiled module and its build record, and nothing else (no sources, objects, caches)."""
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        build_info = zf.read("lepton_fast/_build_info.py").decode()
    expected = {str(p.relative_to(sources)) for p in (sources / "lepton_fast").rglob("*.py")}
    expected |= {"lepton_fast/kernels/" + str(p.relative_to(sources / "kernels")) for p in (sources / "kernels").rglob("*.py")}
    expected |= {"lepton_fast/_build_info.py", "lepton_fast/_C" + sysconfig.get_config_var("EXT_SUFFIX")}
    package = {n for n in names if ".dist-info/" not in n}
    assert package == expected, f"missing {sorted(expected - package)}, unexpected {sorted(package - expected)}"
    scope = {}
    exec(build_info, scope)
    return scope["BUILD_INFO"]


# A user's program, run with the installed wheel from outside the source tree. It prints
# what it saw as JSON: where lepton_fast came from, the backend, lepton_fast's warnings and
# the worst error of the loss and gradient against reference.py in float64.
USER_PROGRAM = textwrap.dedent('''
    import json, warnings
    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as caught:
        import torch
        import lepton_fast
        from lepton_fast import _backend, fused_kd_loss, reference
        from lepton_fast.ops.kd_loss import SPEC

        torch.manual_seed(0)
        student = torch.randn(6, 5, 37)  # leading dims: flattened to 30 rows
        teacher = torch.randn(6, 5, 37)
        labels = torch.randint(0, 37, (6, 5))
        labels[0, :2] = -100
        kwargs = dict(temperature=2.0, labels=labels, alpha=0.3)

        s = student.clone().requires_grad_()
        loss = fused_kd_loss(s, teacher, **kwargs)
        (loss * 1.7).backward()
        s64 = student.double().requires_grad_()
        ref = reference.fused_kd_loss(s64, teacher.double(), **kwargs)
        (ref * 1.7).backward()
        fused_kd_loss(student, teacher, **kwargs)  # a second call must not warn again

    def err(got, want):
        return ((got.double() - want).abs() / want.abs().clamp_min(1.0)).max().item()

    print(json.dumps({
        "file": lepton_fast.__file__,
        "backend": _backend.resolve(SPEC, student.device),
        "warnings": [str(w.message) for w in caught if "lepton_fast" in str(w.message)],
        "loss_err": err(loss.detach(), ref.detach()),
        "grad_err": err(s.grad, s64.grad),
        "grad_dtype": str(s.grad.dtype),
    }))
''')


def _run_user_program(bin_dir: Path, cwd: Path, timings, label) -> dict:
    proc = _run([str(bin_dir / "python"), "-c", USER_PROGRAM], timings, label, cwd=cwd, env=_clean_env())
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- the wheels -----------------------------------------------------------------------------

@pytest.mark.packaging
def test_cpu_wheel_installs_runs_and_falls_back(tmp_path):
    """scripts/build_wheels.sh builds the sdist and the CPU wheel for torch 2.13 in a fresh
    venv; the wheel installs into another fresh venv (pip picks torch 2.13 from its pin),
    runs there, and refuses a build record that does not match with one warning."""
    torch_wheel = _local_wheel(f"torch-{CPU_TORCH}+cpu-*.whl")
    if torch_wheel is None:
        pytest.skip(f"torch {CPU_TORCH} CPU wheel not on local disk (PIP_FIND_LINKS, /opt/wheels): not downloading it")
    if shutil.which("c++") is None:
        pytest.skip("no C++ compiler (c++) to build the extension")
    timings = {}
    src = _copy_sources(tmp_path / "src")
    dist = tmp_path / "dist"
    _run(["bash", "scripts/build_wheels.sh", "cpu"], timings, "build_wheels.sh cpu (venv, sdist, wheel)", cwd=src,
         env=_clean_env(DIST=str(dist), WHEEL_VENVS=str(tmp_path / "build-venvs")))

    sdists = list(dist.glob("*.tar.gz"))
    assert [p.name for p in sdists] == [f"lepton_fast-{__version__}.tar.gz"]  # no local label on an sdist
    with tarfile.open(sdists[0]) as tf:
        in_sdist = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    needed = {str(p.relative_to(src)) for p in (src / "csrc").rglob("*") if p.is_file()}
    needed |= {str(p.relative_to(src)) for p in (src / "kernels").rglob("*.py")}
    assert needed <= in_sdist, f"sdist lacks {sorted(needed - in_sdist)}"
    assert not {n for n in in_sdist if n.endswith((".so", "_build_info.py"))}, "sdist carries build outputs"

    wheels = list(dist.glob("*.whl"))
    py = f"cp{sys.version_info.major}{sys.version_info.minor}"
    assert [w.name for w in wheels] == [f"lepton_fast-{__version__}+cputorch2.13-{py}-{py}-linux_x86_64.whl"]
    built = _check_wheel_contents(wheels[0], src)
    assert built["torch"] == CPU_TORCH and built["cuda"] is None and built["no_cuda_because"] == "LEPTON_FAST_SKIP_CUDA=1"

    run_dir = tmp_path / "user"  # outside the source tree: nothing there to import by accident
    run_dir.mkdir()
    bin_dir = _venv(tmp_path / "user-venv", timings)
    _run([str(bin_dir / "python"), "-m", "pip", "install", str(wheels[0])], timings, "pip install wheel (+torch)",
         cwd=run_dir, env=_clean_env())
    info = _run([str(bin_dir / "lepton-fast"), "info"], timings, "lepton-fast info", cwd=run_dir, env=_clean_env())
    assert f"torch {CPU_TORCH}" in info.stdout and "extension loaded: True" in info.stdout, info.stdout
    assert info.stderr.count("lepton_fast: compiled kernels disabled") == 0, info.stderr
    assert "without OpenMP" not in info.stdout, info.stdout  # the wheel's kernels use every thread

    good = _run_user_program(bin_dir, run_dir, timings, "fused_kd_loss, matching build")
    assert Path(good["file"]).is_relative_to(tmp_path / "user-venv"), good["file"]
    assert good["backend"] == "cpu" and good["warnings"] == []
    assert good["loss_err"] <= 1e-5 and good["grad_err"] <= 1e-5 and good["grad_dtype"] == "torch.float32", good

    # A build record from another torch, as if the wheel were installed beside torch 2.99.
    record_file = Path(good["file"]).parent / "_build_info.py"
    scope = {}
    exec(record_file.read_text(), scope)
    record_file.write_text(f"BUILD_INFO = {dict(scope['BUILD_INFO'], torch='2.99.0')!r}\n")
    bad = _run_user_program(bin_dir, run_dir, timings, "fused_kd_loss, mismatched record")
    assert bad["backend"] == "reference"
    assert len(bad["warnings"]) == 1, bad["warnings"]
    assert f"built for torch 2.99.0 (CPU only" in bad["warnings"][0] and "needs torch 2.99.x" in bad["warnings"][0]
    assert f"running torch {CPU_TORCH}" in bad["warnings"][0]
    assert bad["loss_err"] <= 1e-5 and bad["grad_err"] <= 1e-5, bad
    info = _run([str(bin_dir / "lepton-fast"), "info"], timings, "lepton-fast info, mismatched", cwd=run_dir,
                env=_clean_env())
    assert "extension loaded: False (built for torch 2.99.0" in info.stdout, info.stdout
    assert info.stderr.count("lepton_fast: compiled kernels disabled") == 1, info.stderr

    # A record that matches but a compiled module that cannot load: the same single warning.
    record_file.write_text(f"BUILD_INFO = {scope['BUILD_INFO']!r}\n")
    next(record_file.parent.glob("_C*.so")).unlink()
    gone = _run_user_program(bin_dir, run_dir, timings, "fused_kd_loss, module missing")
    assert gone["backend"] == "reference" and len(gone["warnings"]) == 1
    assert "lepton_fast._C failed to load" in gone["warnings"][0]
    print("timings (s):", timings)


@pytest.mark.packaging
def test_pure_python_wheel_runs_triton_on_cuda_and_the_reference_on_cpu(tmp_path):
    """The py3-none-any wheel (LEPTON_FAST_SKIP_EXT=1, what scripts/build_wheels.sh pure
    builds) holds the package and the Triton kernels and nothing compiled; installed beside
    any torch it needs no compiler, runs the reference kernel on CPU tensors without a
    warning, and `lepton-fast info` names Triton as the CUDA kernel of every op."""
    timings = {}
    src = _copy_sources(tmp_path / "src")
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-w", str(dist), str(src)],
         timings, "pip wheel (pure Python)", cwd=tmp_path, env=_clean_env(LEPTON_FAST_SKIP_EXT="1"))
    wheels = list(dist.glob("*.whl"))
    assert [w.name for w in wheels] == [f"lepton_fast-{__version__}-py3-none-any.whl"]
    with zipfile.ZipFile(wheels[0]) as zf:
        package = {n for n in zf.namelist() if ".dist-info/" not in n}
    expected = {str(p.relative_to(src)) for p in (src / "lepton_fast").rglob("*.py")}
    expected |= {"lepton_fast/kernels/" + str(p.relative_to(src / "kernels")) for p in (src / "kernels").rglob("*.py")}
    assert package == expected, f"missing {sorted(expected - package)}, unexpected {sorted(package - expected)}"

    run_dir = tmp_path / "user"
    run_dir.mkdir()
    venv = tmp_path / "user-venv"
    _run([sys.executable, "-m", "venv", str(venv)], timings, "venv", env=_clean_env())
    # This process's torch, triton and numpy, by path: not --system-site-packages, which would be
    # the base interpreter's (no torch when tests run from a venv) and would run the .pth files
    # there, one of which may be an editable lepton_fast's import hook that shadows the wheel.
    # A directory named in a .pth file has its own .pth files ignored.
    found = (importlib.util.find_spec(name) for name in ("torch", "triton", "numpy"))
    site_dirs = dict.fromkeys(str(Path(spec.origin).parents[1]) for spec in found if spec)
    (next(venv.glob("lib/python*/site-packages")) / "deps.pth").write_text("\n".join(site_dirs) + "\n")
    bin_dir = venv / "bin"
    # --force-reinstall: a lepton_fast of the same version in those directories (the developer's
    # own install) would otherwise count as installed; pip leaves it alone, being outside the venv.
    _run([str(bin_dir / "python"), "-m", "pip", "install", "--no-deps", "--force-reinstall", str(wheels[0])],
         timings, "pip install wheel", cwd=run_dir, env=_clean_env())
    info = _run([str(bin_dir / "python"), "-m", "lepton_fast", "info"], timings, "lepton-fast info", cwd=run_dir,
                env=_clean_env())
    assert "extension loaded: False (not built" in info.stdout and info.stderr.count("compiled kernels") == 0, info
    rows = {line.split()[0]: line.split()[1:] for line in info.stdout.splitlines()
            if line.split() and line.split()[0] in _backend.OPS}
    assert set(rows) == {name for name, spec in _backend.OPS.items() if spec.public}, info.stdout
    assert all(row[:2] == ["reference", "triton"] for row in rows.values()), info.stdout
    ran = _run_user_program(bin_dir, run_dir, timings, "fused_kd_loss, pure Python")
    assert Path(ran["file"]).is_relative_to(venv), ran["file"]
    assert ran["backend"] == "reference" and ran["warnings"] == []
    assert ran["loss_err"] <= 1e-5 and ran["grad_err"] <= 1e-5 and ran["grad_dtype"] == "torch.float32", ran
    print("timings (s):", timings)


@pytest.mark.packaging
def test_cuda_wheel_builds_with_local_version(tmp_path):
    """The CUDA wheel compiles (it cannot run without a GPU here) against the running CUDA
    torch, and its name and build record say which CUDA and torch."""
    if torch.version.cuda is None:
        pytest.skip(f"torch {torch.__version__} is a CPU-only build: no CUDA wheel to build")
    if _nvcc() is None:
        pytest.skip("nvcc not found (set CUDA_HOME): cannot compile the CUDA wheel")
    timings = {}
    src = _copy_sources(tmp_path / "src")
    dist = tmp_path / "dist"
    # No CUDA_HOME: setup.py finds the toolkit as the README's set-up will, from nvcc.
    _run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-w", str(dist), str(src)],
         timings, "pip wheel (CUDA, arch 9.0)", cwd=tmp_path,
         env=_clean_env(LEPTON_FAST_FORCE_CUDA="1", LEPTON_FAST_LOCAL_VERSION="1", TORCH_CUDA_ARCH_LIST="9.0"))
    cuda, minor = torch.version.cuda, ".".join(torch.__version__.split(".")[:2])
    py = f"cp{sys.version_info.major}{sys.version_info.minor}"
    label = f"cu{cuda.replace('.', '')}torch{minor}"  # +cu130torch2.14 for torch 2.14.1+cu130
    assert [w.name for w in dist.glob("*.whl")] == [f"lepton_fast-{__version__}+{label}-{py}-{py}-linux_x86_64.whl"]
    built = _check_wheel_contents(next(dist.glob("*.whl")), src)
    assert built == {"extension": True, "torch": torch.__version__.split("+")[0], "cuda": cuda, "archs": "9.0",
                     "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI), "impl_only": True, "no_cuda_because": None}
    print("timings (s):", timings)
