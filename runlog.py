"""
Module: a run's log, imported by train.py.

What a run reports as it trains: one JSON record a line in out_dir/log.jsonl and, with --wandb_log=True, the
same records sent to Weights & Biases, an optional install (requirements-wandb.txt). The first process keeps
both. log.jsonl never depends on W&B: each record is written there first, and a tracker that fails (network,
quota) is one warning line, after which the run goes on without it. The checkpoint keeps the W&B run's id, so
a resumed run continues the same W&B run.
"""

import dataclasses
import json
import os
import sys

from system import fail

LOG = "log.jsonl"


def need_wandb(cfg):
    """With --wandb_log=True, stop with one sentence before any work is done when wandb does not import."""
    if not cfg.wandb_log:
        return
    try:
        import wandb  # noqa: F401
    except Exception as e:  # not installed, or broken: either way the same remedy
        fail(f"--wandb_log=True needs Weights & Biases, which does not import here ({said(e)}): pip install -r "
             f"requirements-wandb.txt, or leave wandb_log off")


def said(e):
    """An exception as one short line: its type and the first line of its message."""
    return f"{type(e).__name__}: " + (str(e).strip().splitlines() or [""])[0][:200]


def step(record):
    """The W&B step of a record. W&B keeps one row a step and refuses a step below its last, and at an
    evaluation's iteration log.jsonl holds two records, the training one first: so 2 x iter, plus 1 for an
    evaluation's. The charts plot against iter all the same (RunLog.start makes it their x axis)."""
    return 2 * record.get("iter", 0) + ("train_loss" not in record)


def trim_log(path, iter_num):
    """Drop from the log at path what a run resumed at iter_num will write again: training records after
    iter_num, evaluation records from iter_num on (the resumed run evaluates at its first iteration). Returns
    the W&B step after the last record the log held before: W&B may hold the steps below it already."""
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        lines = f.readlines()
    kept, after = [], 0
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line a kill cut short
            continue
        after = max(after, step(record) + 1)
        if record.get("iter", 0) < iter_num or ("train_loss" in record and record["iter"] == iter_num):
            kept.append(line if line.endswith("\n") else line + "\n")
    if len(kept) < len(lines):
        with open(path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)
    return after


class RunLog:
    """The log of a run, kept by the first process: out_dir/log.jsonl, and the W&B run with --wandb_log=True.
    A new run starts a new log.jsonl; a resumed one drops from it what it will write again (trim_log) and
    continues the W&B run of wandb_id, the id its checkpoint kept, sending only the steps that run lacks: W&B
    cannot drop records, and refuses a step below its last. In the other processes it holds the id alone."""

    def __init__(self, cfg, iter_num, wandb_id, master):
        self.path = os.path.join(cfg.out_dir, LOG)
        self.wandb_id = wandb_id  # saved with every checkpoint; kept as it was when W&B is off now
        self.run, self.sent = None, 0  # the W&B run while it works; the steps below sent it has already
        if not master:
            return
        logged = trim_log(self.path, iter_num) if cfg.init_from == "resume" else 0
        if cfg.init_from != "resume" and os.path.exists(self.path):
            os.remove(self.path)
        if cfg.wandb_log:
            self.guarded(self.start, cfg, logged)

    def start(self, cfg, logged):
        """Open the W&B run: wandb_id's when there is one, else a new one, with the run's settings as its config.
        logged: the W&B step after the last record log.jsonl held before trim_log."""
        import wandb
        self.run = wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name or None, id=self.wandb_id,
                              resume="allow", dir=cfg.out_dir)
        continued, self.wandb_id = self.wandb_id, self.run.id
        if continued:  # what it was sent before, as log.jsonl held it, or as W&B says when it knows more (online)
            self.sent = max(logged, self.run.starting_step)
        self.run.config.update(dataclasses.asdict(cfg), allow_val_change=True)  # a resumed run's init_from, ...
        self.run.define_metric("*", step_metric="iter")

    def write(self, record):
        """One record (a training record every log_interval steps, an evaluation record at every evaluation):
        a line of log.jsonl, then W&B's row at step(record), unless W&B has that step already."""
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.run and step(record) >= self.sent:
            self.guarded(self.run.log, record, step=step(record))

    def finish(self):
        """End the W&B run now, rather than at the interpreter's exit, after the run's last line."""
        if self.run:
            self.guarded(self.run.finish)
            self.run = None

    def guarded(self, call, *args, **kwargs):
        """call(*args, **kwargs), a call to W&B; should it raise, one warning line, and W&B no more this run."""
        try:
            call(*args, **kwargs)
        except Exception as e:
            self.run = None
            print(f"warning: Weights & Biases stopped ({said(e)}); training goes on, and "
                  f"{self.path} keeps every record", file=sys.stderr)
