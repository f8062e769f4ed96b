#!/usr/bin/env bash
# CI job on the oldest supported versions, the GPU machines' toolchain: Python 3.12,
# torch 2.11.0 (PyPI's CUDA 13.0 build, with Triton 3.6) and nvcc 13. .ci/run calls it.
#
# 1. A fresh venv with what the README's install line gives (the [dev,examples] extras), plus
#    numpy < 2.4, which Triton 3.6's interpreter needs (README "Supported versions").
# 1b. The whole test suite but the packaging tests (venvs and wheels: minutes; they build the
#    pure-Python wheel themselves) against that pure-Python install (LEPTON_FAST_SKIP_EXT=1,
#    what the py3-none-any wheel holds): CPU tensors through the reference kernels, the Triton
#    kernels in the interpreter, the Python autograd kernels, torch.compile, and the trainers,
#    tasks, CLI and README over them. The C++ cases skip themselves, and so do the README's and
#    test_trl.py's cases of the [trl] extra, which this venv does not install. About 12 min on
#    the shared 2-core machine (loaded).
# 2. benchmarks/gpu_check.py --dry-run, the GPU check as it will run on the GPU machine but
#    without a GPU: its checks, its own offline build (CPU + CUDA, for sm_90), the `cuda`
#    tests collected, every Triton kernel compiled for sm_90 and sm_80, the GPU cases
#    discovered and run on CPU smoke shapes. It fails on whatever would stop the real run.
# 3. A representative part of the tests against that build: the test file of each op kernel
#    family (CPU C++ kernels, Triton kernels in the interpreter, opcheck, torch.compile,
#    autograd; pgd_step stands for the adversarial steps, whose FGSM form shares its kernel),
#    the vocabulary-parallel loss over gloo and DTensor, the build record and every other
#    torch.compile test (fused_linear_kd_loss's, fgsm_perturb's, sparse_kd_loss's, with its
#    opcheck); less the two
#    widest sweeps of the CPU KD kernel (every mode in float32, every CPU instruction set),
#    which the main job runs in full. Not here: the trainers and data (pure Python over the
#    ops), the packaging tests (venvs and wheels: minutes) and the benchmarks' smoke run.
#
# Cost, on this repository's 2-core machine, idle, wheelhouse filled (2026-11-30): install 48 s,
# gpu_check --dry-run 341 s (the CPU + CUDA build 212 s of it), then the tests. A first run also
# downloads ~2.6 GB (about a minute here). .ci/run starts it beside the main job's tests.
#
# It works on a copy of the tree: the main job's editable install writes its build record
# into lepton_fast/, and a build here would overwrite it.
#
# Environment: LEPTON_FAST_OLDEST_PYTHON (a Python 3.12 interpreter; default: python3.12 on
# PATH, else pyenv's), OLDEST_WORK (work folder, default a new temporary one),
# LEPTON_FAST_WHEELHOUSE (downloaded wheels, default ~/.cache/lepton_fast/...), MAX_JOBS.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH=2.11.0

find_python() {
    if [ -n "${LEPTON_FAST_OLDEST_PYTHON:-}" ]; then echo "$LEPTON_FAST_OLDEST_PYTHON"; return; fi
    if command -v python3.12 >/dev/null && python3.12 -c "" 2>/dev/null; then command -v python3.12; return; fi
    local root; root=$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")
    for p in "$root"/versions/3.12*/bin/python3.12; do
        [ -x "$p" ] && { echo "$p"; return; }
    done
    return 1
}
if ! py=$(find_python); then
    echo "ci_oldest.sh: no Python 3.12 interpreter (python3.12 on PATH, or pyenv's): set LEPTON_FAST_OLDEST_PYTHON" >&2
    exit 1
fi

if [ -n "${OLDEST_WORK:-}" ]; then
    work=$OLDEST_WORK
else
    # A temporary tree is 4.6 GB: removed on exit, or CI runs fill a shared disk.
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
fi
wheels=${LEPTON_FAST_WHEELHOUSE:-$HOME/.cache/lepton_fast/wheels-py312-torch$TORCH}
mkdir -p "$wheels"
src=$work/src
mkdir -p "$src"
git ls-files -co --exclude-standard -z | tar --null -T - -cf - | tar -xf - -C "$src"
"$py" -m venv "$work/venv"
# shellcheck disable=SC1091
. "$work/venv/bin/activate"
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
set -x
start=$SECONDS

# --- 1. the oldest versions, installed as the README says -----------------------------
# Downloaded once into a wheelhouse kept between runs (torch 2.11 and its CUDA libraries are
# about 2.5 GB that the local package mirror does not hold for Python 3.12), then installed
# from it with no index, as on the GPU machines, which have no network.
# --no-compile: no .pyc for the ~20,000 modules of torch and its libraries up front (CPU
# time CI does not have); Python compiles the few it imports.
# The README's install line's extras ([dev,examples]) as pyproject.toml lists them.
mapfile -t extras < <(python -c 'import tomllib; e = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]; print("\n".join(e["dev"] + e["examples"]))')
reqs=("torch==$TORCH" ninja "setuptools>=77" "numpy<2.4" "${extras[@]}")
offline=(-q --no-compile --no-index --find-links "$wheels")
if ! pip install "${offline[@]}" "${reqs[@]}" 2>/dev/null; then
    pip download -q -d "$wheels" "${reqs[@]}"
    pip install "${offline[@]}" "${reqs[@]}"
fi
# the package and its dev extra, no compile yet (the GPU check builds it)
LEPTON_FAST_SKIP_EXT=1 pip install "${offline[@]}" --no-build-isolation -e "$src[dev,examples]"
python -c "import sys, torch, triton, numpy, setuptools; print('installed:', sys.version.split()[0], torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__, 'setuptools', setuptools.__version__)"
installed=$SECONDS

# --- 1b. the test suite against the pure-Python install, before anything is compiled ------
cd "$src"
LEPTON_FAST_SKIP_EXT=1 LEPTON_FAST_REQUIRE_TRITON_INTERPRETER=1 python -m pytest -q -p no:cacheprovider \
    -m "not packaging" tests
pure_tested=$SECONDS

# --- 2. the GPU check's dry run: build (CPU + CUDA), collect, compile, cases -------------
# (a long build timeout: a CI machine shared with other work may build slowly)
python benchmarks/gpu_check.py --dry-run --build-timeout 2400 --json "$work/gpu_check.json"
checked=$SECONDS
lepton-fast info

# --- 3. the representative tests, with the interpreter required to run ---------------------
LEPTON_FAST_REQUIRE_TRITON_INTERPRETER=1 python -m pytest -q -p no:cacheprovider -m "not packaging" \
    tests/test_fused_kd_loss.py tests/test_fused_pseudo_label_loss.py tests/test_select_pseudo_labels.py \
    tests/test_pgd_step.py tests/test_grad_reverse.py tests/test_kd_slice_ops.py tests/test_vocab_parallel.py \
    tests/test_packaging.py tests/test_fused_linear_kd_loss.py::test_torch_compile_fullgraph \
    tests/test_fgsm_perturb.py::test_torch_compile_fullgraph_without_recompiles \
    tests/test_sparse_kd_loss.py::test_torch_compile_fullgraph tests/test_sparse_kd_loss.py::test_opcheck \
    --deselect tests/test_fused_kd_loss.py::test_every_mode_float32 \
    --deselect tests/test_fused_kd_loss.py::test_other_cpu_instruction_sets
set +x
echo "ci_oldest.sh: install $((installed - start)) s, pure-Python tests $((pure_tested - installed)) s," \
     "gpu_check --dry-run $((checked - pure_tested)) s," \
     "tests $((SECONDS - checked)) s, total $((SECONDS - start)) s"
