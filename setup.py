"""Builds the extension lepton_fast._C with torch.utils.cpp_extension.

CPU sources always; CUDA sources when torch is a CUDA build, nvcc is found, and the build is
for GPUs: one is visible here, or TORCH_CUDA_ARCH_LIST names the ones to build for, or
LEPTON_FAST_FORCE_CUDA=1. nvcc alone is not enough: on a machine without a GPU the CUDA
kernels would cost a quarter of an hour of compiling for nothing it can run (on GPUs the
pure-Python layer's Triton kernels run where the build has no CUDA kernels).
Switches (environment):
  LEPTON_FAST_SKIP_EXT=1       no extension: the package runs on reference.py (and Triton)
  LEPTON_FAST_SKIP_CUDA=1      CPU sources only
  LEPTON_FAST_FORCE_CUDA=1     CUDA sources, GPU or not, and fail rather than build without
                               them (release wheels: scripts/build_wheels.sh sets it)
  TORCH_CUDA_ARCH_LIST         the GPUs to build CUDA sources for, GPU here or not; default
                               "8.0;9.0+PTX" where another reason builds them
  MAX_JOBS                     parallel compile jobs (ninja)
  LEPTON_FAST_LOCAL_VERSION=1  append the PEP 440 local label +cu130torch2.14 / +cputorch2.14
                               (release wheels; scripts/build_wheels.sh sets it)

The extension compiles against the torch that is installed, so build without isolation
(`pip install --no-build-isolation ...`). Packing an sdist needs no torch. Without isolation
pip installs nothing that [build-system] lists, so this file checks it itself: setuptools
>= 77 (the first that reads pyproject.toml's PEP 639 `license = "Apache-2.0"`; a Python 3.11
venv comes with 65.5, and torch 2.11 allows up to 81) and a torch in the supported range,
each with a one-line error that gives the command that fixes it.

The build facts (torch, CUDA, archs, C++ ABI) go into lepton_fast/_build_info.py next to
the compiled module, written only once it has compiled, so that an import under another
torch falls back instead of loading a binary built for something else.
"""
import glob
import os
import pprint
import re
import subprocess
import sys

import setuptools

# The supported range (README "Supported versions"): the oldest torch is what the GPU machines
# run (2.11, with Triton 3.6); CI builds and tests both ends, 2.11 and the pinned 2.14.
SETUPTOOLS_FLOOR = (77, 0)
TORCH_OLDEST = (2, 11)


def version_tuple(text):
    return tuple(int(p) for p in re.findall(r"\d+", text.split("+")[0])[:2])


def installed_torch():
    """The installed torch's version string, read without importing it, or None."""
    from importlib import metadata

    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None


def check_setuptools():
    if version_tuple(setuptools.__version__) >= SETUPTOOLS_FLOOR:
        return
    # Naming the installed torch keeps it, and lets pip pick a setuptools it accepts.
    torch_version = installed_torch()
    keep = f' "torch=={torch_version}"' if torch_version else ""
    sys.exit(f"lepton_fast needs setuptools>=77 to read pyproject.toml and found {setuptools.__version__} "
             f"(--no-build-isolation installs none): run  pip install \"setuptools>=77\"{keep}  and build again")


check_setuptools()

from setuptools import find_packages, setup  # noqa: E402
from setuptools.command.build_py import build_py  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0+PTX"
EXTENSION = "lepton_fast._C"
RECORD = "_build_info"  # lepton_fast/_build_info.py, generated; never taken from the source tree
TORCH_FLOOR = "torch>=%d.%d" % TORCH_OLDEST
# For plan() and README "Quick start": a build on 2 cores, MAX_JOBS unset, no ccache. CPU: 452
# CPU-seconds measured (2026-12-06, under load, so wall time there was 21 minutes), ~4 minutes on
# 2 idle cores. CUDA: what the two default archs added when `make demo` compiled them on such a
# machine (issue 20: 17 minutes in all).
CPU_BUILD_MINUTES = 4
CUDA_BUILD_MINUTES = 13


def flag(name):
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def base_version():
    scope = {}
    with open(os.path.join(HERE, "lepton_fast", "version.py")) as f:
        exec(f.read(), scope)
    return scope["__version__"]


def packing_sources_only():
    """`setup.py sdist` (what `python -m build --sdist` runs): no compiler, no torch needed,
    and no local label, since an sdist is the same whatever torch builds it later."""
    return "sdist" in sys.argv[1:]


def find_cuda_home(ce):
    """The CUDA toolkit to compile and link against, or None.

    Without $CUDA_HOME torch takes the folder two levels above the nvcc on PATH, which is
    wrong when that nvcc is a wrapper script (here /usr/local/bin/nvcc runs
    /usr/local/cuda-13.0/bin/nvcc): the compile works and the link then cannot find
    cudart. nvcc itself knows where its toolkit is (TOP in a dry run), so ask it.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or ce.CUDA_HOME is None:
        return ce.CUDA_HOME
    nvcc = os.path.join(ce.CUDA_HOME, "bin", "nvcc")
    if not os.path.exists(nvcc):
        return None
    try:
        dry = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return ce.CUDA_HOME
    top = re.search(r"^#\$ TOP=(.+)$", dry.stdout + dry.stderr, re.MULTILINE)
    return os.path.realpath(top.group(1).strip()) if top else ce.CUDA_HOME


def cuda_choice(torch, ce):
    """(CUDA_HOME to compile the CUDA sources with, or None; why, in words for the build's
    one-line plan)."""
    if flag("LEPTON_FAST_SKIP_CUDA"):
        return None, "LEPTON_FAST_SKIP_CUDA=1"
    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} is a CPU-only build"
    cuda_home = find_cuda_home(ce)
    if cuda_home is None or not os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        return None, f"torch {torch.__version__} is a CUDA build and nvcc was not found (set CUDA_HOME)"
    if flag("LEPTON_FAST_FORCE_CUDA"):
        return cuda_home, "LEPTON_FAST_FORCE_CUDA=1"
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return cuda_home, "TORCH_CUDA_ARCH_LIST is set"
    if torch.cuda.is_available():
        return cuda_home, "a GPU is visible"
    return None, "no GPU is visible (TORCH_CUDA_ARCH_LIST or LEPTON_FAST_FORCE_CUDA=1 builds them anyway)"


def build_facts():
    """(What the extension will be compiled against, or None when no extension is built; why
    the CUDA sources are compiled or not, or None)."""
    if flag("LEPTON_FAST_SKIP_EXT") or packing_sources_only():
        return None, None
    try:
        import torch
        from torch.utils import cpp_extension as ce
    except ImportError:
        sys.exit(
            "lepton_fast compiles its kernels against the installed torch, and torch is not "
            "importable here. Install torch first, then build without build isolation:\n"
            "    pip install --no-build-isolation lepton_fast\n"
            "(or set LEPTON_FAST_SKIP_EXT=1 for a build without compiled kernels)."
        )
    if version_tuple(torch.__version__) < TORCH_OLDEST:
        sys.exit(f"lepton_fast supports torch >= {'.'.join(map(str, TORCH_OLDEST))} and found torch "
                 f"{torch.__version__}: run  pip install \"torch>={'.'.join(map(str, TORCH_OLDEST))}\"  "
                 "and build again (or set LEPTON_FAST_SKIP_EXT=1 for a build without compiled kernels)")
    cuda_home, why = cuda_choice(torch, ce)
    # A release build asks for CUDA and must not quietly produce a CPU-only wheel instead.
    if flag("LEPTON_FAST_FORCE_CUDA") and cuda_home is None and not flag("LEPTON_FAST_SKIP_CUDA"):
        sys.exit(f"LEPTON_FAST_FORCE_CUDA=1, but {why}")
    if cuda_home is not None:
        # cpp_extension reads CUDA_HOME from its module at compile and link time.
        ce.CUDA_HOME = os.environ["CUDA_HOME"] = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    facts = {
        "extension": True,
        "torch": torch.__version__.split("+")[0],
        "cuda": torch.version.cuda if cuda_home is not None else None,
        "archs": os.environ["TORCH_CUDA_ARCH_LIST"] if cuda_home is not None else None,
        # Why no CUDA kernels, in the plan's words: `lepton-fast info` repeats it.
        "no_cuda_because": why if cuda_home is None else None,
        "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI),
        # The extension registers kernels only (TORCH_LIBRARY_IMPL); the schemas are defined in
        # Python. A build without this mark defines them itself and would abort the process.
        "impl_only": True,
    }
    return facts, why


def plan(facts, why_cuda):
    """One line: what this build compiles, why, and about how long it takes on 2 cores (the
    machine the README's times are for)."""
    if facts is None:
        return "lepton_fast: nothing to compile (LEPTON_FAST_SKIP_EXT=1, or an sdist)"
    cpu = f"the CPU kernels (about {CPU_BUILD_MINUTES} minutes on 2 cores)"
    if facts["cuda"] is None:
        return f"lepton_fast: compiling {cpu}, not the CUDA kernels: {why_cuda}"
    return (f"lepton_fast: compiling {cpu} and the CUDA kernels for archs {facts['archs']} ({why_cuda}; about "
            f"{CUDA_BUILD_MINUTES} minutes more for two archs, less for one)")


class Describe(setuptools.Command):
    """`python setup.py -q describe` prints the build's plan (:func:`plan`) and compiles
    nothing. pip shows nothing of a build but a spinner (this file's output only under
    -v), so `make` prints this line before the long build step."""

    description = "print what a build here compiles, and about how long it takes"
    user_options = []

    def initialize_options(self):
        pass

    def finalize_options(self):
        pass

    def run(self):
        print(PLAN)


def torch_minor(facts):
    return ".".join(facts["torch"].split(".")[:2])


def local_version(facts):
    """PEP 440 local label naming the build: +cu130torch2.14 or +cputorch2.14."""
    if facts is None or not flag("LEPTON_FAST_LOCAL_VERSION"):
        return ""
    accel = "cu" + facts["cuda"].replace(".", "") if facts["cuda"] else "cpu"
    return f"+{accel}torch{torch_minor(facts)}"


def torch_requirement(facts):
    """A compiled build runs only on the torch minor release it was built for (torch keeps
    no C++ ABI across minor releases), so its wheel says so and pip keeps the two together."""
    if facts is None:
        return TORCH_FLOOR
    major, minor = (int(p) for p in torch_minor(facts).split("."))
    return f"torch>={major}.{minor},<{major}.{minor + 1}"


class BuildPyWithoutRecord(build_py):
    """A build record left in the source tree by an in-place build describes that build,
    not this one: it never goes into an sdist or a wheel (build_ext writes the real one)."""

    def find_package_modules(self, package, package_dir):
        modules = super().find_package_modules(package, package_dir)
        return [m for m in modules if (m[0], m[1]) != ("lepton_fast", RECORD)]


def write_record(directory, facts):
    with open(os.path.join(directory, RECORD + ".py"), "w") as f:
        f.write('"""Written by setup.py once lepton_fast._C compiled: what it was built against."""\n')
        f.write("BUILD_INFO = " + pprint.pformat(facts) + "\n")


def extension_and_commands(facts):
    commands = {"build_py": BuildPyWithoutRecord, "describe": Describe}
    if facts is None:
        return [], commands
    from torch.utils import cpp_extension as ce

    class BuildExtWithRecord(ce.BuildExtension):
        """Writes the build record beside the compiled module, after it compiled, and
        copies both into the source tree for in-place (editable) builds."""

        def build_extensions(self):
            print(PLAN, file=sys.stderr, flush=True)
            super().build_extensions()
            write_record(os.path.dirname(self.get_ext_fullpath(EXTENSION)), facts)

        def copy_extensions_to_source(self):
            super().copy_extensions_to_source()  # self.inplace is set here: paths are in the source tree
            write_record(os.path.dirname(self.get_ext_fullpath(EXTENSION)), facts)

    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-fvisibility=hidden"]
    link = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is inline: its `omp parallel` is compiled into our object files and is
        # a no-op without -fopenmp, so every CPU kernel would run on one thread. libgomp.so.1
        # resolves to the copy torch has already loaded (one thread pool, torch.set_num_threads
        # applies). `lepton-fast info` reports the threads a CPU kernel really gets.
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    macros = [("LEPTON_FAST_WITH_CUDA", "1" if facts["cuda"] else "0")]
    if facts["cuda"]:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        nvcc = ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"]
        ext = ce.CUDAExtension(
            EXTENSION, sources, define_macros=macros,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=link,
        )
    else:
        ext = ce.CppExtension(
            EXTENSION, sources, define_macros=macros, extra_compile_args={"cxx": cxx}, extra_link_args=link,
        )
    commands["build_ext"] = BuildExtWithRecord.with_options(use_ninja=True)
    return [ext], commands


facts, why_cuda = build_facts()
PLAN = plan(facts, why_cuda)
ext_modules, cmdclass = extension_and_commands(facts)
setup(
    version=base_version() + local_version(facts),
    install_requires=[torch_requirement(facts), "numpy"],
    packages=find_packages(include=["lepton_fast", "lepton_fast.*"]) + ["lepton_fast.kernels"],
    package_dir={"lepton_fast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
