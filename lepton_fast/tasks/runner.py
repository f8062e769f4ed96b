"""`lepton-fast demo`: cross-domain transfer on the fused ops and trainers, one table.

A task (lepton_fast/tasks/) supplies its data, its model and how each row trains; this runs
it: seeds, processes, the table, --json and --plot. Every task has the same rows, all
scored on the target's held-out test set: the source-only teacher; the target-supervised
bound (the teacher fine-tuned on the labeled adaptation set, the only row that reads target
labels); the student with KD, pseudo-labels, domain-adversarial training or adversarial
samples; and all four together.

Tasks: digits (the default; MNIST -> scikit-learn digits, a LeNet), sentiment (movie ->
Amazon review snippets, downloaded on first use), speech (eSpeak NG voices -> Free Spoken
Digit Dataset speakers, downloaded and synthesised on first use), or all three in turn.

Execution: the teacher of a seed trains first; the other rows start from it and do not
depend on each other, so they run in parallel processes (--jobs, by default the cores this
process may use), each with --threads torch threads (default 1). Every row seeds its own
trainer, so its numbers do not depend on --jobs or on the order the rows run in: --jobs 1
gives the same table. They do depend on the thread count, the CPU's instruction set and the
versions of torch and lepton_fast (other roundings).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import copy
import functools
import json
import multiprocessing
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Optional

import torch

from lepton_fast.tasks import TASKS, get_task
from lepton_fast.tasks.base import ADAPTED, ROW_TERMS, ROWS, TEACHER, UPPER, Data


# -- one row -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Settings:
    task: str
    source_steps: int
    adapt_steps: int
    batch_size: int
    eval_every: int
    device: str
    amp: Optional[str]
    threads: int


@functools.lru_cache(maxsize=None)
def _data(task: str, progress: bool = True) -> Data:
    if task in _received:
        return _received[task]
    return get_task(task).load(progress)  # once per process; progress: a download's bar


_received: dict = {}  # a worker's data, as the main process loaded it


def _receive(task: str, data) -> None:
    """A worker's initializer: the data the main process loaded and checked (so that no
    worker downloads, synthesises or fails on its own)."""
    _received[task] = data


def run_row(settings: Settings, seed: int, row: str, teacher_state: Optional[dict], progress: bool) -> dict:
    """Train and score one row of one seed; returns its figures (and the teacher's weights
    for the teacher row). Runs the same in this process or in a worker."""
    from lepton_fast.trainers import CrossDomainTrainer

    if settings.device == "cpu" and settings.threads:
        torch.set_num_threads(settings.threads)
    task, data = get_task(settings.task), _data(settings.task, progress)
    torch.manual_seed(seed)
    model = task.model()
    terms = ROW_TERMS.get(row, ())
    kwargs = task.trainer_kwargs(row, data)
    if row != TEACHER:
        model.load_state_dict(teacher_state)  # the bound (and, by default, every row) starts from the teacher
        if "kd" in terms and "teacher" not in kwargs:
            teacher = copy.deepcopy(model).eval()
            kwargs["teacher"] = teacher if task.kd_teacher is None else task.kd_teacher(teacher, data)
        if task.fresh_students and row != UPPER:
            torch.manual_seed(seed + 1)
            model = task.model()
    steps, lr = {TEACHER: (settings.source_steps, task.teacher_lr),
                 UPPER: (settings.adapt_steps, task.teacher_lr)}.get(row, (settings.adapt_steps, task.adapt_lr))
    if "warmup_steps" in kwargs:  # a short run (--quick, --adapt-steps) still reaches every term
        kwargs["warmup_steps"] = min(kwargs["warmup_steps"], steps // 2)
    t0, cpu0 = time.perf_counter(), time.process_time()
    trainer = CrossDomainTrainer(model, terms=terms, optimizer=task.optimizer(lr),
                                 device=settings.device, amp=settings.amp, seed=seed, progress=progress, **kwargs)
    with warnings.catch_warnings():  # the table reports collapses itself, after the rows
        warnings.filterwarnings("ignore", "pseudo-label collapse", RuntimeWarning)
        history = trainer.fit(data.adapt if row == UPPER else data.source, data.adapt if terms else None,
                              steps=steps, batch_size=settings.batch_size, validation_data=data.test,
                              eval_every=settings.eval_every)
    final = history["validation"][-1]
    out = {"accuracy": final["accuracy"], "macro_recall": final["macro_recall"], "macro_f1": final["macro_f1"],
           "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - cpu0,
           "curve": [(v["step"], v["accuracy"]) for v in history["validation"]], "collapse": trainer.collapse,
           "from_teacher": row == UPPER or (row != TEACHER and not task.fresh_students)}
    return {"row": out, "teacher_state": model.state_dict() if row == TEACHER else None}


# -- every row of every seed ---------------------------------------------------------------
def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _report(seed: int, row: str, out: dict, log) -> None:
    if out["collapse"]:
        log(f"[seed {seed}] {row}: {out['collapse']}")
    log(f"[seed {seed}] {row:<26} accuracy {100 * out['accuracy']:6.2f} %  ({out['seconds']:.0f} s)")


def run(settings: Settings, seeds: list[int], jobs: int, progress: bool, log=_log) -> list[dict]:
    """Every row of every seed → [{row: figures}] per seed, rows in table order. With
    ``jobs`` > 1 the rows run in that many processes (spawned: each imports torch afresh)
    and ``progress`` shows one bar of finished rows here instead of each trainer's bar.

    Raises:
        DataUnavailable: the task's data cannot be had (loaded here first, before any worker
            starts, so that the message is not lost in a worker's traceback).
    """
    task = get_task(settings.task)
    data = _data(settings.task, progress)  # downloads (with its bar) and checks once, here
    rows = sorted(ROWS[1:], key=lambda r: -task.cost.get(r, 1))
    results = {seed: {} for seed in seeds}
    if jobs == 1:
        for seed in seeds:
            teacher = run_row(settings, seed, TEACHER, None, progress)
            results[seed][TEACHER] = teacher["row"]
            _report(seed, TEACHER, teacher["row"], log)
            for row in rows:
                results[seed][row] = run_row(settings, seed, row, teacher["teacher_state"], progress)["row"]
                _report(seed, row, results[seed][row], log)
        return [{row: results[seed][row] for row in ROWS} for seed in seeds]
    from tqdm.auto import tqdm

    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=_receive, initargs=(settings.task, data)) as pool, \
            tqdm(total=len(seeds) * len(ROWS), desc=f"{settings.task}: rows done", unit="row",
                 disable=not progress, leave=False) as bar:
        if progress and log is _log:  # lines above the bar, not through it
            log = functools.partial(bar.write, file=sys.stderr)
        log(f"{settings.task}: {len(seeds)} teacher(s) first ({settings.source_steps} steps), then "
            f"{len(ROWS) - 1} rows per seed ({settings.adapt_steps} steps each) in {jobs} processes")
        pending = {pool.submit(run_row, settings, seed, TEACHER, None, False): (seed, TEACHER) for seed in seeds}
        for _ in range(jobs - len(seeds)):  # start every worker now: it imports torch while teachers train
            pool.submit(int)
        while pending:
            # a short timeout: the bar's clock keeps moving while the rows train
            done, _ = concurrent.futures.wait(pending, timeout=1.0, return_when=concurrent.futures.FIRST_COMPLETED)
            bar.refresh()
            for future in done:
                seed, row = pending.pop(future)
                out = future.result()
                results[seed][row] = out["row"]
                bar.update(1)
                _report(seed, row, out["row"], log)
                if row == TEACHER:
                    for r in rows:
                        pending[pool.submit(run_row, settings, seed, r, out["teacher_state"], False)] = (seed, r)
    return [{row: results[seed][row] for row in ROWS} for seed in seeds]


def summarize(per_seed: list[dict]) -> dict:
    table = {}
    for name in per_seed[0]:
        row = {}
        for metric in ("accuracy", "macro_recall", "macro_f1", "seconds", "cpu_seconds"):
            values = [r[name][metric] for r in per_seed]
            row[metric] = {"mean": statistics.fmean(values),
                           "std": statistics.stdev(values) if len(values) > 1 else 0.0, "values": values}
        table[name] = row
    return table


def format_table(table: dict, seeds: list[int], test_set: str) -> str:
    pm = len(seeds) > 1
    head = f"{'row':<27}{'accuracy':>16}{'macro recall':>16}{'macro F1':>16}{'seconds':>10}"
    lines = [f"target test set: {test_set}; mean ± std over seeds {seeds}" if pm
             else f"target test set: {test_set}; seed {seeds[0]}", head, "-" * len(head)]
    for name, row in table.items():
        cells = []
        for metric in ("accuracy", "macro_recall", "macro_f1"):
            m, s = 100 * row[metric]["mean"], 100 * row[metric]["std"]
            cells.append(f"{m:6.2f} ± {s:4.2f}" if pm else f"{m:6.2f}")
        lines.append(f"{name:<27}" + "".join(f"{c:>16}" for c in cells) + f"{row['seconds']['mean']:>10.1f}")
    return "\n".join(lines)


def curves(per_seed: list[dict]) -> dict:
    """{row: (steps, mean accuracy, std)} over the seeds. The rows that start from the
    teacher start at step 0 with the teacher's accuracy (same weights)."""
    out = {}
    for name in per_seed[0]:
        per = [[(0, r[TEACHER]["accuracy"])] + r[name]["curve"] if r[name].get("from_teacher", name != TEACHER)
               else r[name]["curve"] for r in per_seed]
        steps = [s for s, _ in per[0]]
        accs = [[c[i][1] for c in per] for i in range(len(steps))]
        out[name] = (steps, [statistics.fmean(a) for a in accs],
                     [statistics.stdev(a) if len(a) > 1 else 0.0 for a in accs])
    return out


def plot(per_seed: list[dict], seeds: list[int], title: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, (steps, mean, std) in curves(per_seed).items():
        (line,) = ax.plot(steps, [100 * m for m in mean], marker=".", label=name)
        if len(seeds) > 1:
            ax.fill_between(steps, [100 * (m - s) for m, s in zip(mean, std)],
                            [100 * (m + s) for m, s in zip(mean, std)], color=line.get_color(), alpha=0.15, lw=0)
    spread = "; band: ± 1 std" if len(seeds) > 1 else ""
    ax.set_title(f"{title}\nlines: mean over seeds {seeds}{spread}", fontsize=10)
    ax.set_xlabel("training step (the teacher's are source steps; a row drawn from step 0 starts from the teacher)")
    ax.set_ylabel("target test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- command line --------------------------------------------------------------------------
def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _at_least(minimum: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


def _task_defaults(attr: str) -> str:
    return ", ".join(f"{name} {getattr(get_task(name), attr)}" for name in TASKS)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", choices=(*TASKS, "all"), default="digits",
                   help="which transfer: digits = MNIST -> scikit-learn digits; sentiment = movie -> Amazon review "
                        "snippets; speech = eSpeak NG voices -> recorded speakers saying digits (sentiment and "
                        "speech download their data on first use); all = the three in turn (default: digits)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per seed; mean ± std (default: 0)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--amp", choices=["bf16", "fp16"], default=None,
                   help="torch.autocast dtype; fp16 needs CUDA (default: none, float32)")
    p.add_argument("--source-steps", type=_at_least(1), default=None,
                   help=f"the teacher's steps on the source (default: {_task_defaults('source_steps')})")
    p.add_argument("--adapt-steps", type=_at_least(1), default=None,
                   help=f"steps of each adapted row and of the bound (default: {_task_defaults('adapt_steps')})")
    p.add_argument("--batch-size", type=_at_least(1), default=None,
                   help=f"source and target batch size (default: {_task_defaults('batch_size')})")
    p.add_argument("--eval-every", type=_at_least(1), default=None,
                   help=f"steps between target-test points of the curve (default: {_task_defaults('eval_every')})")
    p.add_argument("--jobs", type=_at_least(1), default=None,
                   help=f"rows run in this many parallel processes (default: the cores this process may use, "
                        f"here {usable_cores()}; the numbers do not depend on it)")
    p.add_argument("--threads", type=_at_least(0), default=1,
                   help="torch threads per process on CPU; the numbers depend on it (default: 1: the demo's small "
                        "models gain little from a second thread; 0 = torch's choice)")
    p.add_argument("--quick", action="store_true", help="a few steps per row: checks the pipeline, not accuracy")
    p.add_argument("--json", metavar="PATH", help="write every figure (per seed and mean ± std) as JSON; with "
                                                  "--task all, one file per task: PATH with the task's name inserted")
    p.add_argument("--plot", metavar="PATH",
                   help="save a PNG of target accuracy against step for each row (mean over seeds, ± 1 std band); "
                        "with --task all, one per task as for --json")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (download, rows done, and with --jobs 1 each row's steps)")


def _check_output(parser, option: str, path: Optional[str]) -> None:
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        parser.error(f"{option} {path}: is a folder; give a file path")
    if not os.path.isdir(folder):
        parser.error(f"{option} {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        parser.error(f"{option} {path}: the folder {folder} is not writable")


def check_arguments(args, parser) -> None:
    """Refuse, as one-line usage errors, what would otherwise fail after the run started."""
    args.task_specs = [get_task(name) for name in (TASKS if args.task == "all" else [args.task])]
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        parser.error(f"--device {args.device}: {e}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device is available here (torch {torch.__version__}, "
                     f"CUDA build {torch.version.cuda or 'none'}); use --device cpu")
    if args.amp == "fp16" and device.type != "cuda":
        parser.error("--amp fp16 needs --device cuda; on CPU use --amp bf16 or leave --amp out")
    _check_output(parser, "--json", args.json)
    _check_output(parser, "--plot", args.plot)


def _per_task(path: Optional[str], task: str, several: bool) -> Optional[str]:
    if path is None or not several:
        return path
    root, ext = os.path.splitext(path)
    return f"{root}-{task}{ext}"


def main(args) -> int:
    """Run the chosen task(s) and print each table; 0 on success.

    Raises:
        DataUnavailable: a task's data cannot be had (the CLI prints the message and exits 1).
    """
    several = len(args.task_specs) > 1
    for task in args.task_specs:
        run_task(task, args, _per_task(args.json, task.name, several), _per_task(args.plot, task.name, several))
    return 0


def run_task(task, args, json_path: Optional[str], plot_path: Optional[str]) -> None:
    if args.quick:
        source_steps, adapt_steps, eval_every = 6, 3, 3
    else:
        source_steps = args.source_steps or task.source_steps
        adapt_steps = args.adapt_steps or task.adapt_steps
        eval_every = args.eval_every or task.eval_every
    settings = Settings(task=task.name, source_steps=source_steps, adapt_steps=adapt_steps,
                        batch_size=args.batch_size or task.batch_size, eval_every=eval_every, device=args.device,
                        amp=args.amp, threads=args.threads)
    jobs = min(args.jobs or usable_cores(), len(args.seeds) * (len(ROWS) - 1))
    threads = torch.get_num_threads()
    t0 = time.perf_counter()
    try:
        per_seed = run(settings, args.seeds, jobs, progress=not args.no_progress)
    finally:
        torch.set_num_threads(threads)
    table = summarize(per_seed)
    print(format_table(table, args.seeds, task.test_set))
    adapted = {n: table[n]["accuracy"]["mean"] for n in ADAPTED}
    best = max(adapted, key=adapted.get)
    gap = 100 * (table[UPPER]["accuracy"]["mean"] - adapted[best])
    side = "below" if gap >= 0 else "above"
    if args.quick:  # a few steps per row: no row has learned anything worth ranking
        print(f"--quick: every row ran (its figures mean nothing); total {time.perf_counter() - t0:.0f} s wall, "
              f"{jobs} process(es)")
    else:
        print(f"best adapted student: {best} {100 * adapted[best]:.2f} % ({abs(gap):.2f} points {side} the "
              f"target-supervised bound); total {time.perf_counter() - t0:.0f} s wall, {jobs} process(es)")
    collapses = [(seed, name, row["collapse"]) for seed, r in zip(args.seeds, per_seed)
                 for name, row in r.items() if row["collapse"]]
    if collapses:
        print("pseudo-label collapse: in these rows, at some step 90 % or more of the selected pseudo-labels were "
              "one class (the trainer's warning); the row's number is what training gave despite it:")
        for seed, name, text in collapses:
            print(f"  seed {seed}, {name}: {text}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"task": task.name, "seeds": args.seeds, "quick": args.quick, "source_steps": source_steps,
                       "adapt_steps": adapt_steps, "batch_size": settings.batch_size, "device": args.device,
                       "threads": args.threads, "jobs": jobs, "table": table, "per_seed": per_seed}, f, indent=1)
    if plot_path:
        plot(per_seed, args.seeds, task.title, plot_path)
