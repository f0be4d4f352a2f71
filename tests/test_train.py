"""train.py and sample.py run as a user runs them: in processes of their own (tests/warm.py), on a tiny
model, in temporary directories. Also every bad input a user can give them."""

import json
import os
import sys

import pytest
import torch

import warm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4", "--eval_iters=2",
        "--log_interval=2", "--warmup_iters=2", "--learning_rate=1e-2"]


def run(script, *args, check=True):
    proc = warm.run([sys.executable, os.path.join(ROOT, script), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def train(out_dir, *args, check=True):
    return run("train.py", f"--out_dir={out_dir}", *TINY, *args, check=check)


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def assert_one_sentence_error(proc, *needles):
    """A bad input exits non-zero with one line on stderr that names the problem, no traceback."""
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    error = [line for line in lines if line.startswith("error:")]
    assert len(error) == 1, proc.stderr
    for needle in needles:
        assert needle in error[0], error[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 12-iteration MiLe run with a checkpoint at 6 and at 12."""
    out = str(tmp_path_factory.mktemp("trained"))
    train(out, "--max_iters=12", "--eval_interval=6")
    return out


def test_train_smoke_writes_log_and_checkpoint(trained):
    records = read_log(trained)
    steps, evals = [r for r in records if "train_loss" in r], [r for r in records if "val_ce" in r]
    assert len(steps) + len(evals) == len(records)  # a record is one or the other: no key means two things
    assert [r["iter"] for r in steps] == [2, 4, 6, 8, 10, 12] and [r["iter"] for r in evals] == [0, 6, 12]
    assert evals[-1]["val_ce"] < evals[0]["val_ce"]  # it learns something
    assert os.path.exists(os.path.join(trained, "ckpt.pt"))
    assert not os.path.exists(os.path.join(trained, "ckpt.pt.tmp"))
    assert all(r["grad_norm"] > 0 for r in steps)


def test_grad_norm_is_taken_before_clipping(tmp_path):
    """The first step's gradients are the same whatever the clipping: so is the norm logged, clipped far below
    it or not clipped at all; the second step then differs, as the clipped one was a smaller step."""
    args = ["--max_iters=2", "--log_interval=1", "--eval_interval=1000"]
    norms = {}
    for clip in ("1e-3", "0"):
        train(tmp_path / clip, *args, f"--grad_clip={clip}")
        norms[clip] = [r["grad_norm"] for r in read_log(tmp_path / clip) if "train_loss" in r]
    assert norms["1e-3"][0] == norms["0"][0] > 1e-3 and norms["1e-3"][1] != norms["0"][1]


@pytest.mark.parametrize("loss", ["ce", "focal"])
def test_every_loss_trains(tmp_path, loss):
    proc = train(tmp_path, f"--loss={loss}", "--max_iters=4", "--eval_interval=4")
    assert f"loss {loss}" in proc.stdout
    evals = [r for r in read_log(tmp_path) if "val_ce" in r]
    assert [r["iter"] for r in evals] == [0, 4] and evals[-1]["val_ce"] < evals[0]["val_ce"]


def test_resume_continues_exactly(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    train(full, "--max_iters=12", "--eval_interval=6")
    train(part, "--max_iters=6", "--eval_interval=6", "--lr_decay_iters=2000")
    # the second half: the same run continued, with the schedule the full run had
    proc = train(part, "--init_from=resume", "--max_iters=12", "--lr_decay_iters=2000")
    assert "resuming from" in proc.stdout and "at iteration 6" in proc.stdout
    resumed = [r for r in read_log(part) if r["iter"] > 6 and "train_loss" in r]
    assert [r["iter"] for r in resumed] == [8, 10, 12]
    straight = {r["iter"]: r["train_loss"] for r in read_log(full) if "train_loss" in r}
    for r in resumed:  # the same batches, the same optimizer state, the same arithmetic: the same losses
        assert r["train_loss"] == straight[r["iter"]]


def test_model_args_hold_what_the_model_is_and_older_ones_still_load(tmp_path, trained):
    """A checkpoint's model_args hold what the model is, not how its run computed it (the loss path and chunk
    size, compiled, activation checkpointing: the run's settings). A checkpoint of an earlier version whose
    model_args held them loads as a model that computes the plain way, and resumes as its settings say."""
    import checkpoint
    how = {"loss_path", "loss_chunk_size", "compiled", "activation_checkpointing"}
    saved = torch.load(os.path.join(trained, "ckpt.pt"), weights_only=True)
    assert saved["model_args"]["n_layer"] == 1 and not how & saved["model_args"].keys()
    earlier = [dict(chunked_loss=True, compile_loss=True),  # before 2026-12-03
               dict(loss_path="chunked", loss_chunk_size=100, compiled=True, activation_checkpointing=True)]
    for i, args in enumerate(earlier):
        os.makedirs(tmp_path / str(i))
        torch.save({**saved, "model_args": {**saved["model_args"], **args}}, tmp_path / str(i) / "ckpt.pt")
        model, _ = checkpoint.load_model(str(tmp_path / str(i)))
        assert (model.loss_path, model.loss_chunk_size, model.compiled) == ("full", 0, False)
        assert not any(block.recompute for block in model.transformer.h)
    proc = train(tmp_path / "1", "--init_from=resume", "--max_iters=14", "--loss_chunk_size=50")
    assert "at iteration 12" in proc.stdout and "loss path: chunked, 50 rows a chunk" in proc.stdout
    resumed = torch.load(tmp_path / "1" / "ckpt.pt", weights_only=True)
    assert resumed["iter_num"] == 14 and not how & resumed["model_args"].keys()


def test_config_file_and_override(tmp_path):
    cfg = tmp_path / "cfg.py"
    cfg.write_text("max_iters = 3\neval_interval = 3\nloss = 'ce'\n")
    train(tmp_path / "out", str(cfg), "--loss=focal")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["max_iters"] == 3 and config["loss"] == "focal"  # the flag after the file wins


@pytest.mark.parametrize("args, needles", [  # each from the process as a user starts it; more in test_settings.py
    (["--lerning_rate=1e-3"], ["unknown setting 'lerning_rate'", "did you mean learning_rate", "valid keys"]),
    (["--dataset=no_such_data"], ["no dataset 'no_such_data'"]),
    (["--dataset=fineweb"], ["not prepared", "data/fineweb/prepare.py first"]),
    (["--init_from=resume"], ["no checkpoint at"]),
    (["--device=cuda:7"], ["this PyTorch sees no CUDA GPU; use --device=cpu"] if not torch.cuda.is_available() else
     ["no such CUDA GPU"]),
    (["--dtype=float16", "--device=cpu"], ["float16 on the CPU", "about 20x as long", "use --dtype=float32"]),
])
def test_bad_input_gets_one_sentence(tmp_path, args, needles):
    assert_one_sentence_error(train(tmp_path, *args, check=False), *needles)


def test_help_lists_the_settings():
    proc = run("train.py", "--help")
    assert proc.returncode == 0 and "learning_rate=0.003" in proc.stdout and "torchrun" in proc.stdout


def test_bad_config_file(tmp_path):
    cfg = tmp_path / "cfg.py"
    cfg.write_text("import math\nn_layers = 2\n")  # an import is fine, a misspelt key is not
    assert_one_sentence_error(train(tmp_path, str(cfg), check=False), "unknown setting 'n_layers'", "n_layer")


def test_corrupt_checkpoint_is_one_sentence_and_kept(tmp_path, trained):
    for content in [b"not a checkpoint at all", open(os.path.join(trained, "ckpt.pt"), "rb").read()[:5000]]:
        (tmp_path / "ckpt.pt").write_bytes(content)
        proc = train(tmp_path, "--init_from=resume", check=False)
        assert_one_sentence_error(proc, "ckpt.pt is damaged (", "truncated or corrupt", "no other checkpoint is in")
        assert (tmp_path / "ckpt.pt").read_bytes() == content  # nothing overwritten


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path, trained):
    out = tmp_path / "run"
    train(out, "--max_iters=4", "--eval_interval=4")
    before = (out / "ckpt.pt").read_bytes()
    # a learning rate this large overflows the weights within a few steps
    proc = train(out, "--init_from=resume", "--max_iters=40", "--learning_rate=1e30", "--grad_clip=0.0",
                 "--warmup_iters=0", check=False)
    assert_one_sentence_error(proc, "the training loss became nan", f"the last good checkpoint, {out / 'ckpt.pt'}, is kept",
                              "lower learning_rate (now 1e+30", "turn gradient clipping on (grad_clip is 0)", "then resume")
    assert (out / "ckpt.pt").read_bytes() == before
    # a run with no checkpoint yet says so, and that it starts again; with clipping on, it does not suggest it
    proc = train(tmp_path / "new", "--max_iters=40", "--learning_rate=1e30", "--warmup_iters=0", check=False)
    assert_one_sentence_error(proc, "the training loss became nan", "no checkpoint was written yet", "then start again")
    assert "clipping" not in proc.stderr and not (tmp_path / "new" / "ckpt.pt").exists()


# -----------------------------------------------------------------------------
# sample.py


def test_sample_smoke(trained):
    proc = run("sample.py", f"--out_dir={trained}", "--start=ROMEO:", "--num_samples=2", "--max_new_tokens=20",
               "--seed=3")
    samples = proc.stdout.split("---------------\n")
    assert len(samples) == 3 and samples[-1] == ""
    assert all(s.startswith("ROMEO:") and len(s) == len("ROMEO:") + 20 + 1 for s in samples[:2])
    again = run("sample.py", f"--out_dir={trained}", "--start=ROMEO:", "--num_samples=2", "--max_new_tokens=20",
                "--seed=3")
    assert again.stdout == proc.stdout  # the seed fixes the samples


def test_sample_prompt_from_file_and_greedy(trained, tmp_path):
    (tmp_path / "prompt.txt").write_text("JULIET:\n")
    proc = run("sample.py", f"--out_dir={trained}", f"--start=FILE:{tmp_path / 'prompt.txt'}", "--num_samples=2",
               "--max_new_tokens=10", "--temperature=0")
    first, second = proc.stdout.split("---------------\n")[:2]
    assert first.startswith("JULIET:\n") and first == second  # greedy decoding does not depend on the draw


@pytest.mark.parametrize("args, needles", [
    (["--start=caf\u00e9"], ["'\u00e9'", "character vocabulary lacks"]),
    (["--start="], ["prompt is empty"]),
    (["--start=FILE:/no/such/file.txt"], ["cannot read the prompt file"]),
    (["--num_samples=0"], ["--num_samples must be at least 1, not 0"]),
    (["--temperature=nan"], ["--temperature must be a number of at least 0", "not nan"]),
    (["--temperature=-1"], ["--temperature must be a number of at least 0", "not -1.0"]),
    (["--top_k=-5"], ["--top_k must not be negative", "not -5"]),
    (["--hf=out/hf"], ["--hf is now --init_from"]),
])
def test_sample_bad_input(trained, args, needles):
    assert_one_sentence_error(run("sample.py", f"--out_dir={trained}", *args, check=False), *needles)


def test_sample_bad_checkpoints(tmp_path):
    assert_one_sentence_error(run("sample.py", f"--out_dir={tmp_path}", check=False), "no checkpoint at")
    (tmp_path / "ckpt.pt").write_bytes(b"\x00" * 100)
    assert_one_sentence_error(run("sample.py", f"--out_dir={tmp_path}", check=False), "ckpt.pt is damaged (")
    assert_one_sentence_error(run("sample.py", f"--out_dir={tmp_path / 'missing'}", check=False), "no checkpoint at")


def test_sample_unknown_flag(trained):
    proc = run("sample.py", f"--out_dir={trained}", "--temprature=0.5", check=False)
    assert proc.returncode != 0 and "unrecognized arguments: --temprature=0.5" in proc.stderr
