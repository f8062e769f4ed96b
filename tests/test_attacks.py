"""fgsm, pgd and vat_loss: attacks built on the fused steps that leave the model as found."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lepton_fast


def cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.0),
        nn.Flatten(), nn.Linear(4 * 6 * 6, 5), nn.BatchNorm1d(5),
    )


def images(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 6, 6, generator=g), torch.randint(0, 5, (n,), generator=g)


def snapshot(model):
    return {
        "modes": [m.training for m in model.modules()],
        "buffers": {k: v.clone() for k, v in model.named_buffers()},
        "grads": {k: (p.grad, p.grad.clone()) for k, p in model.named_parameters()},
    }


def assert_untouched(model, before):
    assert [m.training for m in model.modules()] == before["modes"]
    for k, v in model.named_buffers():
        assert torch.equal(v, before["buffers"][k]), k
    for k, p in model.named_parameters():
        obj, value = before["grads"][k]
        assert p.grad is obj and torch.equal(p.grad, value), k


def with_grads(model):
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.125)  # accumulated gradients an attack must not touch
    return model


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("attack", ["fgsm", "pgd", "vat"])
def test_model_left_as_found(mode, attack):
    model = with_grads(cnn())
    model.train(mode == "train")
    model[3].eval()  # a mixed state must survive too
    x, y = images()
    before = snapshot(model)
    if attack == "fgsm":
        lepton_fast.fgsm(model, x, y, 8 / 255)
    elif attack == "pgd":
        lepton_fast.pgd(model, x, y, 8 / 255, 2 / 255, steps=3)
    else:
        lepton_fast.vat_loss(model, x, eps=0.5)
    assert_untouched(model, before)


def input_grad(model, x, y, loss_fn=F.cross_entropy):
    x = x.clone().requires_grad_(True)
    loss_fn(model(x), y).backward()
    return x.grad


def test_fgsm_is_the_step_on_the_input_gradient():
    model = cnn().eval()
    x, y = images()
    expected = (x + 0.03 * input_grad(model, x, y).sign()).clamp(0, 1)
    out = lepton_fast.fgsm(model, x, y, 0.03)
    assert torch.equal(out, expected) and not out.requires_grad
    # pseudo-labels of an unlabeled batch and a custom loss (targeted: descend instead)
    pseudo = model(x).argmax(1)
    targeted = lepton_fast.fgsm(model, x, pseudo, 0.03, lambda o, t: -F.cross_entropy(o, t))
    assert torch.equal(targeted, (x - 0.03 * input_grad(model, x, pseudo).sign()).clamp(0, 1))


@pytest.mark.parametrize("random_start", [True, False])
def test_pgd_matches_the_torchattacks_loop(random_start):
    model = cnn().eval()
    x, y = images()
    eps, alpha, steps = 8 / 255, 2 / 255, 4
    out = lepton_fast.pgd(model, x, y, eps, alpha, steps, random_start,
                          generator=torch.Generator().manual_seed(3))
    adv = x.clone()
    if random_start:
        noise = torch.empty_like(x).uniform_(-1, 1, generator=torch.Generator().manual_seed(3))
        adv = torch.clamp(x + torch.clamp(adv + noise * eps - x, -eps, eps), 0, 1)
    for _ in range(steps):
        adv = adv + alpha * input_grad(model, adv, y).sign()
        adv = torch.clamp(x + torch.clamp(adv - x, -eps, eps), 0, 1)
    assert torch.equal(out, adv)
    assert (out - x).abs().max() <= eps + 2 ** -24 and out.min() >= 0 and out.max() <= 1


def test_pgd_per_sample_eps_and_no_steps():
    model = cnn().eval()
    x, y = images()
    eps = torch.linspace(0, 0.1, 6)
    out = lepton_fast.pgd(model, x, y, eps, eps / 4, steps=5)
    assert ((out - x).abs().amax(dim=(1, 2, 3)) <= eps + 2 ** -24).all()
    assert torch.equal(out[0], x[0])  # eps = 0 for the first sample
    assert torch.equal(lepton_fast.pgd(model, x, y, 0.1, 0.01, steps=0, random_start=False), x)


def test_pgd_raises_the_loss():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 6 * 6, 5)).eval()
    x, y = images(32)
    clean = F.cross_entropy(model(x), y)
    adv = F.cross_entropy(model(lepton_fast.pgd(model, x, y, 0.1, 0.025, steps=8)), y)
    assert adv > clean


def reference_vat(model, x, xi, eps, iterations, d):
    """Miyato et al.'s algorithm written out plainly, from a given initial direction."""
    with torch.no_grad():
        p = F.softmax(model(x), dim=1)

    def unit(v):
        v = v / (v.abs().amax(dim=tuple(range(1, v.dim())), keepdim=True) + 1e-12)
        return v / torch.sqrt(1e-6 + (v * v).sum(dim=tuple(range(1, v.dim())), keepdim=True))

    def kl(logits):
        return F.kl_div(F.log_softmax(logits, dim=1), p, reduction="batchmean")

    d = unit(d)
    for _ in range(iterations):
        d.requires_grad_(True)
        (g,) = torch.autograd.grad(kl(model(x + xi * d)), d)
        d = unit(g)
    return kl(model(x + eps * d))


@pytest.mark.parametrize("kind", ["features", "images"])
@pytest.mark.parametrize("iterations", [1, 2])
def test_vat_loss_matches_the_algorithm(kind, iterations):
    torch.manual_seed(0)
    if kind == "features":
        model = nn.Sequential(nn.Linear(7, 16), nn.Tanh(), nn.Linear(16, 4)).double()
        x = torch.randn(9, 7, dtype=torch.float64)
    else:
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5)).double()
        x = torch.rand(4, 3, 6, 6, dtype=torch.float64)
    loss = lepton_fast.vat_loss(model, x, xi=1e-6, eps=0.8, power_iterations=iterations,
                                generator=torch.Generator().manual_seed(5))
    d0 = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(5))
    expected = reference_vat(model, x, 1e-6, 0.8, iterations, d0)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-12)
    assert loss > 0
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_vat_loss_in_float32_under_autocast():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(9, 7)
    plain = lepton_fast.vat_loss(model, x, eps=1.0, generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = lepton_fast.vat_loss(model, x, eps=1.0, generator=torch.Generator().manual_seed(1))
    assert auto.dtype == torch.float32
    assert torch.equal(auto, plain)
    assert torch.equal(lepton_fast.vat_loss(model, x.bfloat16(), eps=1.0, generator=torch.Generator().manual_seed(1)),
                       lepton_fast.vat_loss(model, x.bfloat16().float(), eps=1.0,
                                            generator=torch.Generator().manual_seed(1)))


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda m, x, y: lepton_fast.fgsm(m, x, y, -0.1), ValueError, "eps"),
        (lambda m, x, y: lepton_fast.fgsm(m, x.long(), y, 0.1), TypeError, "x"),
        (lambda m, x, y: lepton_fast.fgsm(m, x, y, 0.1, clamp=(1, 0)), ValueError, "clamp"),
        (lambda m, x, y: lepton_fast.pgd(m, x, y, 0.1, -0.01, 3), ValueError, "step_size"),
        (lambda m, x, y: lepton_fast.pgd(m, x, y, 0.1, 0.01, -1), ValueError, "steps"),
        (lambda m, x, y: lepton_fast.vat_loss(m, x, xi=0.0), ValueError, "xi"),
        (lambda m, x, y: lepton_fast.vat_loss(m, x, eps=-1.0), ValueError, "eps"),
        (lambda m, x, y: lepton_fast.vat_loss(m, x, power_iterations=0), ValueError, "power_iterations"),
        (lambda m, x, y: lepton_fast.vat_loss(m, x[0, 0, 0]), ValueError, "x"),
    ],
)
def test_bad_arguments(call, error, match):
    model = cnn().eval()
    x, y = images()
    with pytest.raises(error, match=match):
        call(model, x, y)


def test_vat_loss_of_an_empty_batch_is_zero():
    model = cnn()
    loss = lepton_fast.vat_loss(model, torch.rand(0, 3, 6, 6))
    assert loss.item() == 0.0
    loss.backward()  # a graph to the parameters, all gradients 0
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())
