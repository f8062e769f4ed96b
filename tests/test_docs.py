"""The public docstrings, as help() renders them: the shared pieces spliced in whole, in
their place, and nothing of the templating left."""
import inspect
import re

import pytest

import lepton_fast
from lepton_fast import adversarial, reference

PUBLIC = sorted({(name, fn) for module in (lepton_fast, reference, adversarial)
                 for name, fn in vars(module).items()
                 if not name.startswith("_") and inspect.isfunction(fn) and fn.__module__.startswith("lepton_fast")},
                key=lambda item: (item[1].__module__, item[0]))


@pytest.mark.parametrize("name, fn", PUBLIC, ids=[f"{fn.__module__}.{name}" for name, fn in PUBLIC])
def test_no_template_left(name, fn):
    doc = inspect.getdoc(fn) or ""
    assert not re.search(r"^\s*(KD_KEYWORDS|CLAMP)\s*$", doc, re.M), doc
    assert not re.search(r"(?<![\w^}])\{\w+\}", doc), doc  # a str.format field, not LaTeX's \mathrm{x}, r_{x}


@pytest.mark.parametrize("fn", [lepton_fast.fgsm_perturb, lepton_fast.pgd_step, lepton_fast.fgsm, lepton_fast.pgd])
def test_clamp_argument_is_spliced_once_and_the_formula_kept(fn):
    doc = fn.__doc__
    assert len(re.findall(r"^\s*clamp: ``\(min, max\)``", doc, re.M)) == 1
    # the argument's text stays under Args, indented as its neighbours
    assert re.search(r"\n        clamp: .*\n            \S", doc)


def test_latex_formulas_intact():
    assert (r":math:`\mathrm{clamp}(x + \epsilon\,\mathrm{sign}(\nabla), lo, hi)` in one pass"
            in lepton_fast.fgsm_perturb.__doc__)
    assert (r"\mathrm{clamp}(x_{orig} + \mathrm{clamp}(x' - x_{orig}, -\epsilon, \epsilon), lo, hi)"
            in lepton_fast.pgd_step.__doc__)


@pytest.mark.parametrize("fn", [lepton_fast.fused_linear_kd_loss, lepton_fast.fused_linear_sparse_kd_loss])
def test_fused_linear_labels_note_is_under_labels(fn):
    args = re.split(r"\n        (?=\w[\w, ]*: )", fn.__doc__)  # one entry per argument
    labels = " ".join(next(entry for entry in args if entry.startswith("labels:")).split())
    assert "Here labels are [...] class ids" in labels
    assert "cost nothing on the CPU" in labels
    count = next(entry for entry in args if entry.startswith("num_items_in_batch:"))
    assert "Here labels" not in count
