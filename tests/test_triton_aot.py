"""Every Triton kernel compiles ahead of time for sm_90 and sm_80: no GPU needed.

Triton's interpreter (what the other tests run here) executes kernels as Python and never
sees what Triton's compiler rejects: a dtype it cannot lower, a constexpr branch that does
not type-check, an op without a GPU implementation. So every module in ``kernels/`` lists,
in ``compile_targets()``, each variant its launcher can pick: ``(kernel, signature,
constexprs, options)`` with the signature Triton would derive from the launch arguments
(``*bf16``, ``i32``, ``fp32`` for a Python float, ``constexpr`` for a ``None``).
This test compiles them with ``triton.compile`` for Hopper (sm_90) and Ampere (sm_80),
down to PTX and cubin (Triton's own ptxas), each with and without 16-byte divisibility of
the pointers and integers (the vectorised path a GPU launch takes for aligned tensors, and
the scalar one).

Which variants. A module lists hundreds (every dtype x every switch x every column block);
compiling all of them takes an hour on two cores. By default the test compiles a set that
covers every pair of values of any two dimensions with at most 4 values (dtype, each
switch, arch, alignment: each switch's values in every dtype, on both archs, aligned or
not) and every value of the wider ones (the column block): about 50 compiles in all. ``LEPTON_FAST_AOT=all`` compiles
every variant on both archs, both alignments. ``LEPTON_FAST_AOT_JOBS`` sets the number of
compile processes (default: the number of CPUs, at most 4).

The compiles run in a process of their own, without TRITON_INTERPRET (under it ``@triton.jit``
makes interpreted functions, which cannot be compiled), which is also how to run them alone:
``python tests/test_triton_aot.py --report out.json``.
"""
from __future__ import annotations

import collections
import heapq
import importlib
import itertools
import json
import os
import pkgutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ARCHS = (90, 80)
PAIRWISE_MAX_VALUES = 4  # dimensions with more values (the column block) are covered value by value
TIMEOUT_S = 1200


def kernel_modules() -> list[str]:
    """The modules of lepton_fast.kernels, the installed name of the top-level kernels/."""
    import lepton_fast.kernels as package

    return sorted(m.name for m in pkgutil.iter_modules(package.__path__) if not m.name.startswith("_"))


# --- the compile process ------------------------------------------------------------------

def _check_target(module: str, fn, signature: dict, constexprs: dict) -> None:
    where = f"kernels/{module}.py compile_targets(), {fn.__name__}"
    params = list(fn.arg_names)
    if list(signature) != params:
        missing = [p for p in params if p not in signature]
        unknown = [p for p in signature if p not in params]
        raise AssertionError(f"{where}: the signature does not list the kernel's parameters in order "
                             f"(missing {missing}, unknown {unknown}): update compile_targets() with the kernel")
    const_params = {p.name for p in fn.params if p.is_constexpr}
    declared = {name for name, ty in signature.items() if ty == "constexpr"}
    if not const_params <= declared or set(constexprs) != declared:
        raise AssertionError(f"{where}: constexpr parameters {sorted(const_params)}, signature marks "
                             f"{sorted(declared)} as constexpr, values given for {sorted(constexprs)}")


def _features(signature, constexprs, options, arch, aligned) -> frozenset:
    values = {"arch": arch, "aligned": aligned, **{f"opt:{k}": v for k, v in options.items()}}
    values.update({f"arg:{name}": ty for name, ty in signature.items() if ty != "constexpr"})
    values.update({f"const:{name}": repr(v) for name, v in constexprs.items()})
    return frozenset(values.items())


def select(candidates: list[dict], exhaustive: bool) -> list[dict]:
    """A deterministic greedy covering set of ``candidates`` (one kernel's): every pair of
    values of two narrow dimensions (at most PAIRWISE_MAX_VALUES values each) and every value
    of a wide one that occurs among the candidates occurs among the chosen."""
    if exhaustive:
        return candidates
    domains: dict[str, set] = {}
    for c in candidates:
        for name, value in c["features"]:
            domains.setdefault(name, set()).add(value)
    present = collections.Counter(name for c in candidates for name, _ in c["features"])
    # A feature only some candidates have (the one-class variant's constant C) varies too.
    varying = {name for name, values in domains.items() if len(values) > 1 or present[name] < len(candidates)}
    narrow = {name for name in varying if len(domains[name]) <= PAIRWISE_MAX_VALUES}

    def goals(c):
        feats = sorted((f for f in c["features"] if f[0] in varying), key=repr)
        singles = {(f,) for f in feats}
        pairs = {(a, b) for a, b in itertools.combinations(feats, 2) if a[0] in narrow and b[0] in narrow}
        return singles | pairs

    need = [goals(c) for c in candidates]
    uncovered = set().union(*need) if need else set()
    # Lazy greedy: a candidate's gain only shrinks, so a stale gain is an upper bound.
    heap = [(-len(n), i) for i, n in enumerate(need)]
    heapq.heapify(heap)
    chosen = []
    while uncovered:
        _, i = heapq.heappop(heap)
        gain = len(need[i] & uncovered)
        if heap and gain < -heap[0][0]:
            heapq.heappush(heap, (-gain, i))
            continue
        chosen.append(candidates[i])
        uncovered -= need[i]
    return chosen


def _compile_one(job: dict) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module = importlib.import_module(f"lepton_fast.kernels.{job['module']}")
    fn, signature, constexprs, options = module.compile_targets()[job["index"]]
    attrs = {}
    if job["aligned"]:
        # What Triton's launcher sets for a pointer, or an integer, divisible by 16.
        attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
                 if signature[name].startswith("*") or signature[name] in ("i32", "i64")}
    start = time.perf_counter()
    try:
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs),
                                  target=GPUTarget("cuda", job["arch"], 32), options=dict(options))
        asm = compiled.asm
        ok = ".entry" in asm["ptx"] and len(asm["cubin"]) > 0
        error = None if ok else "no kernel entry in the PTX, or an empty cubin"
    except Exception as e:  # reported per variant, with what was compiled
        ok, error = False, f"{type(e).__name__}: {e}"[-3000:]
    return {**job, "ok": ok, "error": error, "seconds": round(time.perf_counter() - start, 2)}


def compile_all(exhaustive: bool, jobs: int) -> dict:
    import triton

    report = {"triton": triton.__version__, "modules": {}, "results": []}
    work = []
    for module_name in kernel_modules():
        entry = report["modules"][module_name] = {"error": None, "targets": 0, "selected": 0}
        try:
            module = importlib.import_module(f"lepton_fast.kernels.{module_name}")
            if not hasattr(module, "compile_targets"):
                raise AssertionError(f"kernels/{module_name}.py has no compile_targets(): add one listing every "
                                     "variant its launcher can pick (see tests/test_triton_aot.py)")
            targets = module.compile_targets()
            if not targets:
                raise AssertionError(f"kernels/{module_name}.py compile_targets() is empty")
            by_kernel: dict[str, list[dict]] = {}
            for index, (fn, signature, constexprs, options) in enumerate(targets):
                _check_target(module_name, fn, signature, constexprs)
                for arch, aligned in itertools.product(ARCHS, (True, False)):
                    by_kernel.setdefault(fn.__name__, []).append({
                        "module": module_name, "kernel": fn.__name__, "index": index, "arch": arch,
                        "aligned": aligned, "constexprs": {k: repr(v) for k, v in constexprs.items()},
                        "features": _features(signature, constexprs, options, arch, aligned),
                    })
        except Exception as e:
            entry["error"] = f"{type(e).__name__}: {e}"
            continue
        entry["targets"] = len(targets)
        entry["values"] = {}
        for _, _, constexprs, _ in targets:
            for name, value in constexprs.items():
                entry["values"].setdefault(name, set()).add(repr(value))
        entry["values"] = {name: sorted(values) for name, values in entry["values"].items()}
        for candidates in by_kernel.values():
            chosen = select(candidates, exhaustive)
            entry["selected"] += len(chosen)
            work += [{k: v for k, v in c.items() if k != "features"} for c in chosen]
    start = time.perf_counter()
    if jobs > 1 and len(work) > 1:
        import multiprocessing

        # fork: the workers inherit the imported triton and kernels instead of importing again
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            report["results"] = pool.map(_compile_one, work, chunksize=1)
    else:
        report["results"] = [_compile_one(job) for job in work]
    report["seconds"] = round(time.perf_counter() - start, 1)
    return report


# --- the tests ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def aot_report(tmp_path_factory):
    path = tmp_path_factory.mktemp("aot") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--report", str(path)], env=env, capture_output=True,
                          text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0 and path.exists(), (
        f"the compile process failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    report = json.loads(path.read_text())
    report["wall_seconds"] = round(time.perf_counter() - start, 1)
    return report


@pytest.mark.parametrize("module", kernel_modules())
def test_kernels_compile_for_sm90_and_sm80(aot_report, module):
    entry = aot_report["modules"][module]
    assert entry["error"] is None, entry["error"]
    results = [r for r in aot_report["results"] if r["module"] == module]
    failed = [r for r in results if not r["ok"]]
    assert not failed, (f"{len(failed)} of {len(results)} variants of kernels/{module}.py fail to compile with "
                        f"Triton {aot_report['triton']}:\n" + "\n".join(
                            f"- {r['kernel']} sm_{r['arch']} aligned={r['aligned']} {r['constexprs']}:\n  {r['error']}"
                            for r in failed[:5]))
    # Every kernel of the module, on both archs, with every value of every constexpr switch.
    for kernel in {r["kernel"] for r in results}:
        mine = [r for r in results if r["kernel"] == kernel]
        assert {r["arch"] for r in mine} == set(ARCHS), kernel
    for name, values in entry["values"].items():
        compiled = {r["constexprs"][name] for r in results if name in r["constexprs"]}
        assert compiled == set(values), (name, sorted(compiled), values)
    print(f"kernels/{module}.py: {len(results)} variants compiled (of {entry['targets']} targets x "
          f"{len(ARCHS)} archs x 2 alignments), Triton {aot_report['triton']}, "
          f"{sum(r['seconds'] for r in results):.0f} s of compile time")


def test_selection_covers_every_pair():
    """The covering set is what the docstring says, on a toy list of candidates."""
    candidates = []
    for i, (a, b, c, block) in enumerate(itertools.product((0, 1), (0, 1, 2), (False, True), range(6))):
        candidates.append({"i": i, "features": frozenset({("a", a), ("b", b), ("c", c), ("block", block)})})
    chosen = select(candidates, exhaustive=False)
    feats = [dict(c["features"]) for c in chosen]
    for x, y in (("a", "b"), ("a", "c"), ("b", "c")):
        assert {(f[x], f[y]) for f in feats} == {(u, v) for f in map(lambda c: dict(c["features"]), candidates)
                                                  for u, v in [(f[x], f[y])]}
    assert {f["block"] for f in feats} == set(range(6))
    assert len(chosen) < len(candidates) // 4
    assert select(candidates, exhaustive=True) == candidates


if __name__ == "__main__" and sys.argv[1:2] == ["--report"]:
    assert os.environ.get("TRITON_INTERPRET") != "1", "unset TRITON_INTERPRET: interpreted kernels cannot be compiled"
    _jobs = int(os.environ.get("LEPTON_FAST_AOT_JOBS", min(4, os.cpu_count() or 1)))
    _report = compile_all(exhaustive=os.environ.get("LEPTON_FAST_AOT") == "all", jobs=_jobs)
    Path(sys.argv[2]).write_text(json.dumps(_report, indent=1))
    _ok = sum(r["ok"] for r in _report["results"])
    print(f"Triton {_report['triton']}: {_ok} of {len(_report['results'])} variants compiled in {_report['seconds']} s "
          f"({_jobs} processes)")
