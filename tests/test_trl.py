"""lepton_fast.integrations.trl against the installed trl itself (the optional extra [trl]).

Values and gradients of generalized_jsd_loss and chunked_divergence_loss are compared with
trl's own functions for every argument, in float32 on fresh random inputs; then one training
step of a tiny Llama-style model built from a config (no download) runs through trl's own
GKD and Distillation loss code, unpatched and patched.
"""
import math
import types

import pytest
import torch

trl = pytest.importorskip("trl", reason="the [trl] extra is not installed")
transformers = pytest.importorskip("transformers")

from conftest import require  # noqa: E402
from lepton_fast.integrations import trl as lf_trl  # noqa: E402
from lepton_fast.ops.kd_loss import SPEC  # noqa: E402
from trl.experimental.gkd import gkd_trainer  # noqa: E402
from trl.trainer import distillation_trainer  # noqa: E402

TOL = dict(atol=2e-5, rtol=2e-5)
TRL_GKD = gkd_trainer.GKDTrainer.__dict__["generalized_jsd_loss"].__func__
TRL_CHUNKED = distillation_trainer._chunked_divergence_loss


@pytest.fixture(autouse=True)
def _trl_unpatched():
    """Every test starts and ends with trl's own functions in place."""
    lf_trl.unpatch()
    yield
    lf_trl.unpatch()


def test_trl_is_the_reproduced_release():
    assert trl.__version__.startswith(lf_trl.TRL_VERSION + "."), trl.__version__


def randn(*shape, seed, scale=1.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def value_and_grads(fn, tensors, *args, **kw):
    """(outputs, grads of the tensors that require one) of fn(*tensors, *args, **kw)."""
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in tensors]
    out = fn(*leaves, *args, **kw)
    first = out[0] if isinstance(out, tuple) else out
    if first.dim():
        first = (first * randn(*first.shape, seed=99, dtype=first.dtype)).sum()
    first.backward()
    return out, [leaf.grad for leaf in leaves if leaf.requires_grad]


def assert_same(got, want):
    got_out, got_grads = got
    want_out, want_grads = want
    for g, w in zip(got_out if isinstance(got_out, tuple) else (got_out,),
                    want_out if isinstance(want_out, tuple) else (want_out,)):
        assert g.dtype == w.dtype and g.shape == w.shape, (g.dtype, w.dtype, g.shape, w.shape)
        torch.testing.assert_close(g.detach(), w.detach(), **TOL, equal_nan=True)
    assert len(got_grads) == len(want_grads)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, **TOL, equal_nan=True)


# --- GKD: generalized_jsd_loss -------------------------------------------------------------------


def _logits_and_labels(seed, shape=(3, 5, 41)):
    s = randn(*shape, seed=seed, scale=3.0).requires_grad_()
    t = randn(*shape, seed=seed + 1, scale=3.0)
    g = torch.Generator().manual_seed(seed + 2)
    labels = torch.randint(0, shape[-1], shape[:-1], generator=g)
    labels[0, :2] = -100
    labels[2, 3] = -100
    return s, t, labels


@pytest.mark.parametrize("num_items", [None, 7, "tensor"])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("with_labels", [False, True])
@pytest.mark.parametrize("beta,temperature", [(0.0, 1.0), (0.5, 1.0), (1.0, 2.0), (0.3, 0.7)])
def test_generalized_jsd_loss_is_trl(beta, temperature, with_labels, reduction, num_items):
    require(SPEC, "cpu", "cpu")
    s, t, labels = _logits_and_labels(seed=1)
    count = torch.tensor(7.0) if num_items == "tensor" else num_items
    kw = dict(labels=labels if with_labels else None, beta=beta, temperature=temperature, reduction=reduction,
              num_items_in_batch=count)
    assert_same(value_and_grads(lf_trl.generalized_jsd_loss, [s, t], **kw), value_and_grads(TRL_GKD, [s, t], **kw))


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean"])
def test_generalized_jsd_loss_every_position_masked(reduction):
    # trl: batchmean 0 (clamped count), sum 0, mean NaN (the mean of nothing); gradient 0 in each.
    s, t, _ = _logits_and_labels(seed=2)
    labels = torch.full(s.shape[:-1], -100)
    kw = dict(labels=labels, reduction=reduction)
    got = value_and_grads(lf_trl.generalized_jsd_loss, [s, t], **kw)
    assert_same(got, value_and_grads(TRL_GKD, [s, t], **kw))
    assert math.isnan(got[0].item()) == (reduction == "mean") and (got[1][0] == 0).all()


@pytest.mark.parametrize("kw, match", [(dict(beta=1.5), "beta"), (dict(temperature=0.0), "temperature")])
def test_generalized_jsd_loss_elementwise_checks_its_arguments(kw, match):
    """reduction "none" computes the terms without a fused kernel, with the kernels' checks."""
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 7, generator=g), torch.randn(2, 3, 7, generator=g)
    with pytest.raises(ValueError, match=match):
        lf_trl.generalized_jsd_loss(s, t, reduction="none", **kw)


def test_generalized_jsd_loss_keeps_the_logits_dtype():
    s, t, labels = _logits_and_labels(seed=3)
    s, t = s.detach().bfloat16().requires_grad_(), t.bfloat16()
    got, (grad,) = value_and_grads(lf_trl.generalized_jsd_loss, [s, t], labels=labels)
    want, (want_grad,) = value_and_grads(TRL_GKD, [s, t], labels=labels)
    assert got.dtype == want.dtype == torch.bfloat16 and grad.dtype == torch.bfloat16
    # trl computes in bfloat16; ours in float32 from the same inputs, then rounds once.
    exact, _ = value_and_grads(TRL_GKD, [s.double(), t.double()], labels=labels)
    assert abs(got.double() - exact) <= abs(want.double() - exact) + 2**-8 * abs(exact)


# --- Distillation: chunked_divergence_loss -------------------------------------------------------


def _heads(seed, b=2, k=6, h_s=16, h_t=12, v=53, bias=True):
    x = [randn(b, k, h_s, seed=seed).requires_grad_(), randn(b, k, h_t, seed=seed + 1),
         randn(v, h_s, seed=seed + 2, scale=0.8).requires_grad_(), randn(v, h_t, seed=seed + 3, scale=0.8)]
    mask = (torch.arange(k) >= torch.tensor([[2], [4]])).long()  # prompt positions left out
    biases = dict(student_lm_head_bias=randn(v, seed=seed + 4).requires_grad_(),
                  teacher_lm_head_bias=randn(v, seed=seed + 5)) if bias else {}
    return x, mask, biases


def _chunked_call(fn, seed, beta, bias, **kw):
    x, mask, biases = _heads(seed, bias=bias)
    names = list(biases)
    tensors = x + list(biases.values())

    def call(sh, th, sw, tw, *bs):
        return fn(sh, th, sw, tw, mask, beta, **dict(zip(names, bs)), **kw)

    return value_and_grads(call, tensors)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("extra", [
    dict(),
    dict(num_items_in_batch=9, temperature=2.0),
    dict(num_items_in_batch=torch.tensor(5), student_logit_scale=0.7, teacher_logit_scale=1.3),
    dict(student_final_logit_softcapping=3.0, teacher_final_logit_softcapping=20.0, temperature=0.8),
], ids=["plain", "num_items+T", "logit_scales", "softcaps"])
def test_chunked_divergence_loss_is_trl(extra, beta, bias):
    require(SPEC, "cpu", "cpu")
    got = _chunked_call(lf_trl.chunked_divergence_loss, 4, beta, bias, **extra)
    want = _chunked_call(TRL_CHUNKED, 4, beta, bias, **extra)
    assert_same(got, want)
    assert got[0][2].dtype == torch.int64 and got[0][2] == 6  # the kept positions: 4 + 2


def test_chunked_divergence_loss_on_the_reference_backend(monkeypatch):
    # Without the compiled kernels (or with $LEPTON_FAST_BACKEND=reference) the entropy and
    # the loss still come back as trl's.
    monkeypatch.setenv("LEPTON_FAST_BACKEND", "reference")
    extra = dict(student_final_logit_softcapping=3.0, temperature=1.5)
    assert_same(_chunked_call(lf_trl.chunked_divergence_loss, 5, 0.3, True, **extra),
                _chunked_call(TRL_CHUNKED, 5, 0.3, True, **extra))


# --- patch() and one training step through trl's own trainer code --------------------------------


def test_patch_swaps_both_and_unpatch_restores():
    undo = lf_trl.patch()
    lf_trl.patch()  # a second call changes nothing
    assert gkd_trainer.GKDTrainer.generalized_jsd_loss is lf_trl.generalized_jsd_loss
    assert distillation_trainer._chunked_divergence_loss is lf_trl.chunked_divergence_loss
    undo()
    assert gkd_trainer.GKDTrainer.generalized_jsd_loss is TRL_GKD
    assert distillation_trainer._chunked_divergence_loss is TRL_CHUNKED


def tiny_llama(seed, hidden=32, vocab=97):
    # initializer_range 0.5: logits of spread ~3 (the default 0.02 gives near-uniform
    # distributions, a loss of ~1e-3 that any error would hide under the tolerance)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, tie_word_embeddings=False, initializer_range=0.5)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).float()


def _one_step(loss_fn, patched):
    """The loss and each student parameter's gradient of one training step, unpatched or patched
    (the gradients, not the updated weights: an update of 1e-4 is a few ulps of a weight of 0.5)."""
    undo = lf_trl.patch() if patched else (lambda: None)
    try:
        student, teacher = tiny_llama(0), tiny_llama(1, hidden=48)
        optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
        loss = loss_fn(student, teacher)
        loss.backward()
        optimizer.step()
        return loss.detach(), {k: p.grad for k, p in student.named_parameters()}
    finally:
        undo()


def _assert_same_step(loss_fn):
    want_loss, want_grads = _one_step(loss_fn, patched=False)
    loss, grads = _one_step(loss_fn, patched=True)
    assert want_loss > 0.1
    torch.testing.assert_close(loss, want_loss, atol=0, rtol=1e-5)
    for k, want in want_grads.items():
        assert want.abs().max() > 0, k  # every parameter learns: lm_head, norms, attention, embeddings
        torch.testing.assert_close(grads[k], want, atol=1e-5 * want.abs().max().item(), rtol=1e-4,
                                   msg=lambda m, k=k: f"{k}: {m}")


def _tokens(seed, batch=2, length=10, vocab=97):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g)


def test_gkd_training_step_patched_is_unpatched():
    """GKDTrainer.compute_loss itself (both models' logits, then self.generalized_jsd_loss)."""
    require(SPEC, "cpu", "cpu")
    input_ids = _tokens(5)
    labels = input_ids.clone()
    labels[:, :4] = -100  # the prompt

    def loss_fn(student, teacher):
        trainer = types.SimpleNamespace(teacher_model=teacher, beta=0.4,
                                        generalized_jsd_loss=gkd_trainer.GKDTrainer.generalized_jsd_loss)
        inputs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=labels)
        return gkd_trainer.GKDTrainer.compute_loss(trainer, student, inputs)

    _assert_same_step(loss_fn)


def test_distillation_training_step_patched_is_unpatched():
    """DistillationTrainer._compute_loss itself: the backbones' last hidden states, both
    lm_heads, the configs' logit scale and softcap, then distillation_trainer._chunked_divergence_loss."""
    require(SPEC, "cpu", "cpu")
    prompt, completion = _tokens(6, length=4), _tokens(7, length=6)
    completion_mask = torch.ones_like(completion)
    completion_mask[1, 4:] = 0  # a shorter completion, padded

    def loss_fn(student, teacher):
        trainer = types.SimpleNamespace(
            teacher_model=teacher, beta=0.5, temperature=1.5, model_kwarg_keys=(), _is_vlm=False,
            accelerator=types.SimpleNamespace(unwrap_model=lambda m: m, is_main_process=True),
            _forward_redirection=lambda wrapper, module, method, *a, **k: method(*a, **k))
        trainer._get_last_hidden_state = types.MethodType(
            distillation_trainer.DistillationTrainer._get_last_hidden_state, trainer)
        inputs = dict(prompt_ids=prompt, completion_ids=completion, prompt_mask=torch.ones_like(prompt),
                      completion_mask=completion_mask)
        loss, _, n_valid = distillation_trainer.DistillationTrainer._compute_loss(trainer, student, inputs, None)
        assert n_valid == 10
        return loss

    _assert_same_step(loss_fn)


def test_readme_names_trl_objects_where_trl_has_them():
    """`from trl import GKDTrainer` fails on trl 1.16 (it lives in trl.experimental.gkd): each
    trl.<dotted name> that README.md writes resolves in the installed trl."""
    import importlib
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    names = set(re.findall(r"(?<![\w.])trl(?:\.\w+)+", readme))
    assert {"trl.experimental.gkd.GKDTrainer.generalized_jsd_loss", "trl.DistillationTrainer"} <= names
    for name in names:
        obj = trl
        for part in name.split(".")[1:]:
            if not hasattr(obj, part) and hasattr(obj, "__path__"):
                try:  # a submodule not imported yet
                    importlib.import_module(f"{obj.__name__}.{part}")
                except ImportError:
                    pass
            assert hasattr(obj, part), f"README.md names {name}, which trl {trl.__version__} does not have"
            obj = getattr(obj, part)
