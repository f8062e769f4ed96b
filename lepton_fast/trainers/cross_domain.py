"""CrossDomainTrainer: labeled source batches + unlabeled target batches, with the transfer
loss terms switched on by argument and each computed by a lepton_fast op."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lepton_fast import _validate
from lepton_fast.data.augment import strong_view, weak_view
from lepton_fast.ops.kd_loss import fused_kd_loss
from lepton_fast.trainers import _common
from lepton_fast.trainers._loop import Loop, check_steps
from lepton_fast.trainers.distiller import probe_classes

TERMS = ("kd", "pseudo", "domain", "adversarial")
ATTACKS = ("fgsm", "pgd", "vat")
DEFAULT_WEIGHTS = {"kd": 1.0, "pseudo": 1.0, "domain": 1.0, "adversarial": 1.0}


class DistributionAlignment(nn.Module):
    """ReMixMatch's distribution alignment (Berthelot et al. 2020), as in USB's FixMatch+DA.

    p̃ = normalize(p · prior / p_model), with p_model the EMA (``momentum``) of the mean
    prediction on the target and ``prior`` the class distribution of the source labels
    (uniform by default). It counters a classifier that favours a few classes on the new
    domain, the first step of a pseudo-label collapse. State lives in buffers.
    """

    def __init__(self, num_classes: int, momentum: float = 0.999, prior: Optional[Tensor] = None):
        super().__init__()
        self.momentum = _validate.in_unit_interval("momentum", momentum, open_right=True)
        prior = torch.full((num_classes,), 1.0 / num_classes) if prior is None else prior.float() / prior.sum()
        self.register_buffer("prior", prior)
        self.register_buffer("p_model", torch.full((num_classes,), 1.0 / num_classes))

    @torch.no_grad()
    def forward(self, logits: Tensor) -> Tensor:
        """[N, C] logits → [N, C] log-probabilities of the aligned distribution."""
        probs = torch.softmax(logits.float(), -1)
        self.p_model.mul_(self.momentum).add_((1 - self.momentum) * probs.mean(0))
        aligned = probs * (self.prior / self.p_model)
        return torch.log(aligned / aligned.sum(-1, keepdim=True))


class _Net(nn.Module):
    """student(x) → logits, and with a discriminator also the domain logits of the first
    ``n_domain`` rows' features after gradient reversal. One module, so that DDP wraps
    student and discriminator together and reduces their gradients in one backward."""

    def __init__(self, student: nn.Module, discriminator: Optional[nn.Module], grl: Optional[nn.Module]):
        super().__init__()
        self.student, self.discriminator, self.grl = student, discriminator, grl

    def forward(self, x: Tensor, n_domain: int = 0):
        if self.discriminator is None:
            return self.student(x), None
        features = self.student.features(x)
        logits = self.student.classifier(features)
        return logits, self.discriminator(self.grl(features[:n_domain]).flatten(1))


def default_discriminator(feature_dim: int, hidden: int = 256) -> nn.Module:
    """DANN's domain classifier: a two-layer MLP on the features, one logit (target = 1)."""
    return nn.Sequential(nn.Linear(feature_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 1))


class CrossDomainTrainer(Loop):
    """Train ``student`` on labeled source and unlabeled target data.

    Every step takes a source batch (x_s, y_s) and, when a target term is on, a target batch
    x_t (its labels are never read). The loss is CE(student(weak(x_s)), y_s) plus, for each
    term in ``terms``, ``weights[term]`` times:

    - ``"kd"``: ``fused_kd_loss(student(weak(x_t)), teacher(weak(x_t)), temperature)``:
      distillation from the teacher on target images (Hinton et al. 2015).
    - ``"pseudo"``: FixMatch (Sohn et al. 2020): ``fused_pseudo_label_loss`` on the strong
      view with pseudo-labels from the weak view, masked by ``threshold`` (any module of
      lepton_fast.thresholds, updated every step), after distribution alignment when
      ``distribution_alignment`` (ReMixMatch).
    - ``"domain"``: DANN (Ganin et al. 2016): a discriminator on the student's features of
      source and target, through ``lepton_fast.nn.GradientReversal`` whose λ follows the
      DANN schedule over ``steps``. Needs ``student.features`` and ``student.classifier``
      (logits = classifier(features(x))).
    - ``"adversarial"``: adversarial samples on the target with the weak view's
      (thresholded) pseudo-labels: ``"fgsm"`` or ``"pgd"`` inputs (lepton_fast.fgsm/pgd,
      L∞ radius ``eps``) trained with masked cross-entropy, or ``"vat"``
      (lepton_fast.vat_loss, L2 radius ``eps``, no labels).

    ``"pseudo"`` and ``"adversarial"`` start after ``warmup_steps`` source steps: before a
    classifier is any good on the target its confident mistakes become labels.

    Args:
        student: nn.Module, x [N, ...] → logits [N, C].
        terms: a subset of ("kd", "pseudo", "domain", "adversarial"); () trains on the
            source alone.
        teacher: frozen nn.Module with the same C, required by "kd".
        weights: {term: weight ≥ 0} overriding 1.0.
        temperature: KD temperature T > 0.
        threshold: a lepton_fast.thresholds module (default FixedThreshold(0.95)).
        distribution_alignment: align weak-view predictions before thresholding (default on).
        alignment_momentum: EMA momentum of the alignment's target class distribution
            (default 0.99: a source classifier's bias on a new domain is large, so the
            estimate must catch up within a hundred steps; USB's 0.999 is for SSL).
        warmup_steps: ≥ 0.
        weak_augment, strong_augment: ``f(x, generator) -> x`` on a batch; default the digit
            views of lepton_fast.data.augment. source_augment: the source batches' view
            (default ``weak_augment``).
        discriminator: for "domain"; default ``default_discriminator(feature_dim)``.
        feature_dim: the width of ``student.features`` (needed without ``discriminator``).
        attack: "fgsm", "pgd" or "vat"; eps > 0; pgd_steps ≥ 1.
        optimizer, scheduler, device, amp, seed, checkpoint, checkpoint_every, progress:
            as in KnowledgeDistiller. The optimizer covers student and discriminator.

    Checkpoints hold the student, discriminator, GRL step, threshold and alignment state,
    optimiser, scheduler, grad scaler, the data positions and the random generators.

    Raises:
        ValueError: an unknown term or attack, "kd" without a teacher, temperature ≤ 0,
            negative weight or warmup, teacher/student class counts that differ, "domain"
            with a student lacking ``features``/``classifier``, no target data for a
            target term.
    """

    def __init__(self, student: nn.Module, *, terms: Sequence[str] = (), teacher: Optional[nn.Module] = None,
                 weights: Optional[dict] = None, temperature: float = 2.0, threshold: Optional[nn.Module] = None,
                 distribution_alignment: bool = True, alignment_momentum: float = 0.99, warmup_steps: int = 0,
                 weak_augment: Callable = weak_view, strong_augment: Callable = strong_view,
                 source_augment: Optional[Callable] = None,
                 discriminator: Optional[nn.Module] = None, feature_dim: Optional[int] = None,
                 attack: str = "fgsm", eps: float = 0.1, pgd_steps: int = 3,
                 optimizer=None, scheduler=None, device=None, amp: Optional[str] = None, seed: int = 0,
                 checkpoint: Optional[str] = None, checkpoint_every: int = 100, progress: bool = True):
        if isinstance(terms, str):
            terms = (terms,)
        unknown = [t for t in terms if t not in TERMS]
        if unknown:
            raise ValueError(f"terms must be a subset of {TERMS}, got unknown {unknown}")
        self.terms = tuple(dict.fromkeys(terms))
        self.weights = dict(DEFAULT_WEIGHTS)
        for k, w in (weights or {}).items():
            if k not in TERMS:
                raise ValueError(f"weights: unknown term {k!r}; terms are {TERMS}")
            if not float(w) >= 0:
                raise ValueError(f"weights[{k!r}] must be >= 0, got {w}")
            self.weights[k] = float(w)
        self.temperature = _validate.positive_finite("temperature", temperature)
        if "kd" in self.terms and teacher is None:
            raise ValueError("the 'kd' term needs a teacher")
        if teacher is not None and not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher must be an nn.Module, got {type(teacher).__name__}")
        if not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
        self.attack = _validate.choice("attack", attack, ATTACKS)
        self.eps = _validate.positive_finite("eps", eps)
        if not isinstance(pgd_steps, int) or pgd_steps < 1:
            raise ValueError(f"pgd_steps must be an int >= 1, got {pgd_steps!r}")
        self.pgd_steps = pgd_steps
        super().__init__(student, optimizer=optimizer, scheduler=scheduler, device=device, amp=amp, seed=seed,
                         checkpoint=checkpoint, checkpoint_every=checkpoint_every, progress=progress)
        self.teacher = None if teacher is None else teacher.to(self.device).eval()
        self.warmup_steps = warmup_steps
        self.weak_augment, self.strong_augment = weak_augment, strong_augment
        self.source_augment = source_augment or weak_augment
        self._threshold_arg, self._discriminator_arg = threshold, discriminator
        self._feature_dim = feature_dim
        self._use_alignment = distribution_alignment
        self._alignment_momentum = _validate.in_unit_interval("alignment_momentum", alignment_momentum,
                                                              open_right=True)
        self.threshold = self.alignment = self.grl = self.discriminator = self.net = None
        self.classes: Optional[int] = None
        self._source = self._target = None
        self.collapse: Optional[str] = None
        if "domain" in self.terms and not (hasattr(student, "features") and hasattr(student, "classifier")):
            raise ValueError("the 'domain' term needs a student with .features (x -> features) and .classifier "
                             "(features -> logits) modules")

    @property
    def needs_target(self) -> bool:
        return bool(self.terms)

    def _setup(self, steps: int, num_classes: int, n_target: int) -> None:
        """Build the stateful parts once the class count and schedule length are known."""
        if self.net is not None:
            return
        self.classes = num_classes
        if {"pseudo", "adversarial"} & set(self.terms):
            from lepton_fast.thresholds import FixedThreshold

            self.threshold = (self._threshold_arg or FixedThreshold(0.95)).to(self.device)
            if self._use_alignment:
                self.alignment = DistributionAlignment(num_classes, self._alignment_momentum).to(self.device)
        if "domain" in self.terms:
            from lepton_fast.nn import GradientReversal

            self.grl = GradientReversal(total_steps=steps).to(self.device)
            d = self._discriminator_arg
            if d is None:
                if self._feature_dim is None:
                    raise ValueError("the 'domain' term needs feature_dim (or a discriminator)")
                d = default_discriminator(self._feature_dim)
            self.discriminator = d.to(self.device)
        self._build(list(self.student.parameters())
                    + ([] if self.discriminator is None else list(self.discriminator.parameters())))
        self.net = _common.wrap_ddp(_Net(self.student, self.discriminator, self.grl), self.device)

    def _modules(self) -> dict:
        mods = {"student": self.student}
        for name in ("discriminator", "grl", "threshold", "alignment"):
            if getattr(self, name) is not None:
                mods[name] = getattr(self, name)
        return mods

    def _streams(self) -> dict:
        return {k: s for k, s in (("source", self._source), ("target", self._target)) if s is not None}

    def _num_classes(self) -> int:
        if self.classes is None:
            raise RuntimeError("call fit first: the class count is found on the first batch")
        return self.classes

    # -- one step ---------------------------------------------------------------------------
    def _pseudo_targets(self, weak_logits: Tensor) -> Tensor:
        weak = weak_logits.detach().float()
        return self.alignment(weak) if self.alignment is not None else weak

    def _train_step(self) -> dict:
        dev, g = self.device, self.generator
        xs, ys, _ = _common.unpack(self._source.next())
        xs = self.source_augment(xs.to(dev, non_blocking=True), g)
        ys = ys.to(dev, non_blocking=True)
        parts, sizes = [xs], [xs.shape[0]]
        warm = self.step < self.warmup_steps
        use = {t: t in self.terms and not (warm and t in ("pseudo", "adversarial")) for t in TERMS}
        if self._target is not None:
            xt, _, idx = _common.unpack(self._target.next())
            xt = xt.to(dev, non_blocking=True)
            xw = self.weak_augment(xt, g)
            parts.append(xw)
            sizes.append(xw.shape[0])
            if use["pseudo"]:
                parts.append(self.strong_augment(xt, g))
                sizes.append(xt.shape[0])
        logs = {}
        with _common.autocast(dev, self.amp):
            n_domain = sizes[0] + sizes[1] if use["domain"] else 0
            logits, domain_logits = self.net(torch.cat(parts), n_domain)
            chunks = logits.split(sizes)
            loss = F.cross_entropy(chunks[0].float(), ys)
            logs["source"] = loss.detach()
            if len(chunks) > 1:
                weak_logits = chunks[1]
            if use["kd"]:
                with torch.no_grad():
                    teacher_logits = self.teacher(xw)
                kd = fused_kd_loss(weak_logits, teacher_logits, self.temperature)
                logs["kd"] = kd.detach()
                loss = loss + self.weights["kd"] * kd
            if use["domain"]:
                domains = torch.cat([torch.zeros(sizes[0], device=dev), torch.ones(sizes[1], device=dev)])
                dann = F.binary_cross_entropy_with_logits(domain_logits.float().squeeze(-1), domains)
                logs["domain"] = dann.detach()
                loss = loss + self.weights["domain"] * dann
            labels = mask = None
            if use["pseudo"] or use["adversarial"]:
                targets = self._pseudo_targets(weak_logits)
                kwargs = self.threshold.loss_kwargs(targets)
            if use["pseudo"]:
                from lepton_fast import fused_pseudo_label_loss

                out = fused_pseudo_label_loss(chunks[2], targets, **kwargs)
                labels, mask = out.labels, out.mask
                self.threshold.update(out, weak_logits=targets, indices=None if idx is None else idx.to(dev))
                self._count_classes(out.class_counts)
                logs["pseudo"], logs["mask"] = out.loss.detach(), out.mask.float().mean()
                loss = loss + self.weights["pseudo"] * out.loss
            if use["adversarial"]:
                loss = loss + self.weights["adversarial"] * self._adversarial(xw, weak_logits, targets, kwargs,
                                                                             labels, mask, logs)
        self._optimize(loss)
        if self.grl is not None:
            self.grl.step()
        logs["loss"] = loss.detach()
        return logs

    def _adversarial(self, xw, weak_logits, targets, kwargs, labels, mask, logs) -> Tensor:
        from lepton_fast import fgsm, pgd, select_pseudo_labels, vat_loss

        if self.attack == "vat":
            adv = vat_loss(self.student, xw, eps=self.eps, logits=weak_logits.detach().float())
        else:
            if labels is None:
                selected = select_pseudo_labels(targets, **{k: v for k, v in kwargs.items() if k != "weights"})
                labels, mask = selected.labels, selected.mask
            if self.attack == "fgsm":
                x_adv = fgsm(self.student, xw, labels, self.eps)
            else:
                x_adv = pgd(self.student, xw, labels, self.eps, 2.5 * self.eps / self.pgd_steps, self.pgd_steps,
                            generator=self.generator)
            adv_logits, _ = self.net(x_adv)
            per_row = F.cross_entropy(adv_logits.float(), labels, reduction="none")
            adv = (per_row * mask.float()).mean()
        logs["adversarial"] = adv.detach()
        return adv

    # -- collapse watch ---------------------------------------------------------------------
    def _count_classes(self, counts: Tensor) -> None:
        self._window_counts = counts if getattr(self, "_window_counts", None) is None else self._window_counts + counts

    def _after_window(self, means: dict) -> None:
        counts = getattr(self, "_window_counts", None)
        if counts is None:
            return
        self._window_counts = None
        total = int(counts.sum())
        if total >= 2 * self.classes and int(counts.max()) >= 0.9 * total:
            top = int(counts.argmax())
            self.collapse = (f"pseudo-label collapse at step {self.step}: {int(counts.max())}/{total} selected "
                             f"pseudo-labels are class {top}. {self.threshold_state()}")

    def threshold_state(self) -> str:
        """The threshold's (and alignment's) state as text, to see why labels were chosen."""
        parts = [repr(self.threshold).replace("\n", " ")] if self.threshold is not None else []
        if self.threshold is not None and hasattr(self.threshold, "class_thresholds"):
            parts.append("class thresholds " + _fmt(self.threshold.class_thresholds()))
        if self.alignment is not None:
            parts.append("aligned p_model " + _fmt(self.alignment.p_model))
        return "; ".join(parts)

    # -- public -----------------------------------------------------------------------------
    def fit(self, source, target=None, *, steps: int, batch_size: int = 64, target_batch_size: Optional[int] = None,
            validation_data=None, eval_every: int = 0) -> dict:
        """Train until ``steps`` optimiser steps (resuming from ``checkpoint`` if it exists).

        Args:
            source: labeled (x, y) tensors, a Dataset of (x, y[, index]) or a DataLoader.
            target: unlabeled target data in the same forms (labels, if present, are
                ignored; indices feed FlexMatch). Required when any term is on.
            batch_size / target_batch_size: per rank (target defaults to batch_size).
            validation_data: scored every ``eval_every`` steps and at the end into
                ``history["validation"]`` (no effect on training).

        Returns the history: ``step``, ``train`` (mean of each loss term, and the mask rate,
        per logging window), ``validation``. ``trainer.collapse`` holds a message when the
        selected pseudo-labels of a window were ≥ 90 % one class.
        """
        steps = check_steps(steps)
        if self.needs_target and target is None:
            raise ValueError(f"terms {self.terms} need target data")
        self._source = _common.Batches(source, "source", batch_size, shuffle=True, seed=self.seed, drop_last=True)
        if self.needs_target:
            self._target = _common.Batches(target, "target", target_batch_size or batch_size, shuffle=True,
                                           seed=self.seed + 1, drop_last=True)
        x0, _, _ = _common.unpack(self._source.dataset[0])
        x0 = x0.unsqueeze(0).to(self.device)
        if self.teacher is not None:
            classes = probe_classes(self.teacher, self.student, x0)
        else:
            was = self.student.training
            with torch.no_grad():
                classes = self.student.eval()(x0).shape[-1]
            self.student.train(was)
        self._setup(steps, classes, len(self._target.dataset) if self._target is not None else 0)
        self.student.train()
        return self._run(steps, "+".join(self.terms) or "source", validation_data, eval_every, classes)


def _fmt(t: Tensor) -> str:
    return "[" + ", ".join(f"{v:.2f}" for v in t.detach().float().cpu().tolist()) + "]"
