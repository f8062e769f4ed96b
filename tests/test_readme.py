"""Every ```python block of README.md runs as written, and its demo tables are what the runs
kept in benchmarks/demo/ gave (scripts/readme_tables.py writes them).

Blocks run in order, each in a fresh namespace, in a temporary working folder. A block may
be left out only by an HTML comment on the line just before it that says why:
``<!-- readme-test: skip (needs a GPU) -->``. A block that imports an optional extra's
package skips where that extra is not installed, as tests/test_trl.py does (CI's
pure-Python job installs only the [dev] extra; `make test` installs [trl] and runs them).
"""
import ast
import json
import re
import sys
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
SKIP = re.compile(r"<!--\s*readme-test:\s*skip\s*\((?P<reason>[^)]+)\)\s*-->")


def python_blocks(text: str):
    """[(heading, line number, code, skip reason or None)] of the ```python blocks."""
    blocks, heading, lines = [], "top", text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        if line.strip() == "```python":
            start, body = i + 1, []
            i += 1
            while lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            previous = next((lines[j] for j in range(start - 2, -1, -1) if lines[j].strip()), "")
            match = SKIP.search(previous)
            blocks.append((heading, start + 1, "\n".join(body) + "\n", match and match["reason"].strip()))
        i += 1
    return blocks


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))
# What a README block may import that needs an optional extra (pyproject.toml): the module
# (or a package above it) → (the package it needs, the extra that installs it).
NEEDS_EXTRA = {"trl": ("trl", "trl"), "transformers": ("transformers", "trl"),
               "lepton_fast.integrations.trl": ("trl", "trl")}


def needed_extras(code: str) -> set[tuple[str, str]]:
    """(package, extra) of each NEEDS_EXTRA module that ``code`` imports."""
    modules = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module)
    return {need for module in modules for prefix, need in NEEDS_EXTRA.items()
            if module == prefix or module.startswith(prefix + ".")}


def test_the_extraction_finds_blocks_and_skip_reasons():
    text = "# A\n```python\nx = 1\n```\n<!-- readme-test: skip (needs a GPU) -->\n```python\ny = 2\n```\n"
    assert python_blocks(text) == [("A", 3, "x = 1\n", None), ("A", 7, "y = 2\n", "needs a GPU")]
    assert len(BLOCKS) >= 4
    assert needed_extras("import transformers\nfrom trl.x import y\nfrom . import z\nimport torch") == {
        ("transformers", "trl"), ("trl", "trl")}
    assert needed_extras("import lepton_fast.integrations.trl\nimport lepton_fast") == {("trl", "trl")}


@pytest.mark.parametrize("heading,line,code,skip", BLOCKS, ids=[f"line{b[1]}-{b[0][:30]}" for b in BLOCKS])
def test_readme_block_runs(heading, line, code, skip, tmp_path, monkeypatch):
    if skip:
        pytest.skip(skip)
    for package, extra in sorted(needed_extras(code)):
        pytest.importorskip(package, reason=f"the [{extra}] extra is not installed")
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__readme__"}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a LeNet on 64 images gains little from more; a shared CI machine loses
    try:
        exec(compile(code, f"README.md:{line}", "exec"), namespace)
    finally:
        torch.set_num_threads(threads)
    if heading.startswith("Main job"):  # the main job's snippet adapts: the student beats its teacher
        teacher = namespace["source_only"].evaluate(namespace["target"].test)["accuracy"]
        assert namespace["trainer"].history["validation"][-1]["accuracy"] > teacher + 0.05


# The demo tables: the runs behind them are kept as `lepton-fast demo --json` wrote them.
ROOT = README.parent
sys.path.insert(0, str(ROOT / "scripts"))
import readme_tables  # noqa: E402

DEMO_RUNS = sorted((ROOT / "benchmarks" / "demo").glob("*.json"))


def test_every_demo_task_has_its_run_kept():
    assert {p.stem for p in DEMO_RUNS} == {"digits", "sentiment", "speech"}


@pytest.mark.parametrize("path", DEMO_RUNS, ids=[p.stem for p in DEMO_RUNS])
def test_readme_demo_table_is_what_its_run_gave(path):
    run = json.loads(path.read_text(encoding="utf-8"))
    text = README.read_text(encoding="utf-8")
    assert readme_tables.rewrite(text, run) == text, f"python scripts/readme_tables.py {path.relative_to(ROOT)}"
    assert len(run["seeds"]) == 3


def test_readme_tables_rewrite_only_their_block():
    run = {"task": "t", "table": {name: {m: {"mean": 0.5 + i / 100, "std": 0.01} for m in
                                         ("accuracy", "macro_recall", "macro_f1", "seconds")}
                                  for i, name in enumerate(["teacher", "bound", "a", "b"])}}
    text = "before\n<!-- demo-table:t -->\nold\n<!-- /demo-table:t -->\nafter\n"
    new = readme_tables.rewrite(text, run)
    assert new.startswith("before\n<!-- demo-table:t -->\n| row |") and new.endswith("<!-- /demo-table:t -->\nafter\n")
    assert "| b | **53.00 ± 1.00** |" in new and "**" not in new.split("| b |")[0]
    with pytest.raises(ValueError, match="demo-table:other"):
        readme_tables.rewrite(text, {**run, "task": "other"})
    with pytest.raises(ValueError, match="--quick"):  # a smoke run's figures never reach the README
        readme_tables.rewrite(text, {**run, "quick": True})


def readme_calls(text: str):
    """[(code, function, call)]: each inline ```name(args)``` of the prose whose name is a
    lepton_fast function or method (``...`` stands for the arguments left out)."""
    import lepton_fast.distributed
    import lepton_fast.trainers
    modules = (lepton_fast, lepton_fast.trainers, lepton_fast.distributed)
    found = []
    for match in re.finditer(r"(?<!`)`([A-Za-z_][\w.]*\([^`]*\))`(?!`)", text):
        code = " ".join(match[1].split())
        try:
            call = ast.parse(code, mode="eval").body
        except SyntaxError:
            continue
        while isinstance(call.func, ast.Attribute) and isinstance(call.func.value, ast.Call):
            call = call.func.value  # KnowledgeDistiller(...).fit(...): its first call
        first, *rest = ast.unparse(call.func).split(".")
        fn = next((vars(m)[first] for m in modules if first in vars(m)), None)
        for part in rest:
            fn = getattr(fn, part, None)
        if callable(fn) and (getattr(fn, "__module__", "") or "").startswith("lepton_fast"):
            found.append((code, fn, call))
    return found


CALLS = readme_calls(README.read_text(encoding="utf-8"))


def test_the_inline_calls_are_found():
    assert {"fused_linear_sparse_kd_loss", "vocab_parallel_sparse_kd_loss", "KnowledgeDistiller"} <= {
        fn.__name__ for _, fn, _ in CALLS}
    [(_, fn, call)] = readme_calls("pass `sparse_kd_loss(s, idx, lp,\nmask=m)` here")
    with pytest.raises(TypeError, match="mask"):
        test_readme_inline_call_binds_to_the_signature("", fn, call)


@pytest.mark.parametrize("code, fn, call", CALLS, ids=[code for code, _, _ in CALLS])
def test_readme_inline_call_binds_to_the_signature(code, fn, call):
    """The README's inline calls use the real keyword names and no more positional arguments
    than the signature takes (``mask=`` for ``teacher_mask=`` would raise a TypeError)."""
    import inspect
    positional = [a for a in call.args if not (isinstance(a, ast.Constant) and a.value is Ellipsis)]
    keywords = {k.arg: None for k in call.keywords if k.arg is not None}
    target = fn.__init__ if inspect.isclass(fn) else fn
    signature = inspect.signature(target)
    if inspect.isclass(fn) or "self" in signature.parameters:
        signature = signature.replace(parameters=list(signature.parameters.values())[1:])
    signature.bind_partial(*positional, **keywords)


def _defaults():
    import lepton_fast as lf
    from lepton_fast.trainers import CrossDomainTrainer, KnowledgeDistiller
    return [  # (what the README says, the function, its parameter, the default that says)
        (r"the KD temperature defaults to 1\.0, as in `fused_kd_loss` and `KDLoss`",
         [KnowledgeDistiller, CrossDomainTrainer, lf.fused_kd_loss, lf.KDLoss], "temperature", 1.0),
        (r"`KnowledgeDistiller`'s `alpha` to 0\.5 \(theirs to 0", [KnowledgeDistiller], "alpha", 0.5),
        (r"`KnowledgeDistiller`'s `alpha` to 0\.5 \(theirs to 0", [lf.fused_kd_loss], "alpha", 0.0),  # KDLoss forwards it
        (r"within `clamp=` \(default `None`, no bounds, unlike `fgsm`/`pgd`", [CrossDomainTrainer], "clamp", None),
        (r"`clamp=\(0, 1\)` is the default of these and of `fgsm` and `pgd`",
         [lf.fgsm_perturb, lf.pgd_step, lf.fgsm_perturb_, lf.pgd_step_, lf.fgsm, lf.pgd], "clamp", (0.0, 1.0)),
        (r"`vat_loss`'s is `None`", [lf.vat_loss], "clamp", None),
    ]


@pytest.mark.parametrize("case", range(6))
def test_readme_defaults_are_the_signatures(case):
    import inspect
    said, functions, name, default = _defaults()[case]
    assert re.search(said, " ".join(README.read_text(encoding="utf-8").split()))
    for fn in functions:
        assert inspect.signature(fn).parameters[name].default == default, (fn, name)
