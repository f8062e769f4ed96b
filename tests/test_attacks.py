"""fgsm, pgd and vat_loss: attacks built on the fused steps that leave the model as found, stay
within eps of their input or refuse with the fix, and take any callable model."""
import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lepton_fast
from conftest import require
from lepton_fast.ops.adversarial import FGSM_SPEC, PGD_INPLACE_SPEC

# CIFAR-10's channel statistics: a normalised image lies in [-2.4, 2.8], not [0, 1].
MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(3, 1, 1)
STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(3, 1, 1)
BOX = ((0 - MEAN) / STD, (1 - MEAN) / STD)


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


def run_attack(attack, model, x, y):
    if attack == "fgsm":
        return lepton_fast.fgsm(model, x, y, 8 / 255)
    if attack == "pgd":
        return lepton_fast.pgd(model, x, y, 8 / 255, 2 / 255, steps=3)
    return lepton_fast.vat_loss(model, x, eps=0.5)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("attack", ["fgsm", "pgd", "vat"])
def test_model_left_as_found(mode, attack):
    model = with_grads(cnn())
    model.train(mode == "train")
    model[3].eval()  # a mixed state must survive too
    x, y = images()
    before = snapshot(model)
    run_attack(attack, model, x, y)
    assert_untouched(model, before)


@pytest.mark.parametrize("wrap", ["lambda", "partial", "bound method"])
@pytest.mark.parametrize("attack", ["fgsm", "pgd", "vat"])
def test_any_callable_model(attack, wrap):
    """Issue 15 #7's kind: a lambda or functools.partial failed on `.modules`. BatchNorm is held
    still wherever the module can be found (a partial of it, its bound method)."""
    model = cnn().train()
    x, y = images()
    before = snapshot(with_grads(model))
    wrapped = {
        "lambda": lambda inputs: model(inputs),
        "partial": functools.partial(model),
        "bound method": model.forward,
    }[wrap]
    torch.manual_seed(1)
    got = run_attack(attack, wrapped, x, y)
    if wrap != "lambda":
        assert_untouched(model, before)
        torch.manual_seed(1)
        assert torch.equal(got, run_attack(attack, model, x, y))


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


# --- normalised inputs (issue 15 #2) -----------------------------------------------------------

def normalised(n=4, seed=0):
    image, y = images(n, seed)
    return (image - MEAN) / STD, y


@pytest.mark.parametrize("attack", ["fgsm", "pgd"])
def test_normalised_inputs_with_the_default_box_are_refused_with_the_fix(attack):
    """The issue's reproducer: pgd on CIFAR-normalised inputs with the default clamp=(0, 1)
    moved them by 2.41 (the docstring promises <= eps); now a ValueError names the fix."""
    model = cnn().eval()
    x, y = normalised()
    with pytest.raises(ValueError, match=r"clamp box.*normalised image.*\(0 - mean\) / std.*\[C, 1, 1\]"):
        if attack == "fgsm":
            lepton_fast.fgsm(model, x, y, 8 / 255)
        else:
            lepton_fast.pgd(model, x, y, eps=8 / 255, step_size=2 / 255, steps=3)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("attack", ["fgsm", "pgd", "pgd-no-random-start"])
def test_an_input_outside_the_box_is_named_as_the_user_passed_it(attack, backend):
    """pgd(model, x * 255, ...) said "pgd_step_: x_orig = ...": the kernel's op and argument,
    not the function the user called and the argument they passed."""
    require(FGSM_SPEC if attack == "fgsm" else PGD_INPLACE_SPEC, "cpu", backend)
    model = cnn().eval()
    x, y = images(4)
    x = x * 255
    with pytest.raises(ValueError, match=r"^(fgsm|pgd): x (= \S+ \(at flat index \d+\) )?lies farther than eps") as info:
        if attack == "fgsm":
            lepton_fast.fgsm(model, x, y, 8 / 255, backend=backend)
        else:
            lepton_fast.pgd(model, x, y, 8 / 255, 2 / 255, 3, random_start=attack == "pgd", backend=backend)
    assert str(info.value).startswith(attack.split("-")[0] + ": x ")
    assert "x_orig" not in str(info.value) and "pgd_step" not in str(info.value)


@pytest.mark.parametrize("random_start", [True, False])
def test_normalised_inputs_with_their_box_stay_within_eps(random_start):
    model = cnn().eval()
    x, y = normalised()
    eps = 8 / 255 / STD  # 8/255 in pixel units, per channel
    adv = lepton_fast.pgd(model, x, y, eps, 2 / 255 / STD, steps=3, random_start=random_start, clamp=BOX,
                          generator=torch.Generator().manual_seed(0))
    assert ((adv - x).abs() <= eps * (1 + 2**-20)).all()
    assert (adv >= BOX[0]).all() and (adv <= BOX[1]).all()
    assert (adv != x).any()
    once = lepton_fast.fgsm(model, x, y, eps, clamp=BOX)
    assert ((once - x).abs() <= eps * (1 + 2**-20)).all() and (once >= BOX[0]).all() and (once <= BOX[1]).all()


def test_vat_loss_clamps_into_the_box_and_refuses_an_input_outside_it():
    model = cnn().eval()
    x, _ = normalised()
    seen = []

    def recording(inputs):
        seen.append(inputs.detach())
        return model(inputs)

    lepton_fast.vat_loss(recording, x, eps=2.0, clamp=BOX, generator=torch.Generator().manual_seed(0))
    moved = seen[-1]
    assert (moved >= BOX[0]).all() and (moved <= BOX[1]).all()
    assert ((moved - x).flatten(1).norm(dim=1) <= 2.0 * (1 + 1e-6)).all()
    with pytest.raises(ValueError, match="vat_loss: x lies outside the clamp box.*normalised image"):
        lepton_fast.vat_loss(model, x, clamp=(0.0, 1.0))


# --- labels (issue 15 #7) ----------------------------------------------------------------------

@pytest.mark.parametrize("attack", ["fgsm", "pgd"])
def test_labels_out_of_range_name_y(attack):
    """pgd(model, x, y=[0, 7]) with 3 classes raised a bare IndexError from cross_entropy."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 6 * 6, 3))
    x, _ = images(2)
    call = {"fgsm": lambda y: lepton_fast.fgsm(model, x, y, 0.03),
            "pgd": lambda y: lepton_fast.pgd(model, x, y, 0.03, 0.01, steps=2)}[attack]
    with pytest.raises(ValueError, match=r"y must be in \[0, 3\)"):
        call([0, 7])
    with pytest.raises(ValueError, match=r"y must hold one class index per sample"):
        call([0, 1, 2])
    with pytest.raises(TypeError, match="y must be"):
        call(torch.tensor([True, False]))
    assert call([0, 2]).shape == x.shape  # a list of valid labels is taken as a tensor


# --- VAT ---------------------------------------------------------------------------------------

def unit(v):
    return v / v.flatten(1).norm(dim=1).view((-1,) + (1,) * (v.dim() - 1))


def reference_vat(model, x, xi, eps, iterations, d):
    """Miyato et al.'s algorithm written out plainly, from a given initial direction."""
    with torch.no_grad():
        p = F.softmax(model(x), dim=1)

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
def test_vat_loss_matches_the_algorithm_in_float64(kind, iterations):
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


def vat_perturbations(net, x, eps, seed):
    """(finite-difference probe - x, r_adv) of one vat_loss call, read off the model's inputs."""
    seen = []

    def recording(inputs):
        seen.append(inputs.detach())
        return net(inputs)

    lepton_fast.vat_loss(recording, x, eps=eps, generator=torch.Generator().manual_seed(seed))
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    return seen[1] - xf, seen[2] - xf


def power_iteration_float64(net, x, seed, xi=1e-6):
    """The right direction: one power-iteration step in float64 from vat_loss's random d."""
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    d = unit(torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(seed)).double())
    x = x.double()
    with torch.no_grad():
        logp = F.log_softmax(net(x), dim=-1)
    d.requires_grad_(True)
    kl = (logp.exp() * (logp - F.log_softmax(net(x + xi * d), dim=-1))).sum(-1).mean()
    (g,) = torch.autograd.grad(kl, d)
    return unit(g)


@pytest.mark.parametrize("scale", [1.0, 1e-3, 1e3], ids=["x~0.5", "x~5e-4", "x~500"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_vat_perturbation_has_norm_eps_and_the_power_iteration_direction(dtype, scale):
    """Issue 15 #3: in float32, x in [0.25, 0.75] and xi = 1e-6, x + xi*d changed 25 % of the
    elements, ||r_adv|| came out 0.0-0.96 instead of eps and its cosine with the float64 power
    iteration was 0.04. The model sees x / scale, so every scale is the same problem."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4), nn.Flatten(),
                        nn.Linear(8 * 8 * 8, 10))
    if dtype == torch.float64:
        net = net.double()
    x = ((0.25 + 0.5 * torch.rand(8, 3, 32, 32)) * scale).to(dtype)
    probe, r_adv = vat_perturbations(lambda inputs: net(inputs / scale), x, eps=1.0, seed=5)
    assert (probe != 0).double().mean() > 0.99  # the finite difference moved (nearly) every element
    norms = r_adv.double().flatten(1).norm(dim=1)
    # the norm of (x + r_adv) - x, whose rounding is a few ulps of x per element
    torch.testing.assert_close(norms, torch.ones_like(norms), rtol=0, atol=1e-4 if scale > 1 else 1e-6)
    want = power_iteration_float64(lambda inputs: copy.deepcopy(net).double()(inputs / scale), x, seed=5)
    cosine = F.cosine_similarity(r_adv.double().flatten(1), want.flatten(1), dim=1)
    assert cosine.min() > 0.99, cosine


def test_vat_direction_of_a_flat_model_keeps_norm_eps():
    """A model constant around x gives a zero gradient: the direction falls back to the random
    one, still of norm eps, where the old +1e-12 / +1e-6 made it vanish."""
    x = torch.rand(3, 5)
    _, r_adv = vat_perturbations(lambda inputs: inputs.sum(-1, keepdim=True) * 0 + torch.tensor([1.0, 2.0]), x,
                                 eps=0.7, seed=0)
    torch.testing.assert_close(r_adv.norm(dim=1), torch.full((3,), 0.7), rtol=1e-6, atol=0)


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
        (lambda m, x, y: lepton_fast.fgsm(m, x, y, torch.ones(4)), ValueError, "eps.*per sample"),
        (lambda m, x, y: lepton_fast.pgd(m, x, y, 0.1, -0.01, 3), ValueError, "step_size"),
        (lambda m, x, y: lepton_fast.pgd(m, x, y, 0.1, 0.01, -1), ValueError, "steps"),
        (lambda m, x, y: lepton_fast.pgd(m, x, y, 0.1, 0.01, 1, clamp=(0.0,)), TypeError, "clamp"),
        (lambda m, x, y: lepton_fast.vat_loss(m, x, xi=0.0), ValueError, "xi"),
        (lambda m, x, y: lepton_fast.vat_loss(m, x, eps=-1.0), ValueError, "eps"),
        (lambda m, x, y: lepton_fast.vat_loss(m, x, power_iterations=0), ValueError, "power_iterations"),
        (lambda m, x, y: lepton_fast.vat_loss(m, x[0, 0, 0]), ValueError, "x"),
        (lambda m, x, y: lepton_fast.vat_loss(m, x, clamp=(torch.ones(2), 1.0)), ValueError, r"clamp\[0\]"),
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


@pytest.mark.parametrize(
    "how,error,message",
    [
        ("logits of another width", ValueError, r"logits has shape \(6, 7\) but the model gives \(6, 5\)"),
        ("logits of other rows", ValueError, r"logits must be model\(x\), \[N, C\] with N = x.shape\[0\] = 6"),
        ("integer logits", TypeError, "logits must be model\\(x\\), a floating-point tensor"),
        ("a float16 model", TypeError, r"model has torch.float16 parameters: pass a copy of the model in "
                                       r"torch.float32"),
        ("meta x", ValueError, "x is a meta tensor .* materialise it first"),
    ],
)
def test_vat_loss_errors_name_the_argument_and_the_fix(how, error, message):
    """They were a broadcast error, a matmul dtype error and 'unsupported scalarType'."""
    model, (x, _) = cnn(), images()
    kw = {}
    if how == "logits of another width":
        kw["logits"] = torch.randn(6, 7)
    elif how == "logits of other rows":
        kw["logits"] = torch.randn(5, 5)
    elif how == "integer logits":
        kw["logits"] = torch.zeros(6, 5, dtype=torch.int64)
    elif how == "a float16 model":
        model = model.half()
    else:
        x = torch.empty(x.shape, device="meta")
    with pytest.raises(error, match=message):
        lepton_fast.vat_loss(model, x, **kw)
