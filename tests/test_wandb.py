"""--wandb_log=True: the records of log.jsonl sent to Weights & Biases, in offline mode only (no account, no
server), read back from W&B's own files; a resumed run continues the same W&B run; wandb missing is one
sentence, and a tracker that fails is one warning line while training and log.jsonl go on."""

import glob
import importlib.util
import json
import os
import signal
import struct
import sys
import zlib

import warm
from conftest import ROOT, TINY
from test_train import assert_one_sentence_error, read_log
from test_trust import logged_iters, resume_command, wait_for

sys.path.insert(0, ROOT)
import checkpoint  # noqa: E402
import runlog  # noqa: E402
from settings import Settings  # noqa: E402

WANDB = ["--wandb_log=True", "--wandb_project=p", "--wandb_run_name=n"]

# a stand-in for wandb, put first on PYTHONPATH: every call is written to calls.jsonl beside it, and the
# log() call numbered FAKE_WANDB_FAIL_AT fails as a tracker whose quota ran out
FAKE = '''
import json, os
CALLS = os.path.join(os.path.dirname(__file__), "calls.jsonl")


def note(*call):
    with open(CALLS, "a") as f:
        f.write(json.dumps(call) + "\\n")


class Config:
    def update(self, values, allow_val_change=False):
        note("config", values)


class Run:
    starting_step, config, logs = 0, Config(), 0

    def __init__(self, id):
        self.id = id or "fake0001"

    def define_metric(self, name, step_metric=None):
        note("define_metric", name, step_metric)

    def log(self, record, step=None):
        Run.logs += 1
        if Run.logs == int(os.environ.get("FAKE_WANDB_FAIL_AT", 0)):
            raise ConnectionError("quota exceeded\\nthe rest of a long message")
        note("log", record, step)

    def finish(self):
        note("finish")


def init(**kwargs):
    note("init", kwargs)
    return Run(kwargs["id"])
'''


def environment(tmp_path, **extra):
    """The environment of a train.py here: W&B offline, its caches in tmp_path, no key or setting of the user's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    return {**env, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CACHE_DIR": str(tmp_path / "cache"),
            "WANDB_CONFIG_DIR": str(tmp_path / "config"), "PYTHONUNBUFFERED": "1", **extra}


def train(out, env, *args):
    return warm.run([sys.executable, os.path.join(ROOT, "train.py"), f"--out_dir={out}", *TINY, *args], cwd=ROOT,
                    env=env, timeout=600)


def fake_wandb(folder, source=FAKE):
    """A package named wandb in folder (put it on PYTHONPATH), and the file its calls go to."""
    os.makedirs(folder / "wandb")
    (folder / "wandb" / "__init__.py").write_text(source)
    return folder / "wandb" / "calls.jsonl"


def calls(path):
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def wandb_records(path):
    """The records of a W&B offline file, run-<id>.wandb (wandb 0.31 has no reader of its own): a LevelDB-style
    log of 32 KiB blocks after a 7-byte file header; each piece has a 7-byte header, a CRC-32 of its type and
    data, its length and its type (1 whole, 2 first, 3 middle, 4 last), little-endian, and a block's tail too
    short for a header is zeros. A whole record is a protobuf wandb_internal_pb2.Record."""
    from wandb.proto.wandb_internal_pb2 import Record
    data, records, pos, parts = open(path, "rb").read(), [], 7, b""
    assert data.startswith(b":W&B")
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if (crc, length, kind) == (0, 0, 0):
            pos += left
            continue
        piece = data[pos + 7:pos + 7 + length]
        assert zlib.crc32(bytes([kind]) + piece) == crc and kind in (1, 2, 3, 4)
        parts, pos = parts + piece, pos + 7 + length
        if kind in (1, 4):
            records.append(Record.FromString(parts))
            parts = b""
    return records


def segment(path):
    """(run record, config, history rows without W&B's own keys, W&B steps) of one offline file."""
    records = wandb_records(path)
    kinds = {}
    for r in records:
        kinds.setdefault(r.WhichOneof("record_type"), []).append(getattr(r, r.WhichOneof("record_type")))
    config = {u.key: json.loads(u.value_json) for c in [kinds["run"][0].config, *kinds.get("config", [])]
              for u in c.update}
    rows = [{".".join(i.nested_key) or i.key: json.loads(i.value_json) for i in h.item} for h in kinds.get("history", [])]
    return (kinds["run"][0], config, [{k: v for k, v in row.items() if not k.startswith("_")} for row in rows],
            [row["_step"] for row in rows])


def test_offline_run_reads_back_as_log_jsonl_across_sigterm_and_resume(tmp_path):
    """SIGTERM mid-run, then the printed resume command: two offline segments of one W&B run, whose id the
    checkpoint keeps, holding together exactly the records of log.jsonl, each once, under the same keys.
    An evaluation at every iteration: the resumed run's first one is either written again (W&B has it, and
    is not sent it twice) or new (the stop dropped it: W&B is sent it)."""
    out, env = tmp_path / "out", environment(tmp_path)
    args = [*WANDB, "--max_iters=20", "--eval_interval=1", "--log_interval=1", "--checkpoint_interval=100",
            "--gradient_accumulation_steps=20"]
    proc = warm.start([sys.executable, os.path.join(ROOT, "train.py"), f"--out_dir={out}", *TINY, *args], cwd=ROOT,
                      env=env, start_new_session=True)
    wait_for(lambda: len(logged_iters(out)) >= 4, proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143 and "Traceback" not in stderr and "Weights & Biases" not in stderr, stdout + stderr
    resumed = warm.run(resume_command(stdout), cwd=ROOT, env=env, timeout=600)
    assert resumed.returncode == 0 and "Traceback" not in resumed.stderr, resumed.stdout + resumed.stderr
    assert "Weights & Biases" not in resumed.stderr

    log = read_log(out)
    assert [r["iter"] for r in log if "train_loss" in r] == list(range(1, 21))
    files = sorted(glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb")))
    assert len(files) == 2, files
    (first, config, rows, steps), (again, config2, rows2, steps2) = segment(files[0]), segment(files[1])
    run_id = checkpoint.read(str(out))["wandb_run_id"]
    assert first.run_id == again.run_id == run_id and files[1].endswith(f"run-{run_id}.wandb")
    assert (first.project, first.display_name) == (again.project, again.display_name) == ("p", "n")
    assert config["loss"] == "mile" and config["n_embd"] == 32 and config["wandb_log"] is True
    assert config["init_from"] == "scratch" and config2["init_from"] == "resume"  # the settings of each start
    assert rows + rows2 == log  # every record, once, in order, with its keys and values as log.jsonl has them
    assert steps + steps2 == sorted(set(steps + steps2)) == [runlog.step(r) for r in log]


def test_a_resumed_run_sends_wandb_only_what_it_lacks(tmp_path, monkeypatch):
    """After a kill (torchrun's restart), log.jsonl held records past the checkpoint, which W&B has too: the
    resumed run writes them again into log.jsonl but sends W&B only the steps after the last one it held; a
    W&B run new to this out_dir gets every record, and an evaluation a stop dropped is sent."""
    fake = importlib.util.module_from_spec(importlib.util.spec_from_loader("wandb", loader=None))
    fake.__file__ = str(tmp_path / "wandb" / "__init__.py")
    exec(FAKE, fake.__dict__)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("FAKE_WANDB_FAIL_AT", raising=False)
    os.makedirs(tmp_path / "wandb")

    def record(it, kind):
        return {"iter": it, "train_loss": 1.0} if kind == "train" else {"iter": it, "val_ce": 2.0}

    def resume(logged, at, wandb_id, written):
        (tmp_path / "log.jsonl").write_text("".join(json.dumps(record(*r)) + "\n" for r in logged) + '{"iter": 1')
        (tmp_path / "wandb" / "calls.jsonl").unlink(missing_ok=True)
        cfg = Settings(out_dir=str(tmp_path), init_from="resume", wandb_log=True)
        log = runlog.RunLog(cfg, at, wandb_id, master=True)
        for r in written:
            log.write(record(*r))
        log.finish()
        sent = [(c[1]["iter"], c[2]) for c in calls(tmp_path / "wandb" / "calls.jsonl") if c[0] == "log"]
        return log, sent, [(r["iter"], "train" if "train_loss" in r else "eval") for r in read_log(tmp_path)]

    before = [(0, "eval"), (2, "train"), (4, "train"), (4, "eval"), (6, "train"), (8, "train"), (8, "eval")]
    again = [(4, "eval"), (6, "train"), (8, "train"), (8, "eval"), (10, "train"), (12, "train"), (12, "eval")]
    log, sent, kept = resume(before + [(10, "train")], 4, "abc", again)  # killed after 10, checkpoint at 4
    assert kept == before[:3] + again and log.wandb_id == "abc"
    assert sent == [(12, 24), (12, 25)]  # W&B had the steps up to iteration 10's
    _, sent, _ = resume(before[:3], 4, "abc", again[:2])  # stopped in the evaluation at 4, which was dropped
    assert sent == [(4, 9), (6, 12)]
    log, sent, _ = resume(before, 4, None, again[:2])  # no W&B run before: a new one, sent everything from now
    assert sent == [(4, 9), (6, 12)] and log.wandb_id == "fake0001"


def test_wandb_not_installed_is_one_sentence_before_any_work(tmp_path):
    fake_wandb(tmp_path / "site", "raise ModuleNotFoundError(\"No module named 'wandb'\")\n")
    proc = train(tmp_path / "out", environment(tmp_path, PYTHONPATH=str(tmp_path / "site")), "--wandb_log=True")
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert_one_sentence_error(proc, "--wandb_log=True needs Weights & Biases", "pip install -r requirements-wandb.txt")
    assert not (tmp_path / "out").exists()


def test_tracker_failing_mid_run_is_one_warning_and_training_goes_on(tmp_path):
    """The second record's send fails (quota, network): one warning line, nothing more sent, the run ends as
    it would have, log.jsonl holds every record, and the checkpoint keeps the W&B run's id for a resume."""
    sent = fake_wandb(tmp_path / "site")
    env = environment(tmp_path, PYTHONPATH=str(tmp_path / "site"), FAKE_WANDB_FAIL_AT="2")
    proc = train(tmp_path / "out", env, *WANDB)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if "Weights & Biases" in line]
    assert warnings == [f"warning: Weights & Biases stopped (ConnectionError: quota exceeded); training goes on, "
                        f"and {tmp_path / 'out' / 'log.jsonl'} keeps every record"], proc.stderr
    log = read_log(tmp_path / "out")
    assert [(r["iter"], "train_loss" in r) for r in log] == [(0, False), (4, True), (4, False), (8, True), (8, False)]
    made = calls(sent)
    assert [c[0] for c in made] == ["init", "config", "define_metric", "log"]  # no log, no finish after the failure
    assert made[0][1] == {"project": "p", "name": "n", "id": None, "resume": "allow", "dir": str(tmp_path / "out")}
    assert made[1][1]["wandb_run_name"] == "n" and made[3][1:] == [log[0], 1]
    assert checkpoint.read(str(tmp_path / "out"))["wandb_run_id"] == "fake0001"
