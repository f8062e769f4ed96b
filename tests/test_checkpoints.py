"""Trainer checkpoints that a run can trust: a checksum verified on load, one clear error for
a broken file, durable writes, a save on SIGINT/SIGTERM, exact resumes with DataLoader
workers that draw random numbers, the same history, and a refused batch size."""
import os
import re
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from lepton_fast import thresholds
from lepton_fast.trainers import CrossDomainTrainer, KnowledgeDistiller
from lepton_fast.trainers import _common
from test_trainers import C, FLEX, SOURCE, TARGET, Tiny, _assert_same, _interrupt_at, _state, make

pytest.importorskip("torchmetrics")
pytest.importorskip("tqdm")

TRAINERS = ["cross_domain", "distiller"]


def _trainer(kind, **kw):
    if kind == "cross_domain":
        return make(("pseudo",), threshold=thresholds.FlexMatchThreshold(C, **FLEX), **kw)
    torch.manual_seed(0)
    return KnowledgeDistiller(Tiny(), Tiny(), temperature=2.0, device="cpu", progress=False, **kw)


def _fit(trainer, steps, batch_size=16):
    if isinstance(trainer, CrossDomainTrainer):
        return trainer.fit(SOURCE, TARGET, steps=steps, batch_size=batch_size)
    return trainer.fit(SOURCE, steps=steps, batch_size=batch_size)


def _written(tmp_path, kind="cross_domain"):
    path = str(tmp_path / "run.pt")
    trainer = _trainer(kind, checkpoint=path)
    _fit(trainer, 2)
    return path, trainer


# -- integrity --------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", TRAINERS)
def test_a_flipped_bit_in_the_weights_is_an_error_naming_the_file(tmp_path, kind):
    path, trainer = _written(tmp_path, kind)
    weight = trainer.student.classifier.weight.detach()
    data = bytearray(open(path, "rb").read())
    at = data.find(weight.numpy().tobytes())
    assert at > 0  # the stored weights, byte for byte
    data[at + 2] ^= 0x40  # one exponent bit of the first weight: -0.33 becomes about -1e38
    open(path, "wb").write(bytes(data))
    with pytest.raises(RuntimeError, match=r"run\.pt' cannot be read: its checksum does not match.*delete it"):
        _fit(_trainer(kind, checkpoint=path), 3)


@pytest.mark.parametrize("damage, why", [
    (lambda data: b"", "it is empty"),
    (lambda data: data[: len(data) // 2], "its checksum does not match"),
    (lambda data: data[:20], "it is not a lepton_fast trainer checkpoint"),
    (lambda data: b"\x80\x02garbage" * 100, "it is not a lepton_fast trainer checkpoint"),
    (lambda data: _plain_torch_save(), "it is not a lepton_fast trainer checkpoint"),
], ids=["empty", "truncated", "cut-in-the-header", "garbage", "plain-torch-save"])
def test_a_broken_file_gives_one_clear_error(tmp_path, damage, why):
    path, _ = _written(tmp_path)
    data = open(path, "rb").read()
    open(path, "wb").write(damage(data))
    expected = rf"checkpoint '{re.escape(path)}' cannot be read: {why}.*delete it .*start the run over, or put back"
    with pytest.raises(RuntimeError, match=expected):
        _fit(_trainer("cross_domain", checkpoint=path), 3)


def _plain_torch_save():
    import io

    buffer = io.BytesIO()
    torch.save({"step": 1}, buffer)
    return buffer.getvalue()


# -- durable writes ---------------------------------------------------------------------------
def test_the_write_is_fsynced_then_replaced_then_the_folder_fsynced(tmp_path, monkeypatch):
    path = str(tmp_path / "c.pt")
    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", "dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "file"))
        real_fsync(fd)

    def replace(a, b):
        events.append(("replace", os.path.basename(a)))
        real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    _common.save_checkpoint({"step": 1}, path)
    assert events == [("fsync", "file"), ("replace", f"c.pt.tmp{os.getpid()}"), ("fsync", "dir")]
    assert _common.load_checkpoint(path) == {"step": 1}


def test_an_interrupted_write_keeps_the_previous_checkpoint_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = str(tmp_path / "c.pt")
    _common.save_checkpoint({"step": 1}, path)

    def killed(fd):
        raise KeyboardInterrupt  # Ctrl-C while the bytes go to disk

    monkeypatch.setattr(os, "fsync", killed)
    with pytest.raises(KeyboardInterrupt):
        _common.save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["c.pt"]
    assert _common.load_checkpoint(path) == {"step": 1}


def test_temporaries_of_killed_writers_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid is free now
    path = str(tmp_path / "run.pt")
    for pid in (dead.pid, os.getppid()):  # a killed writer's; a living process's (left alone)
        open(f"{path}.tmp{pid}", "wb").write(b"half a checkp")
    open(tmp_path / "run.pt.tmp-notes", "w").write("not ours")
    _common.save_checkpoint({"step": 3}, path)
    assert sorted(os.listdir(tmp_path)) == sorted(["run.pt", f"run.pt.tmp{os.getppid()}", "run.pt.tmp-notes"])


# -- signals ----------------------------------------------------------------------------------
@pytest.fixture
def sigint_default():
    """SIGINT as an interactive Python process has it. A job that a non-interactive shell
    starts in the background (`cmd &`) inherits SIGINT ignored, and the trainers leave an
    ignored signal ignored (test_an_ignored_signal_stays_ignored), so the SIGINT tests set
    Python's default handler themselves."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _signal_at(trainer, step, signum):
    """Send ``signum`` to this process during training step ``step``."""
    real, calls = trainer._train_step, []

    def step_with_signal():
        calls.append(1)
        if len(calls) == step:
            signal.raise_signal(signum)
        return real()

    trainer._train_step = step_with_signal


@pytest.mark.parametrize("kind", TRAINERS)
def test_sigint_saves_the_step_then_raises_keyboard_interrupt_and_a_resume_is_exact(tmp_path, kind, sigint_default):
    straight = _trainer(kind)
    _fit(straight, 6)
    path = str(tmp_path / "run.pt")
    before = signal.getsignal(signal.SIGINT)
    first = _trainer(kind, checkpoint=path, checkpoint_every=4)
    _signal_at(first, 3, signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        _fit(first, 6)
    assert signal.getsignal(signal.SIGINT) is before  # the handlers are the caller's again
    assert _common.load_checkpoint(path)["step"] == 3  # not step 0: the interrupted step was saved
    resumed = _trainer(kind, checkpoint=path)
    assert _fit(resumed, 6) == straight.history
    _assert_same(_state(straight), _state(resumed))


def test_sigterm_saves_then_reaches_the_previous_handler(tmp_path):
    path = str(tmp_path / "run.pt")
    received = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        trainer = _trainer("cross_domain", checkpoint=path, checkpoint_every=100)
        _signal_at(trainer, 2, signal.SIGTERM)
        _fit(trainer, 5)
        assert received == [signal.SIGTERM] and trainer.step == 2
        assert _common.load_checkpoint(path)["step"] == 2
        assert signal.getsignal(signal.SIGTERM) is not None and signal.getsignal(signal.SIGTERM).__name__ == "<lambda>"
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_sigterm_with_the_default_handler_terminates_after_the_save(tmp_path):
    # As a scheduler's kill does: the process ends with SIGTERM, and the step it reached is saved.
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_checkpoints import _trainer, _fit, _signal_at
        trainer = _trainer("cross_domain", checkpoint={str(tmp_path / "run.pt")!r})
        _signal_at(trainer, 3, signal.SIGTERM)
        _fit(trainer, 6)
        print("not reached")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGTERM, done.stderr
    assert "not reached" not in done.stdout
    assert _common.load_checkpoint(str(tmp_path / "run.pt"))["step"] == 3


def test_a_second_sigint_stops_at_once_and_handlers_exist_only_during_fit(tmp_path, sigint_default):
    path = str(tmp_path / "run.pt")
    before = signal.getsignal(signal.SIGINT)
    trainer = _trainer("cross_domain", checkpoint=path, checkpoint_every=100)
    real, during = trainer._train_step, []

    def twice():
        during.append(signal.getsignal(signal.SIGINT))
        if len(during) == 2:
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)  # impatient: no save, KeyboardInterrupt now
            raise AssertionError("not reached")
        return real()

    trainer._train_step = twice
    with pytest.raises(KeyboardInterrupt):
        _fit(trainer, 5)
    assert during[0] is not before and signal.getsignal(signal.SIGINT) is before
    assert trainer.step == 1 and not os.path.exists(path)


def test_an_ignored_signal_stays_ignored(tmp_path):
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        trainer = _trainer("cross_domain", checkpoint=str(tmp_path / "run.pt"))
        _signal_at(trainer, 2, signal.SIGTERM)
        _fit(trainer, 4)
        assert trainer.step == 4 and signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous)


# -- what a resume restores -------------------------------------------------------------------
class RandomCrops(Dataset):
    """Draws random numbers in __getitem__ (a random augmentation inside the Dataset)."""

    def __len__(self):
        return len(SOURCE[1])

    def __getitem__(self, i):
        x, y = SOURCE[0][i], SOURCE[1][i]
        return (x + 0.1 * torch.rand(x.shape)).clamp(0, 1), y


@pytest.mark.parametrize("workers", [0, 2])
def test_a_dataset_drawing_random_numbers_resumes_exactly_with_workers(tmp_path, workers):
    def data():
        return DataLoader(RandomCrops(), batch_size=16, num_workers=workers)

    straight = make(())
    straight.fit(data(), steps=7)
    path = str(tmp_path / "run.pt")
    first = make((), checkpoint=path, checkpoint_every=3)
    _interrupt_at(first, 6)  # resumes at step 4: batch 3 of epoch 0, loaded by worker 1 in the straight run
    with pytest.raises(KeyboardInterrupt):
        first.fit(data(), steps=7)
    resumed = make((), checkpoint=path)
    resumed.fit(data(), steps=7)
    _assert_same(_state(straight), _state(resumed))
    assert resumed.history == straight.history


def _watched(trainer):
    """Record the tallies each logging window's checks read (pseudo-label counts, labeled rows)."""
    seen, real = [], trainer._after_window

    def after_window(means):
        seen.append((trainer.step, {k: v.tolist() for k, v in trainer._window["watch"].items()}))
        return real(means)

    trainer._after_window = after_window
    return seen


@pytest.mark.parametrize("kind", TRAINERS)
def test_the_history_of_a_resumed_run_is_the_uninterrupted_one(tmp_path, kind):
    straight = _trainer(kind)
    straight.log_every = 3
    straight_watch = _watched(straight)
    _fit(straight, 8)
    assert straight.history["step"] == [3, 6, 8]
    path = str(tmp_path / "run.pt")
    first = _trainer(kind, checkpoint=path, checkpoint_every=4)  # saved mid-window, at step 4
    first.log_every = 3
    _interrupt_at(first, 6)
    with pytest.raises(KeyboardInterrupt):
        _fit(first, 8)
    resumed = _trainer(kind, checkpoint=path)
    resumed.log_every = 3
    resumed_watch = _watched(resumed)
    assert _fit(resumed, 8) == straight.history
    # the window's checks (collapse watch, all-ignored labels) see the whole window too
    assert resumed_watch == straight_watch[1:] and straight_watch[1][1]


@pytest.mark.parametrize("kind", TRAINERS)
def test_a_checkpoint_of_another_batch_size_is_refused(tmp_path, kind):
    path, _ = _written(tmp_path, kind)
    with pytest.raises(RuntimeError, match=r"run\.pt.*the checkpoint's (source|train_data) batches hold 16 samples "
                                           r"and this run's 8, so it would resume at another sample: resume with "
                                           r"batch_size=16$"):
        _fit(_trainer(kind, checkpoint=path), 4, batch_size=8)


@pytest.mark.parametrize("kind", TRAINERS)
def test_a_checkpoint_of_another_seed_is_refused(tmp_path, kind):
    """Another seed shuffles the epoch under way another way: the resumed epoch would see some
    samples twice and others never ('break10': 19 of 80 each)."""
    path, _ = _written(tmp_path, kind)
    with pytest.raises(RuntimeError, match=r"the checkpoint's (source|train_data) order was shuffled with seed 0 and "
                                           r"this run's with seed 1, so it would resume at another sample: resume "
                                           r"with seed=0$"):
        _fit(_trainer(kind, checkpoint=path, seed=1), 4)


@pytest.mark.parametrize("kind", TRAINERS)
@pytest.mark.parametrize("change,message", [
    (dict(optimizer=lambda p: torch.optim.SGD(p, lr=0.1)),  # torch's loading took Adam's groups: KeyError at step 3
     r"the checkpoint's optimizer is torch\.optim\.adam\.Adam and this run's torch\.optim\.sgd\.SGD: resume with the "
     r"same optimizer$"),
    (dict(scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1)),  # it would start over
     r"the checkpoint's scheduler is None and this run's torch\.optim\.lr_scheduler\.StepLR: resume with the same "
     r"scheduler$"),
])
def test_a_checkpoint_of_another_optimizer_or_scheduler_is_refused(tmp_path, kind, change, message):
    path, _ = _written(tmp_path, kind)
    trainer = _trainer(kind, checkpoint=path, **change)
    with pytest.raises(RuntimeError, match=r"another configuration .* nothing was changed.*" + message):
        _fit(trainer, 4)
    assert trainer.step == 0


@pytest.mark.parametrize("kind", TRAINERS)
def test_save_before_fit_or_without_a_path_is_a_clear_error(tmp_path, kind):
    """Before fit a checkpoint has no data position, and the distiller's was refused on resume
    as 'another configuration'; the cross-domain trainer's save raised AttributeError."""
    trainer = _trainer(kind, checkpoint=str(tmp_path / "run.pt"))
    with pytest.raises(RuntimeError, match=r"^save\(\) before fit\(\)"):
        trainer.save()
    assert not os.listdir(tmp_path)
    trainer = _trainer(kind)
    _fit(trainer, 1)
    with pytest.raises(ValueError, match=r"^save\(\) needs a path"):
        trainer.save()
    trainer.save(str(tmp_path / "other.pt"))
    assert _common.load_checkpoint(str(tmp_path / "other.pt"))["step"] == 1


def test_a_refused_resume_changes_nothing_and_deleting_the_file_starts_over(tmp_path):
    # The checkpoint has no discriminator: loading it had replaced the student's weights and
    # the step before it failed, so the "start over" the error advises resumed them silently.
    path, _ = _written(tmp_path)
    trainer = make(("pseudo", "domain"), threshold=thresholds.FlexMatchThreshold(C, **FLEX), checkpoint=path)
    weights = {k: v.clone() for k, v in trainer.student.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"another configuration .* nothing was changed.*'discriminator'"):
        _fit(trainer, 4)
    _assert_same(trainer.student.state_dict(), weights)
    assert trainer.step == 0 and trainer.history["step"] == []
    os.remove(path)
    assert _fit(trainer, 4)["step"] == [4]  # from step 0


@pytest.mark.parametrize("kind", TRAINERS)
def test_no_checkpoint_holds_non_finite_weights(tmp_path, kind):
    path, trainer = _written(tmp_path, kind)
    with torch.no_grad():
        trainer.student.classifier.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"student\.classifier\.weight hold NaN.*no checkpoint is written"):
        trainer.save()
    assert _common.load_checkpoint(path)["step"] == 2  # the good one is kept
    assert torch.isfinite(_common.load_checkpoint(path)["modules"]["student"]["classifier.weight"]).all()


def test_a_checkpoint_of_another_data_size_is_refused(tmp_path):
    path, _ = _written(tmp_path, "distiller")
    trainer = _trainer("distiller", checkpoint=path)
    with pytest.raises(RuntimeError, match=r"the checkpoint's train_data data has 64 samples and this run's 48, so it "
                                           r"would resume at another sample: resume with the same train_data data$"):
        trainer.fit((SOURCE[0][:48], SOURCE[1][:48]), steps=4, batch_size=16)
