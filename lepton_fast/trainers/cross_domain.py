"""CrossDomainTrainer: labeled source batches + unlabeled target batches, with the transfer
loss terms switched on by argument and each computed by a lepton_fast op."""
from __future__ import annotations

import inspect
import warnings
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import lepton_fast
from lepton_fast import _validate
from lepton_fast.trainers import _common
from lepton_fast.trainers._loop import Loop, steps_for
from lepton_fast.trainers.alignment import MCC_TEMPERATURE, coral_loss, mcc_loss
from lepton_fast.trainers.distiller import probe_classes

TERMS = ("kd", "pseudo", "domain", "adversarial", "coral", "mcc")
ATTACKS = ("fgsm", "pgd", "vat")
PERTURB = ("input", "features")


class DistributionAlignment(nn.Module):
    """ReMixMatch's distribution alignment (Berthelot et al. 2020), as in USB's FixMatch+DA.

    p̃ = normalize(p · prior / p_model), with p_model the EMA (``momentum``) of the mean
    prediction on the target and ``prior`` the class distribution of the source labels
    (uniform by default). It counters a classifier that favours a few classes on the new
    domain, the first step of a pseudo-label collapse. State lives in buffers.

    ``forward`` refuses (ValueError) logits with a row whose softmax is undefined (a NaN or
    +inf, or every entry -inf) before it updates ``p_model``: a refused batch leaves the
    state as it was.
    """

    def __init__(self, num_classes: int, momentum: float = 0.999, prior: Optional[Tensor] = None):
        super().__init__()
        num_classes = _validate.integer("num_classes", num_classes, 1)
        self.momentum = _validate.in_unit_interval("momentum", momentum, open_right=True)
        if prior is not None:
            _validate.finite("prior", prior, "DistributionAlignment")
            if prior.shape != (num_classes,) or bool((prior < 0).any()) or not float(prior.sum()) > 0:
                raise ValueError(f"prior must be [{num_classes}] class frequencies >= 0 with a positive sum, got "
                                 f"{prior.tolist()}")
        prior = torch.full((num_classes,), 1.0 / num_classes) if prior is None else prior.float() / prior.sum()
        self.register_buffer("prior", prior)
        self.register_buffer("p_model", torch.full((num_classes,), 1.0 / num_classes))

    @torch.no_grad()
    def forward(self, logits: Tensor) -> Tensor:
        """[N, C] logits → [N, C] log-probabilities of the aligned distribution."""
        if logits.dim() != 2 or logits.shape[-1] != self.p_model.shape[0]:
            raise ValueError(f"logits must be [N, {self.p_model.shape[0]}], got shape {tuple(logits.shape)}")
        _validate.defined_rows("logits", logits, "DistributionAlignment")
        probs = torch.softmax(logits.float(), -1)
        self.p_model.mul_(self.momentum).add_((1 - self.momentum) * probs.mean(0))
        aligned = probs * (self.prior / self.p_model)
        return torch.log(aligned / aligned.sum(-1, keepdim=True))


def as_view(fn: Optional[Callable], name: str) -> Callable[[Tensor, torch.Generator], Tensor]:
    """An augmentation → ``view(x, generator)``. None is the identity. ``fn`` is called as
    ``fn(x, generator=g)`` if it has a parameter named ``generator``, as ``fn(x, g)`` if it
    needs a second positional argument, else as ``fn(x)``: decided once, here."""
    if fn is None:
        return lambda x, generator: x
    if not callable(fn):
        raise TypeError(f"{name} must be a callable f(x) or f(x, generator), got {type(fn).__name__}")
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin without a signature: one argument
        return lambda x, generator: fn(x)
    if "generator" in params:
        return lambda x, generator: fn(x, generator=generator)
    positional = [p for p in params.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is p.empty]
    if len(required) >= 2:
        if len(required) > 2:
            raise TypeError(f"{name} must take x and optionally a generator, but it requires "
                            f"{[p.name for p in required]}")
        return fn
    return lambda x, generator: fn(x)


class _Call(nn.Module):
    """A plain callable as a module. ``owner`` (the student) is registered so that the
    attack helpers, which look for BatchNorm layers through ``.modules()``, find its layers."""

    def __init__(self, fn: Callable, owner: nn.Module):
        super().__init__()
        self.fn, self.owner = fn, owner

    def forward(self, x):
        return self.fn(x)


def _part(student: nn.Module, value, name: str) -> nn.Module:
    """features= / classifier=: a module, the name of a submodule of the student, or a callable."""
    if isinstance(value, str):
        try:
            return student.get_submodule(value)
        except AttributeError:
            raise ValueError(f"{name}={value!r} is not a submodule of the student") from None
    if isinstance(value, nn.Module):
        owned = {id(p) for p in student.parameters()}
        if any(id(p) not in owned for p in value.parameters()):
            raise ValueError(f"{name} has parameters that are not the student's: it must be a part of the student, "
                             f"so that classifier(features(x)) is student(x)")
        return value
    if callable(value):
        return _Call(value, student)
    raise TypeError(f"{name} must be an nn.Module, a submodule name or a callable, got {type(value).__name__}")


def split_student(student: nn.Module, features, classifier, why: str) -> tuple[nn.Module, nn.Module]:
    """(features, classifier) with ``classifier(features(x)) == student(x)``; by default
    the student's own ``.features`` and ``.classifier``."""
    if (features is None) != (classifier is None):
        raise ValueError("give both features and classifier (classifier(features(x)) must be student(x)), or neither")
    if features is None:
        if not (isinstance(getattr(student, "features", None), nn.Module)
                and isinstance(getattr(student, "classifier", None), nn.Module)):
            raise ValueError(f"{why} needs the student split into features and classifier: pass features= and "
                             f"classifier= (modules of the student, their names, or callables, with "
                             f"classifier(features(x)) == student(x)), or give the student .features and "
                             f".classifier modules")
        return student.features, student.classifier
    return _part(student, features, "features"), _part(student, classifier, "classifier")


class _Net(nn.Module):
    """One forward over the step's batches: the student's logits of each part, and with a
    feature/classifier split also the features and the domain logits of the first
    ``n_domain`` parts after gradient reversal. One module, so that DDP wraps student and
    discriminator together and reduces their gradients in one backward.

    Parts of the same shape and dtype (images, padded token ids of one length) go through
    in one batch, as FixMatch and DANN do (BatchNorm sees source and target together);
    otherwise (token ids padded per batch to different lengths) part by part."""

    def __init__(self, student: nn.Module, features: Optional[nn.Module], classifier: Optional[nn.Module],
                 discriminator: Optional[nn.Module], grl: Optional[nn.Module]):
        super().__init__()
        self.student, self.discriminator, self.grl = student, discriminator, grl
        self.parts = None if features is None else (features, classifier)  # a tuple: not registered twice

    def forward(self, parts: list, n_domain: int = 0, *, head_only: bool = False):
        if head_only:  # logits of (perturbed) features
            return self.parts[1](parts[0])
        sizes = [p.shape[0] for p in parts]
        body = self.student if self.parts is None else self.parts[0]
        if all(p.shape[1:] == parts[0].shape[1:] and p.dtype == parts[0].dtype for p in parts):
            out = body(torch.cat(parts) if len(parts) > 1 else parts[0])
        else:
            out = torch.cat([body(p) for p in parts])
        if self.parts is None:
            return list(out.split(sizes)), None, None
        logits = self.parts[1](out)
        domain = None
        if n_domain:
            rows = sum(sizes[:n_domain])
            domain = self.discriminator(self.grl(out[:rows].flatten(1)))
        return list(logits.split(sizes)), list(out.split(sizes)), domain


def default_discriminator(feature_dim: int, hidden: int = 256) -> nn.Module:
    """DANN's domain classifier: a two-layer MLP on the features, one logit (target = 1)."""
    return nn.Sequential(nn.Linear(feature_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 1))


class CrossDomainTrainer(Loop):
    """Train ``student`` on labeled source and unlabeled target data.

    Every step takes a source batch (x_s, y_s) and, when a target term is on, a target batch
    x_t (its labels, if any, are never read). The loss is CE(student(source(x_s)), y_s)
    plus, for each term in ``terms``, ``weights[term]`` times:

    - ``"kd"``: ``fused_kd_loss(student(weak(x_t)), teacher(weak(x_t)), temperature)``:
      distillation from the teacher on target inputs (Hinton et al. 2015).
    - ``"pseudo"``: FixMatch (Sohn et al. 2020): ``fused_pseudo_label_loss`` on the strong
      view with pseudo-labels from the weak view, masked by ``threshold`` (any module of
      lepton_fast.thresholds, updated every step), after distribution alignment when
      ``distribution_alignment`` (ReMixMatch).
    - ``"domain"``: DANN (Ganin et al. 2016): ``discriminator`` on the student's features
      of source and target, through ``lepton_fast.GradientReversal`` whose λ follows the
      DANN schedule over the run's steps.
    - ``"adversarial"``: adversarial samples on the target with the weak view's
      (thresholded) pseudo-labels: ``"fgsm"`` or ``"pgd"`` (lepton_fast.fgsm/pgd, L∞
      radius ``eps``, bounds ``clamp``) trained with masked cross-entropy, or ``"vat"``
      (lepton_fast.vat_loss, L2 radius ``eps``, no labels). ``perturb="input"`` perturbs
      the (floating) inputs; ``perturb="features"`` perturbs ``features(x)`` and attacks
      ``classifier``, as adversarial training on word embeddings does for text (Miyato
      et al. 2017; VAT there trains the classifier alone: ``vat_loss`` holds its input
      constant).
    - ``"coral"``: Deep CORAL (Sun & Saenko 2016, :func:`~lepton_fast.trainers.alignment.coral_loss`):
      ``‖C_s − C_t‖_F² / (4 d²)`` between the covariances of the source and the weak
      view's ``features`` in the batch. Like "domain" it aligns the feature distributions,
      but by their second moments, with no discriminator and no schedule: use it when DANN
      is unstable or the batches are small for a discriminator. Needs batches of ≥ 2.
    - ``"mcc"``: Minimum Class Confusion (Jin et al. 2020, :func:`~lepton_fast.trainers.alignment.mcc_loss`)
      on the weak view's logits at ``mcc_temperature``: lowers the confusion between pairs
      of classes in the target predictions without picking labels, so it helps where the
      classifier is unsure on the target but not yet right often enough for confident
      pseudo-labels, and it does not favour one class (no collapse to a class).

    ``"pseudo"`` and ``"adversarial"`` start after ``warmup_steps`` source steps: before a
    classifier is any good on the target its confident mistakes become labels.

    Nothing here knows the kind of data: inputs are whatever ``student`` takes (images,
    [N, F] features, int64 token ids [N, L]); views default to the identity.

    Args:
        student: nn.Module, x [N, ...] → logits [N, C].
        terms: a subset of ("kd", "pseudo", "domain", "adversarial", "coral", "mcc"); ()
            trains on the source alone.
        teacher: frozen nn.Module with the same C, for "kd" (and only then).
        weights: {term: weight ≥ 0} for enabled terms, overriding 1.0.
        temperature: KD temperature T > 0, default 1.0 as ``fused_kd_loss`` and
            ``KDLoss`` (the plain KL of the two predictions; Hinton et al. use 1–20).
        threshold: a lepton_fast.thresholds module for "pseudo"/"adversarial" (default
            FixedThreshold(0.95)). Its ``update`` gets each target sample's position in the
            target dataset as ``indices``, so FlexMatch needs only
            ``num_unlabeled=len(target)``.
        distribution_alignment: align weak-view predictions before thresholding (default on).
        alignment_momentum: EMA momentum of the alignment's target class distribution
            (default 0.99: a source classifier's bias on a new domain is large, so the
            estimate must catch up within a hundred steps; USB's 0.999 is for SSL).
        warmup_steps: ≥ 0.
        weak_augment, strong_augment, source_augment: the target's weak and strong views
            and the source batches' view, each a callable ``f(x)`` or ``f(x, generator)``
            on a batch (the generator, seeded and checkpointed by the trainer, is passed
            when ``f`` has a ``generator`` parameter or requires a second argument).
            Default: the identity (``source_augment``: ``weak_augment``). With identity
            views "pseudo" is confidence-thresholded self-training; FixMatch's gain needs
            views that fit the data (``lepton_fast.tasks.digits.weak_view`` / ``strong_view`` for
            the digit images; word dropout or swaps for text).
        features, classifier: the student's split, ``classifier(features(x)) ==
            student(x)``, for "domain", "coral" and ``perturb="features"``: modules of the student,
            names of its submodules (``"encoder"``), or callables. Default: the student's
            ``.features`` and ``.classifier``.
        discriminator: for "domain"; default ``default_discriminator`` on the features'
            width (found on the first sample).
        attack: "fgsm", "pgd" or "vat"; eps > 0 in the perturbed tensor's units;
            pgd_steps ≥ 1.
        clamp: bounds of the perturbed tensor for "fgsm"/"pgd": None (default: no bounds,
            right for any data), a pair of numbers (``(0, 1)`` for images in [0, 1]), or of
            tensors broadcast to the batch (per-channel bounds of normalised images),
            passed unchanged to lepton_fast.fgsm/pgd. A perturbed batch outside the bounds
            is refused with a ValueError.
        perturb: "input" (default) or "features".
        mcc_temperature: T > 0 of the "mcc" term (default 2.5, as Jin et al.).
        optimizer: a torch.optim.Optimizer over the student's (and the discriminator's)
            parameters, or a callable ``params -> Optimizer``; default Adam(lr).
        lr: the default optimizer's learning rate (default 1e-3); not with ``optimizer``.
        scheduler, device, amp, seed, checkpoint, checkpoint_every, progress: as in
            KnowledgeDistiller.

    Checkpoints hold the student, discriminator, GRL step, threshold and alignment state
    ("coral" and "mcc" are functions of the batch: they have none),
    optimiser, scheduler, grad scaler, the data positions and every rank's random
    generators. Under torch.distributed the threshold, alignment and GRL state are global:
    each step gathers the weak-view predictions, pseudo-labels and indices of every rank
    (as USB does) so that every rank updates the same state with the whole global batch.

    Raises:
        ValueError: an unknown term, attack or perturb; "kd" without a teacher;
            temperature ≤ 0; negative weight or warmup; an argument for a term that is not
            on (weights, teacher, threshold, discriminator, features/classifier, clamp,
            mcc_temperature); "domain", "coral" or ``perturb="features"`` without a
            feature/classifier split; "coral" with a batch of one;
            ``clamp`` with "vat". At the start of ``fit``: teacher/student class counts
            that differ, a split that does not give ``student(x)``, no target data for a
            target term (or target data without one), an unlabeled source, a first source
            sample whose label is not one class in [0, C), a threshold's
            ``num_unlabeled`` other than the target's size, an optimizer over other
            parameters, a scheduler over another optimizer, ``perturb="input"`` on integer inputs, inputs outside ``clamp``; a
            weight that is not finite; during ``fit`` (naming the step): inputs holding NaN
            or ±inf, source labels outside [0, C), weak-view logits that the threshold or
            the alignment refuses.
        TypeError: a non-callable augmentation, a malformed ``clamp``, a setting that is
            not a number (a string, a bool); at the start of ``fit``: source or target
            inputs of a dtype the student cannot take, source labels that are not integers.
        FloatingPointError, RuntimeError: as in KnowledgeDistiller (a non-finite loss or
            weights; an unreadable checkpoint or one of another configuration; ``save()``
            before ``fit``). ``save()`` without a path or ``checkpoint``: ValueError.
    """

    def __init__(self, student: nn.Module, *, terms: Sequence[str] = (), teacher: Optional[nn.Module] = None,
                 weights: Optional[dict] = None, temperature: float = 1.0, threshold: Optional[nn.Module] = None,
                 distribution_alignment: bool = True, alignment_momentum: float = 0.99, warmup_steps: int = 0,
                 weak_augment: Optional[Callable] = None, strong_augment: Optional[Callable] = None,
                 source_augment: Optional[Callable] = None, features=None, classifier=None,
                 discriminator: Optional[nn.Module] = None, attack: str = "fgsm", eps: float = 0.1,
                 pgd_steps: int = 3, clamp=None, perturb: str = "input", mcc_temperature: Optional[float] = None,
                 optimizer=None, lr: Optional[float] = None, scheduler=None, device=None, amp: Optional[str] = None,
                 seed: int = 0, checkpoint: Optional[str] = None, checkpoint_every: int = 100,
                 progress: bool = True):
        if isinstance(terms, str):
            terms = (terms,)
        unknown = [t for t in terms if t not in TERMS]
        if unknown:
            raise ValueError(f"terms must be a subset of {TERMS}, got unknown {unknown}")
        self.terms = tuple(dict.fromkeys(terms))
        on = set(self.terms)
        self.weights = dict.fromkeys(self.terms, 1.0)
        for k, w in (weights or {}).items():
            if k not in TERMS:
                raise ValueError(f"weights: unknown term {k!r}; terms are {TERMS}")
            if k not in on:
                raise ValueError(f"weights[{k!r}] is for a term that is not on (terms={self.terms})")
            self.weights[k] = _validate.real(f"weights[{k!r}]", w, 0.0)
        self.perturb = _choice("perturb", perturb, PERTURB)
        self.attack = _choice("attack", attack, ATTACKS)
        split_used = bool({"domain", "coral"} & on) or ("adversarial" in on and self.perturb == "features")
        for name, value, used, by in (
                ("teacher", teacher, "kd" in on, "the 'kd' term"),
                ("threshold", threshold, bool({"pseudo", "adversarial"} & on), "the 'pseudo' and 'adversarial' terms"),
                ("discriminator", discriminator, "domain" in on, "the 'domain' term"),
                ("clamp", clamp, "adversarial" in on, "the 'adversarial' term"),
                ("mcc_temperature", mcc_temperature, "mcc" in on, "the 'mcc' term"),
                ("features/classifier", features if features is not None else classifier, split_used,
                 "the 'domain' and 'coral' terms and the 'adversarial' term with perturb='features'")):
            if value is not None and not used:
                raise ValueError(f"{name} is used by {by} only, which is not on here (terms={self.terms})")
        if "kd" in on:
            if teacher is None:
                raise ValueError("the 'kd' term needs a teacher")
            if not isinstance(teacher, nn.Module):
                raise TypeError(f"teacher must be an nn.Module, got {type(teacher).__name__}")
        self.temperature = _validate.positive_finite("temperature", temperature)
        self.warmup_steps = _validate.integer("warmup_steps", warmup_steps, 0)
        self.eps = _validate.positive_finite("eps", eps)
        self.pgd_steps = _validate.integer("pgd_steps", pgd_steps, 1)
        self.mcc_temperature = _validate.positive_finite(
            "mcc_temperature", MCC_TEMPERATURE if mcc_temperature is None else mcc_temperature)
        if clamp is not None:
            if not (isinstance(clamp, (tuple, list)) and len(clamp) == 2):
                raise TypeError(f"clamp must be None or a pair (min, max) of numbers or tensors, got {clamp!r}")
            if self.attack == "vat":
                raise ValueError("clamp bounds the fgsm/pgd attacks; attack='vat' perturbs within an L2 radius "
                                 "and lepton_fast.vat_loss takes no bounds: use clamp=None")
        self.weak_augment = as_view(weak_augment, "weak_augment")
        self.strong_augment = as_view(strong_augment, "strong_augment")
        self.source_augment = self.weak_augment if source_augment is None else as_view(source_augment,
                                                                                        "source_augment")
        super().__init__(student, optimizer=optimizer, lr=lr, scheduler=scheduler, device=device, amp=amp, seed=seed,
                         checkpoint=checkpoint, checkpoint_every=checkpoint_every, progress=progress)
        self.clamp = None if clamp is None else tuple(
            b.to(self.device) if isinstance(b, Tensor) else b for b in clamp)
        self.features = self.classifier = None
        if split_used:
            why = next((f"the {t!r} term" for t in ("domain", "coral") if t in on), "perturb='features'")
            self.features, self.classifier = split_student(self.student, features, classifier, why)
        self.teacher = None if teacher is None else teacher.to(self.device).eval()
        self._threshold_arg, self._discriminator_arg = threshold, discriminator
        self._use_alignment = bool(distribution_alignment)
        self._alignment_momentum = _validate.in_unit_interval("alignment_momentum", alignment_momentum, open_right=True)
        self.threshold = self.alignment = self.grl = self.discriminator = self.net = None
        self.classes: Optional[int] = None
        self._source = self._target = None
        self.collapse: Optional[str] = None

    # -- set-up at the start of fit ---------------------------------------------------------
    def _setup(self, steps: int, num_classes: int, feature_dim: Optional[int]) -> None:
        """Build the stateful parts once the class count and schedule length are known."""
        if self.net is not None:
            return
        self.classes = num_classes
        if {"pseudo", "adversarial"} & set(self.terms):
            self.threshold = (self._threshold_arg or lepton_fast.thresholds.FixedThreshold(0.95)).to(self.device)
            if self._use_alignment:
                self.alignment = DistributionAlignment(num_classes, self._alignment_momentum).to(self.device)
        owners = {"student": self.student}
        if "domain" in self.terms:
            self.grl = lepton_fast.GradientReversal(total_steps=steps).to(self.device)
            d = self._discriminator_arg
            self.discriminator = (default_discriminator(feature_dim) if d is None else d).to(self.device)
            owners["discriminator"] = self.discriminator
        self._build(owners)
        self.net = _common.wrap_ddp(_Net(self.student, self.features, self.classifier, self.discriminator, self.grl),
                                    self.device)

    def _check_data(self) -> tuple[int, Optional[int]]:
        """Checks on the first samples, before the first step → (classes, feature width)."""
        (x0, y0), (xt0, _) = self._source.first(), (self._target.first() if self._target else (None, None))
        if y0 is None:
            raise ValueError("source must be labeled: (x, y) tensors, or a Dataset / DataLoader of (x, y[, index])")
        x0 = x0.to(self.device)
        classes = (probe_classes(self.teacher, self.student, x0, "source", self.amp) if self.teacher is not None
                   else _common.probe(self.student, x0, "source", "student", self.amp).shape[-1])
        _common.first_labels("source", y0, classes)
        if xt0 is not None:
            _common.probe(self.student, xt0.to(self.device), "target", "student", self.amp)
        feature_dim = None
        if self.features is not None:
            feats = _common.eval_mode_forward(self.features, x0)
            split = _common.eval_mode_forward(self.classifier, feats)
            whole = _common.eval_mode_forward(self.student, x0)
            if split.shape != whole.shape or not torch.allclose(split.float(), whole.float(), rtol=1e-4, atol=1e-5):
                raise ValueError("classifier(features(x)) differs from student(x) on the first source sample: "
                                 "features= and classifier= must split the student's forward")
            feature_dim = feats.flatten(1).shape[1]
        if xt0 is not None and "adversarial" in self.terms and self.perturb == "input":
            if not xt0.is_floating_point():
                raise ValueError(f"the 'adversarial' term perturbs the inputs, but the target inputs are {xt0.dtype} "
                                 f"(token ids?): pass perturb='features' to perturb the features instead")
            self._check_bounds(xt0.to(self.device), "first target sample")
        threshold = self._threshold_arg
        size = getattr(threshold, "num_unlabeled", None)
        if size is not None and self._target is not None and size != len(self._target.dataset):
            raise ValueError(f"threshold has num_unlabeled={size} but the target has {len(self._target.dataset)} "
                             f"samples: build it with num_unlabeled=len(target) (the trainer passes each sample's "
                             f"position in the target as its index)")
        return classes, feature_dim

    def _outside_bounds(self, z: Tensor) -> Tensor:
        lo, hi = self.clamp
        return ((z < lo) | (z > hi)).sum()

    def _check_bounds(self, z: Tensor, what: str) -> None:
        if self.clamp is not None and int(self._outside_bounds(z)):
            raise ValueError(f"clamp={self.clamp}: the {what} batch has values outside the bounds (min "
                             f"{float(z.min()):.4g}, max {float(z.max()):.4g}); pass the bounds of your data "
                             f"(per-channel tensors for normalised images), or clamp=None for unbounded data")

    # -- state ------------------------------------------------------------------------------
    def _modules(self) -> dict:
        mods = {"student": self.student}
        for name in ("discriminator", "grl", "threshold", "alignment"):
            if getattr(self, name) is not None:
                mods[name] = getattr(self, name)
        return mods

    def _streams(self) -> dict:
        return {k: s for k, s in (("source", self._source), ("target", self._target)) if s is not None}

    # -- one step ---------------------------------------------------------------------------
    def _train_step(self) -> dict:
        dev, g = self.device, self.generator
        (xs, ys), _ = self._source.next()
        xs = self.source_augment(xs.to(dev, non_blocking=True), g)
        ys = _validate.class_indices("source", ys, self.classes).to(dev, non_blocking=True)
        parts = [xs]
        warm = self.step < self.warmup_steps
        use = {t: t in self.terms and not (warm and t in ("pseudo", "adversarial")) for t in TERMS}
        if self._target is not None:
            (xt, _), positions = self._target.next()
            xt = xt.to(dev, non_blocking=True)
            xw = self.weak_augment(xt, g)
            parts.append(xw)
            if use["pseudo"]:
                parts.append(self.strong_augment(xt, g))
        logs = {}
        with _common.autocast(dev, self.amp):
            logits, feats, domain_logits = self.net(parts, 2 if use["domain"] else 0)
            loss = F.cross_entropy(logits[0].float(), ys)
            logs["source"] = loss.detach()
            if use["kd"]:
                with torch.no_grad():
                    teacher_logits = self.teacher(xw)
                kd = lepton_fast.fused_kd_loss(logits[1], teacher_logits, self.temperature)
                logs["kd"] = kd.detach()
                loss = loss + self.weights["kd"] * kd
            if use["coral"]:
                coral = coral_loss(feats[0].flatten(1), feats[1].flatten(1))
                logs["coral"] = coral.detach()
                loss = loss + self.weights["coral"] * coral
            if use["mcc"]:
                mcc = mcc_loss(logits[1], self.mcc_temperature)
                logs["mcc"] = mcc.detach()
                loss = loss + self.weights["mcc"] * mcc
            if use["domain"]:
                domains = torch.cat([torch.zeros(xs.shape[0], device=dev), torch.ones(xw.shape[0], device=dev)])
                dann = F.binary_cross_entropy_with_logits(domain_logits.float().squeeze(-1), domains)
                logs["domain"] = dann.detach()
                loss = loss + self.weights["domain"] * dann
            labels = mask = None
            if use["pseudo"] or use["adversarial"]:
                targets, all_targets = self._pseudo_targets(logits[1])
                kwargs = self.threshold.loss_kwargs(targets)
            if use["pseudo"]:
                out = lepton_fast.fused_pseudo_label_loss(logits[2], targets, **kwargs)
                labels, mask = out.labels, out.mask
                self._update_threshold(out, all_targets, positions.to(dev))
                logs["pseudo"], logs["mask"] = out.loss.detach(), out.mask.float().mean()
                loss = loss + self.weights["pseudo"] * out.loss
            if use["adversarial"]:
                z = xw if self.perturb == "input" else feats[1]
                adv = self._adversarial(z, logits[1], targets, kwargs, labels, mask)
                logs["adversarial"] = adv.detach()
                loss = loss + self.weights["adversarial"] * adv
        self._optimize(loss, logs)
        if self.grl is not None:
            self.grl.step()
        logs["loss"] = loss.detach()
        return logs

    def _pseudo_targets(self, weak_logits: Tensor) -> tuple[Tensor, Tensor]:
        """(this rank's targets, every rank's): the weak view's logits, aligned. Alignment
        updates its global state with the whole global batch."""
        weak = weak_logits.detach().float()
        every = _common.gather_rows(weak)
        if self.alignment is None:
            return weak, every
        aligned = self.alignment(every)
        rank = _common.distributed()[0]
        return aligned[rank * weak.shape[0]:(rank + 1) * weak.shape[0]], aligned

    @torch.no_grad()
    def _update_threshold(self, out, all_targets: Tensor, positions: Tensor) -> None:
        """Update the threshold with every rank's pseudo-labels, as one process would with
        the global batch; count the selected classes for the collapse watch."""
        packed = torch.stack([out.labels.double(), out.confidence.double(), out.mask.double(),
                              positions.double()], 1)  # exact: int64 < 2^53, float32 and bool
        every = _common.gather_rows(packed)
        result = lepton_fast.PseudoLabels(every[:, 0].long(), every[:, 1].float(), every[:, 2].bool())
        self.threshold.update(result, weak_logits=all_targets, indices=every[:, 3].long())
        counts = torch.zeros(self.classes, device=every.device).index_add_(0, result.labels, result.mask.float())
        self._watch("counts", counts)

    def _adversarial(self, z: Tensor, weak_logits, targets, kwargs, labels, mask) -> Tensor:
        """The adversarial term on ``z`` (the weak view's inputs or features)."""
        head = self.student if self.perturb == "input" else self.classifier
        base = z.detach()
        if self.attack == "vat":
            return lepton_fast.vat_loss(head, base, eps=self.eps, logits=weak_logits.detach().float(),
                                        generator=self.generator)
        if labels is None:
            selected = _common.select(targets, kwargs)
            labels, mask = selected.labels, selected.mask
        if self.clamp is not None:
            self._watch("outside", self._outside_bounds(base))
        z_adv = self._attack(head, base, labels)
        if self.perturb == "input":
            adv_logits = self.net([z_adv])[0][0]
        else:  # the perturbation added to the features, so that the feature extractor trains too
            adv_logits = self.net([z + (z_adv - base)], head_only=True)
        per_row = F.cross_entropy(adv_logits.float(), labels, reduction="none")
        return (per_row * mask.float()).mean()

    def _attack(self, head: nn.Module, z: Tensor, labels: Tensor) -> Tensor:
        """The "fgsm"/"pgd" perturbation of ``z`` against ``labels`` (BatchNorm statistics frozen)."""
        if self.attack == "fgsm":
            return lepton_fast.fgsm(head, z, labels, self.eps, clamp=self.clamp)
        return lepton_fast.pgd(head, z, labels, self.eps, 2.5 * self.eps / self.pgd_steps, self.pgd_steps,
                               clamp=self.clamp, generator=self.generator)

    # -- checks at the end of each logging window (one host read) ---------------------------
    def _after_window(self, means: dict) -> dict:
        outside, counts = self._window["watch"].get("outside"), self._window["watch"].get("counts")
        if outside is not None and int(outside):
            raise ValueError(f"clamp={self.clamp}: {int(outside)} values of the perturbed batches of the last "
                             f"steps were outside the bounds; pass the bounds of your data, or clamp=None")
        if counts is None:
            return {}
        total = float(counts.sum())
        if total >= 2 * self.classes and float(counts.max()) >= 0.9 * total:
            top = int(counts.argmax())
            first = self.collapse is None
            self.collapse = (f"pseudo-label collapse at step {self.step}: {int(counts.max())}/{int(total)} selected "
                             f"pseudo-labels are class {top}. {self.threshold_state()}")
            if first:
                warnings.warn(self.collapse, RuntimeWarning, stacklevel=4)  # the caller of fit()
            return {"collapse": f"class {top}"}
        return {}

    def threshold_state(self) -> str:
        """The threshold's (and alignment's) state as text, to see why labels were chosen."""
        parts = [repr(self.threshold).replace("\n", " ")] if self.threshold is not None else []
        if self.threshold is not None and hasattr(self.threshold, "class_thresholds"):
            parts.append("class thresholds " + _fmt(self.threshold.class_thresholds()))
        if self.alignment is not None:
            parts.append("aligned p_model " + _fmt(self.alignment.p_model))
        return "; ".join(parts)

    # -- public -----------------------------------------------------------------------------
    def generate_adversarial_samples(self, x: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        """The perturbation that the "adversarial" term trains on, for a batch ``x``.

        Maps to ``lepton_fast.fgsm`` / ``lepton_fast.pgd`` (``attack``) with this trainer's
        ``eps``, ``pgd_steps`` (step 2.5·eps/steps), ``clamp`` and generator, against the
        student (``perturb="input"``) or its ``classifier`` on ``features(x)``
        (``perturb="features"``). The term itself also masks the rows whose pseudo-label
        the threshold rejects; this returns every row.

        Args:
            x: [N, ...] floating inputs as the student takes them (for
                ``perturb="features"`` any input the student takes: token ids too).
            labels: int64 [N] classes to attack; default the student's predictions
                (eval mode).

        Returns the adversarial inputs like ``x`` (``perturb="features"``: adversarial
        features like ``features(x)``), detached.

        Raises:
            ValueError: ``attack="vat"`` (its perturbation is internal to
                ``lepton_fast.vat_loss``, which returns the loss), labels outside the
                classes, inputs outside ``clamp``; the errors of fgsm/pgd.
        """
        if self.attack == "vat":
            raise ValueError("attack='vat' has no samples to return: lepton_fast.vat_loss draws its perturbation "
                             "inside the loss; use attack='fgsm' or 'pgd'")
        head = self.student if self.perturb == "input" else self.classifier
        z = x.to(self.device)
        if self.perturb == "features":
            z = _common.eval_mode_forward(self.features, z)
        elif self.clamp is not None:
            self._check_bounds(z, "given")
        if labels is None:
            labels = _common.eval_mode_forward(head, z).argmax(-1)
        return self._attack(head, z, labels.to(self.device))

    def fit(self, source, target=None, *, steps: Optional[int] = None, epochs: Optional[int] = None,
            batch_size: int = 64, target_batch_size: Optional[int] = None, validation_data=None,
            eval_every: Optional[int] = None) -> dict:
        """Train for ``steps`` optimiser steps or ``epochs`` passes over the source (one
        epoch by default), resuming from ``checkpoint`` if it exists; counted from the
        trainer's first step: after ``fit(steps=100)``, ``fit(steps=150)`` trains 50 more (a
        RuntimeWarning says when there is none to train).

        Args:
            source: labeled data: (x, y) tensors, a Dataset of (x, y[, index]) or a
                DataLoader (its collate_fn, e.g. padding token ids, is kept).
            target: target data in the same forms, labeled or not: a tensor x, (x,), a
                TensorDataset(x), ... (labels and indices, if present, are not read).
                Required when any term is on, refused otherwise.
            batch_size / target_batch_size: per rank (target defaults to batch_size).
            validation_data: labeled data scored every ``eval_every`` steps (default: each
                source epoch) and at the end into ``history["validation"]``.

        Returns the history: ``step``, ``train`` (mean of each loss term, and the mask rate,
        per logging window), ``validation``. When the selected pseudo-labels of a window
        are ≥ 90 % one class, ``trainer.collapse`` holds a message, a RuntimeWarning says
        it and the progress bar shows it.
        """
        if self.terms and target is None:
            raise ValueError(f"terms {self.terms} need target data")
        if target is not None and not self.terms:
            raise ValueError("target data given but no term uses it: pass terms=(...) or leave target out")
        self._source = _common.Batches(source, "source", batch_size, shuffle=True, seed=self.seed, drop_last=True)
        if self.terms:
            self._target = _common.Batches(target, "target", target_batch_size or batch_size, shuffle=True,
                                           seed=self.seed + 1, drop_last=True,
                                           batch_arg="target_batch_size" if target_batch_size else "batch_size")
        total = steps_for(steps, epochs, len(self._source))
        eval_every = len(self._source) if eval_every is None else _validate.integer("eval_every", eval_every, 1)
        classes, feature_dim = self._check_data()
        self._setup(total, classes, feature_dim)
        self.student.train()
        return self._run(total, "+".join(self.terms) or "source", validation_data, eval_every)


def _choice(name: str, value, options) -> str:
    if value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return value


def _fmt(t: Tensor) -> str:
    return "[" + ", ".join(f"{v:.2f}" for v in t.detach().float().cpu().tolist()) + "]"
