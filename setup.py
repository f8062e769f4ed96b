"""Builds the extension lepton_fast._C with torch.utils.cpp_extension.

CPU sources always; CUDA sources when nvcc and a CUDA build of torch are present.
Switches (environment):
  LEPTON_FAST_SKIP_EXT=1    no extension: the package runs on reference.py (and Triton)
  LEPTON_FAST_SKIP_CUDA=1   CPU sources only
  LEPTON_FAST_FORCE_CUDA=1  CUDA sources even without a visible GPU (the usual case on a build box)
  TORCH_CUDA_ARCH_LIST      default "8.0;9.0+PTX"
  MAX_JOBS                  parallel compile jobs (ninja)
The build facts (torch, CUDA, archs, C++ ABI) are written to lepton_fast/_build_info.py,
so that an import under another torch falls back instead of crashing.
"""
import glob
import os
import pprint

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0+PTX"


def flag(name):
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def base_version():
    scope = {}
    with open(os.path.join(HERE, "lepton_fast", "version.py")) as f:
        exec(f.read(), scope)
    return scope["__version__"]


def extension_and_build_info():
    if flag("LEPTON_FAST_SKIP_EXT"):
        return [], {}, {"extension": False}
    import torch
    from torch.utils import cpp_extension as ce

    cuda_requested = flag("LEPTON_FAST_FORCE_CUDA") or torch.cuda.is_available()
    cuda_possible = torch.version.cuda is not None and ce.CUDA_HOME is not None
    with_cuda = not flag("LEPTON_FAST_SKIP_CUDA") and cuda_possible and (
        cuda_requested or os.path.exists(os.path.join(ce.CUDA_HOME, "bin", "nvcc"))
    )
    if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS

    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-fvisibility=hidden"]
    macros = [("LEPTON_FAST_WITH_CUDA", "1" if with_cuda else "0")]
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        nvcc = ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"]
        ext = ce.CUDAExtension(
            "lepton_fast._C", sources, define_macros=macros,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        )
    else:
        ext = ce.CppExtension(
            "lepton_fast._C", sources, define_macros=macros, extra_compile_args={"cxx": cxx}
        )
    info = {
        "extension": True,
        "torch": torch.__version__.split("+")[0],
        "cuda": torch.version.cuda if with_cuda else None,
        "archs": os.environ.get("TORCH_CUDA_ARCH_LIST") if with_cuda else None,
        "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI),
    }
    cmd = {"build_ext": ce.BuildExtension.with_options(use_ninja=True)}
    return [ext], cmd, info


def local_version(info):
    """PEP 440 local label naming the build: +cu130torch2.14 or +cputorch2.14."""
    if not info.get("extension"):
        return ""
    major_minor = ".".join(info["torch"].split(".")[:2])
    accel = "cu" + info["cuda"].replace(".", "") if info["cuda"] else "cpu"
    return f"+{accel}torch{major_minor}"


ext_modules, cmdclass, build_info = extension_and_build_info()
with open(os.path.join(HERE, "lepton_fast", "_build_info.py"), "w") as f:
    f.write('"""Written by setup.py at build time: what lepton_fast._C was compiled against."""\n')
    f.write("BUILD_INFO = " + pprint.pformat(build_info) + "\n")

setup(
    version=base_version() + local_version(build_info),
    packages=find_packages(include=["lepton_fast", "lepton_fast.*"]) + ["lepton_fast.kernels"],
    package_dir={"lepton_fast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
