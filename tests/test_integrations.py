"""lepton_fast.integrations without the packages they integrate with (tests/test_trl.py
covers the TRL layer with trl installed)."""
import sys

import pytest

from lepton_fast.integrations import trl as lf_trl


def test_trl_patch_without_trl_names_the_extra(monkeypatch):
    for name in [m for m in sys.modules if m == "trl" or m.startswith("trl.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "trl", None)  # import trl -> ModuleNotFoundError(name="trl")
    with pytest.raises(ImportError, match=r'needs trl 1\.16 .*pip install "lepton_fast\[trl\]"'):
        lf_trl.patch()
