#!/usr/bin/env bash
# Builds into dist/ (or $DIST) the sdist and the wheels this machine can build:
#   lepton_fast-X.Y.Z.tar.gz                               sources; no local label
#   lepton_fast-X.Y.Z+cu130torch2.14-cp311-cp311-*.whl     torch 2.14.1, CUDA 13.0 (needs nvcc)
#   lepton_fast-X.Y.Z+cputorch2.13-cp311-cp311-*.whl       torch 2.13.0, CPU build
#   lepton_fast-X.Y.Z-py3-none-any.whl                     pure Python (LEPTON_FAST_SKIP_EXT=1): the
#                                                          Triton kernels and the reference, any torch >= 2.11
# Each wheel is built from the sdist, as a user building from source would, so no build
# junk from the work tree can get in and the sdist is known to build. Each builds in a
# virtual environment that holds only its torch and the build tools, so the facts setup.py
# records (torch, CUDA, archs, C++ ABI) are that torch's.
#
# Usage: scripts/build_wheels.sh [cuda|cpu|pure]...   (default: all three)
# Environment: DIST (output folder, default dist), PYTHON (default python3), WHEEL_VENVS
# (where the build venvs live, kept between runs because a CUDA torch takes minutes to
# install; default build/wheel-venvs), TORCH_CUDA_ARCH_LIST (default 8.0;9.0+PTX),
# MAX_JOBS (default 1).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DIST=${DIST:-dist}
WHEEL_VENVS=${WHEEL_VENVS:-build/wheel-venvs}
export MAX_JOBS=${MAX_JOBS:-1}
variants=("$@")
[ ${#variants[@]} -gt 0 ] || variants=(cuda cpu pure)

# venv NAME TORCH_REQUIREMENT: prints the path of a python whose torch meets the requirement.
venv() {
    local dir="$WHEEL_VENVS/$1"
    [ -x "$dir/bin/python" ] || "$PYTHON" -m venv "$dir" >&2
    "$dir/bin/python" -m pip install -q "$2" numpy "setuptools>=77" wheel ninja build >&2
    echo "$dir/bin/python"
}

# build_wheel PYTHON ENV...: one wheel from the sdist into $DIST, under the given switches.
build_wheel() {
    local py=$1; shift
    local work; work=$(mktemp -d)
    tar -xzf "$sdist" -C "$work"
    env "$@" LEPTON_FAST_LOCAL_VERSION=1 \
        "$py" -m build --wheel --no-isolation --outdir "$DIST" "$work"/lepton_fast-*/
    rm -rf "$work"
}

mkdir -p "$DIST"
version=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' lepton_fast/version.py)
sdist=$DIST/lepton_fast-$version.tar.gz
for variant in "${variants[@]}"; do
    case $variant in
        cuda)
            if ! command -v nvcc >/dev/null && [ ! -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]; then
                echo "build_wheels.sh: no nvcc (set CUDA_HOME): skipping the CUDA wheel" >&2
                continue
            fi
            py=$(venv cu130-torch2.14 torch==2.14.1)
            ;;
        cpu)
            # torch's CPU builds carry the local label +cpu; this one lies in /opt/wheels here.
            py=$(venv cpu-torch2.13 torch==2.13.0) ;;
        pure)
            # Nothing compiled, so no torch in the build: only the build tools.
            py=$(venv pure-python build) ;;
        *) echo "build_wheels.sh: unknown variant '$variant' (cuda, cpu or pure)" >&2; exit 2 ;;
    esac
    if [ -z "${sdist_built:-}" ]; then  # once per run, from the work tree as it is now
        rm -rf lepton_fast.egg-info "$sdist"  # sdist reads its file list from egg-info: no stale one
        "$py" -m build --sdist --no-isolation --outdir "$DIST" .
        sdist_built=1
    fi
    case $variant in
        cuda) build_wheel "$py" LEPTON_FAST_FORCE_CUDA=1 ;;
        cpu) build_wheel "$py" LEPTON_FAST_SKIP_CUDA=1 ;;
        pure) build_wheel "$py" LEPTON_FAST_SKIP_EXT=1 ;;
    esac
done
ls -l "$DIST"
