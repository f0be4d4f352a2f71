"""Several processes on the CPU (gloo): the all-reduced alpha, DDP and FSDP2 runs of train.py
against one process, and resuming after a kill."""

import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import warm
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from mile import chunked_loss, mile_loss, token_entropy  # noqa: E402
from conftest import steps_tolerance, sum_tolerance  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

TINY = ["--device=cpu", "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4", "--eval_iters=2",
        "--warmup_iters=2", "--learning_rate=1e-2", "--log_interval=1"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # as torchrun sets it: the same threads, the same float sums
# these tests mean the CPU (gloo), also on a machine with GPUs: TINY says --device=cpu


def train(out_dir, *args, nproc=1, check=True):
    """train.py to the end, in one process or in nproc as torchrun starts them (warm.py)."""
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), f"--out_dir={out_dir}", *TINY, *args]
    proc = warm.run(cmd, cwd=ROOT, timeout=600, env=ENV) if nproc == 1 else \
        warm.torchrun(cmd, nproc, cwd=ROOT, timeout=600, env=ENV)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def step_losses(out_dir, key="train_loss"):
    """iteration -> training loss (or another key of the training records), from log.jsonl (the last record of
    an iteration wins)."""
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return {r["iter"]: r[key] for r in map(json.loads, f) if "train_loss" in r}


def last_logged(out_dir):
    """The last training iteration in a log being written (0 before there is one)."""
    try:
        with open(os.path.join(out_dir, "log.jsonl")) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return 0
    for line in reversed(lines):
        try:
            return json.loads(line)["iter"]
        except json.JSONDecodeError:  # a line still being written
            continue
    return 0


# -----------------------------------------------------------------------------
# two processes started by the test, for what happens inside a step


def run_ranks(fn, *args, world=2):
    """Run fn(rank, world, *args) in `world` gloo processes; return what each put in the queue."""
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("forkserver")  # forked from a process that imported torch once (warm.py)
    ctx.set_forkserver_preload(warm.PRELOAD)
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(fn, r, world, port, queue, args)) for r in range(world)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return [torch.load(io.BytesIO(results[r])) for r in range(world)]


def _rank_main(fn, rank, world, port, queue, args):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    buffer = io.BytesIO()  # bytes, not tensors: shared-memory tensors die with this process
    torch.save(fn(rank, world, *args), buffer)
    queue.put((rank, buffer.getvalue()))
    dist.destroy_process_group()


def _alpha_and_grad(rank, world, logits, targets, chunked):
    import torch.distributed as dist
    from mile import mean_over_ranks, mile_weights
    if chunked:  # logits = hidden @ I: the chunked path on the same numbers
        hidden = logits[rank].clone().requires_grad_(True)
        eye = torch.eye(logits.size(-1))
        loss = chunked_loss(hidden, eye, targets[rank], chunk_size=5, compiled=False, group=dist.group.WORLD)
        loss.backward()
        grad = hidden.grad
    else:
        z = logits[rank].clone().requires_grad_(True)
        loss = mile_loss(z, targets[rank], group=dist.group.WORLD)
        loss.backward()
        grad = z.grad
    alpha = mean_over_ranks(1.0 / mile_weights(token_entropy(logits[rank])).mean(), dist.group.WORLD)
    return alpha.item(), loss.item(), grad


def _alpha_and_grad_both_paths(rank, world, logits, targets):
    return [_alpha_and_grad(rank, world, logits, targets, chunked) for chunked in (False, True)]


def test_alpha_is_mean_of_rank_reciprocals():
    """The readable and the chunked path (in the same two processes, one after the other)."""
    # rank 0 sees confident predictions (low entropy), rank 1 uniform ones (high entropy)
    g = torch.Generator().manual_seed(5)
    N, V = 16, 20
    logits = torch.stack([torch.randn(N, V, generator=g) * 8, torch.randn(N, V, generator=g) * 0.01])
    targets = torch.randint(0, V, (2, N), generator=g)
    per_rank = run_ranks(_alpha_and_grad_both_paths, logits, targets)
    w = [1 + token_entropy(logits[r]) for r in range(2)]
    assert w[0].mean() < 0.5 * w[1].mean()  # the ranks really differ
    expected_alpha = (1 / w[0].mean() + 1 / w[1].mean()) / 2  # the spec's mean of reciprocals
    tol = sum_tolerance(2 * V + N + 2)  # each entropy and CE sums V terms, each mean N, the all-reduce 2
    for r, path in ((r, path) for r in range(2) for path in range(2)):
        alpha, loss, grad = per_rank[r][path]
        assert alpha == pytest.approx(expected_alpha.item(), rel=tol)
        ce = F.cross_entropy(logits[r], targets[r], reduction="none")
        assert loss == pytest.approx((expected_alpha * w[r] * ce).mean().item(), rel=tol)
        p = torch.softmax(logits[r], dim=-1)
        expected_grad = expected_alpha * w[r][:, None] * (p - F.one_hot(targets[r], V)) / N
        torch.testing.assert_close(grad, expected_grad, rtol=tol, atol=tol * expected_grad.abs().max().item())


def tiny_model(loss, chunked):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=30, n_layer=1, n_head=2, n_embd=16, loss=loss))
    model.configure_run("chunked" if chunked else "full", loss_chunk_size=5)
    with torch.no_grad():
        model.lm_head.weight.mul_(40)  # sharp, varied predictions: entropies (and alphas) differ by batch
    return model


COMBINATIONS = [(loss, chunked) for loss in ("focal", "mile") for chunked in (False, True)]


def _ddp_grads(rank, world, idx, targets):
    """The DDP gradients of each (loss, chunked) combination, one after the other in these processes."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    grads = {}
    for loss, chunked in COMBINATIONS:
        model = tiny_model(loss, chunked)
        model.loss_group = dist.group.WORLD  # alpha averaged over the processes, as train.py sets it
        model = DDP(model)
        model(idx[rank], targets[rank])[1].backward()  # DDP averages the gradients over the ranks
        grads[loss, chunked] = {n: p.grad for n, p in model.module.named_parameters()}
    return grads


@pytest.fixture(scope="module")
def ddp_grads():
    g = torch.Generator().manual_seed(6)
    idx, targets = torch.randint(0, 30, (2, 3, 8), generator=g), torch.randint(0, 30, (2, 3, 8), generator=g)
    return idx, targets, run_ranks(_ddp_grads, idx, targets)[0]


@pytest.mark.parametrize("loss, chunked", COMBINATIONS)
def test_ddp_gradients_follow_the_spec(ddp_grads, loss, chunked):
    """For focal and mile the per-rank alpha makes 2 processes differ from 1 by design: the DDP
    gradient must equal the gradient of mean_r(mean_i(alpha * w_ri * CE_ri)) computed in one process,
    with alpha the mean over ranks of 1 / mean_i(w_ri)."""
    idx, targets, grads = ddp_grads
    ddp = grads[loss, chunked]

    model = tiny_model(loss, chunked=False)
    logits = [model(idx[r], targets[r])[0].reshape(-1, 30) for r in range(2)]
    ces = [F.cross_entropy(z, t.reshape(-1), reduction="none") for z, t in zip(logits, targets)]
    if loss == "mile":
        ws = [1 + token_entropy(z) for z in logits]
    else:
        ws = [1 - torch.exp(-ce.detach()) for ce in ces]
    alpha = sum(1 / w.mean() for w in ws) / 2
    total = sum((alpha * w * ce).mean() for w, ce in zip(ws, ces)) / 2
    total.backward()
    assert abs(1 / ws[0].mean() - 1 / ws[1].mean()) > 1e-2 * alpha  # the ranks' alphas differ
    tol = sum_tolerance(2 * 30 + 2 * 24 + 2 * 16)  # the head's sums (V, N, d), the blocks' again, the all-reduce
    for name, p in model.named_parameters():
        torch.testing.assert_close(ddp[name], p.grad, rtol=0, atol=tol * p.grad.abs().max().item())


# -----------------------------------------------------------------------------
# train.py under torchrun


def _block_weights_kept_for_backward(rank, world):
    """How many tensors of a block weight's shape, with memory, autograd keeps after an FSDP forward in bf16:
    through MixedPrecisionPolicy (as train.py runs bf16 under FSDP), and through autocast instead."""
    import distributed
    procs = distributed.Processes(rank, rank, world, world)
    held = {}
    for how in ("policy", "autocast"):
        dtype = "bfloat16" if how == "policy" else "float32"  # float32 weights, which autocast then copies
        model = distributed.build(GPTConfig(arch="llama", n_layer=2, n_head=2, n_embd=32, n_ffn=96, vocab_size=50,
                                            block_size=8), procs, "fsdp", "cpu", seed=0, dtype=dtype)
        shapes = {tuple(p.shape) for block in model.transformer.h for p in block.parameters() if p.dim() == 2}
        kept = []
        idx = torch.randint(0, 50, (2, 8))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=how == "autocast"), \
                torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
            _, loss = model(idx, idx)
        held[how] = sum(tuple(t.shape) in shapes and t.untyped_storage().nbytes() > 0 for t in kept)
        loss.backward()
    return held


def test_fsdp_in_bfloat16_keeps_no_block_weights_for_backward():
    """FSDP gathers each block's weights in bf16 and frees them after the block's forward, gathering them again
    for backward; autocast would keep a bf16 copy of every block's weights until backward."""
    for held in run_ranks(_block_weights_kept_for_backward):
        assert held["policy"] == 0 and held["autocast"] >= 2 * 4, held  # 5 matrices a block


# the tiny model's sums: V = 84 logits, 2 x 4 x 32 rows a step, 32 features
TERMS = 2 * 84 + 2 * 4 * 32 + 32


def test_ce_two_processes_equal_one(tmp_path):
    """Two DDP processes train as one does (CE: no per-process alpha), and each evaluates eval_iters batches
    of its own: the two of them together give what one process gives on twice as many. (The full loss path
    here; the FSDP test below takes the chunked one, the CPU's default.)"""
    args = ["--loss=ce", "--loss_path=full", "--gradient_accumulation_steps=2", "--max_iters=8",
            "--eval_interval=4"]
    train(tmp_path / "one", *args, "--eval_iters=4")
    proc = train(tmp_path / "two", *args, "--eval_iters=2", nproc=2)
    assert "on 2 x cpu (ddp)" in proc.stdout
    for key in ("train_loss", "grad_norm"):  # the gradients' norm over both processes, before clipping
        one, two = step_losses(tmp_path / "one", key), step_losses(tmp_path / "two", key)
        assert sorted(one) == sorted(two) == list(range(1, 9))
        for it in one:
            assert two[it] == pytest.approx(one[it], rel=steps_tolerance(it, TERMS)), (key, it)
    evals = [{r["iter"]: r for r in map(json.loads, open(tmp_path / run / "log.jsonl")) if "val_ce" in r}
             for run in ("one", "two")]
    assert sorted(evals[0]) == sorted(evals[1]) == [0, 4, 8]
    for it, r in evals[0].items():
        for key in ("val_ce", "train_ce", "val_ce_high", "val_entropy", "val_share_low"):
            assert evals[1][it][key] == pytest.approx(r[key], rel=steps_tolerance(it, TERMS)), (it, key)
    with open(tmp_path / "two" / "log.jsonl") as f:  # one process wrote it: each step once
        assert sum("train_loss" in line for line in f) == 8


def test_fsdp_checkpoint_is_sharded_and_resumes_on_any_number_of_processes(tmp_path):
    """Two FSDP processes (activations recomputed in backward) train as one process does from the same seed;
    each writes its own shard, and the sharded checkpoint loads in one process (sampling, training on) and
    in three."""
    args = ["--loss=ce", "--gradient_accumulation_steps=6", "--max_iters=6", "--eval_interval=3"]
    proc = train(tmp_path / "fsdp", *args, "--parallel=fsdp", "--activation_checkpointing=full", nproc=2)
    assert "on 2 x cpu (fsdp)" in proc.stdout
    train(tmp_path / "one", *args, "--max_iters=9")
    for key in ("train_loss", "grad_norm"):  # the norm of the gradients' shards together, before clipping
        one, fsdp = step_losses(tmp_path / "one", key), step_losses(tmp_path / "fsdp", key)
        for it in fsdp:  # sharding changes nothing but the order of some sums
            assert fsdp[it] == pytest.approx(one[it], rel=steps_tolerance(it, TERMS)), (key, it)
    one = step_losses(tmp_path / "one")
    # the checkpoint: a folder of two shards, each process's own, and `latest` naming it
    folder = tmp_path / "fsdp" / "ckpt-6"
    assert sorted(os.listdir(folder)) == [".metadata", "__0_0.distcp", "__1_0.distcp", "training.pt"]
    assert (tmp_path / "fsdp" / "latest").read_text() == "ckpt-6\n"
    assert not (tmp_path / "fsdp" / "ckpt-3").exists() and not (tmp_path / "fsdp" / "ckpt.pt").exists()
    import checkpoint
    with open(folder / ".metadata", "rb") as f:
        index = checkpoint._Index(f).load()  # which file holds each piece of each tensor
    for name in ("model.transformer.h.0.mlp.c_fc.weight", "optimizer.state.transformer.h.0.mlp.c_fc.weight.exp_avg"):
        pieces = {info.relative_path for key, info in index.storage_data.items() if key.fqn == name}
        assert pieces == {"__0_0.distcp", "__1_0.distcp"}, name  # half in each process's file
    # saved by 2 processes, loaded whole in 1, as sample.py, buckets.py and export.py load it
    model, _ = checkpoint.load_model(str(tmp_path / "fsdp"))
    assert model.generate(torch.zeros(1, 1, dtype=torch.long), 5).shape == (1, 6)
    # resumed in 3 processes, past a folder that a save killed at iteration 9 left half written
    shutil.copytree(tmp_path / "fsdp", tmp_path / "three")
    (tmp_path / "three" / "ckpt-9").mkdir()
    (tmp_path / "three" / "ckpt-9" / "__0_0.distcp").write_bytes(b"half a shard")
    train(tmp_path / "three", *args, "--parallel=fsdp", "--init_from=resume", "--max_iters=9", nproc=3)
    assert (tmp_path / "three" / "latest").read_text() == "ckpt-9\n"
    assert sorted(os.listdir(tmp_path / "three" / "ckpt-9"))[1:4] == ["__0_0.distcp", "__1_0.distcp", "__2_0.distcp"]
    # and in 1, which writes ckpt.pt and removes the sharded checkpoint it no longer needs
    train(tmp_path / "fsdp", *args, "--init_from=resume", "--max_iters=9")
    assert (tmp_path / "fsdp" / "ckpt.pt").exists() and not (tmp_path / "fsdp" / "latest").exists()
    for run in ("three", "fsdp"):
        resumed = step_losses(tmp_path / run)
        for it in (7, 8, 9):
            assert resumed[it] == pytest.approx(one[it], rel=steps_tolerance(it, TERMS)), (run, it)


def test_accumulation_steps_must_split_evenly(tmp_path):
    proc = train(tmp_path, "--gradient_accumulation_steps=3", "--max_iters=2", nproc=2, check=False)
    assert proc.returncode != 0
    assert "must be a multiple of the number of processes (2)" in proc.stderr
    assert proc.stderr.count("error: gradient_accumulation_steps") == 1  # said once, not by every process


# -----------------------------------------------------------------------------
# killed and resumed


def test_sigkill_and_resume_gives_the_uninterrupted_losses(tmp_path):
    args = ["--loss=mile", "--max_iters=60", "--eval_interval=10", "--dropout=0.1"]  # dropout: the RNG state matters
    train(tmp_path / "straight", *args)
    straight = step_losses(tmp_path / "straight")
    out = tmp_path / "killed"
    for kill_at, resume in ((15, []), (35, ["--init_from=resume"])):  # kill mid-interval, twice
        cmd = [sys.executable, os.path.join(ROOT, "train.py"), f"--out_dir={out}", *TINY, *args, *resume]
        proc = warm.start(cmd, cwd=ROOT, env=ENV)
        deadline = time.time() + 300
        while last_logged(out) < kill_at:
            assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # a kill during a checkpoint write leaves a partial temporary file beside the last good checkpoint
    (out / "ckpt.pt.tmp").write_bytes(b"PK\x03\x04 half a checkpoint")
    train(out, *args, "--init_from=resume")
    resumed = step_losses(out)
    assert sorted(resumed) == sorted(straight) == list(range(1, 61))
    for it in straight:  # the same process count, the same arithmetic: the very same numbers
        assert resumed[it] == straight[it], it


def train_py(out, *args):
    return [sys.executable, os.path.join(ROOT, "train.py"), f"--out_dir={out}", *TINY, *args]


def torchrun(out, *args, restarts=0):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            f"--max-restarts={restarts}", *train_py(out, *args)[1:]]


def terminate(procs):
    """SIGTERM to each process, as torchrun passes it on; the first process's stdout and every one's stderr, once
    all have stopped, not having ended well."""
    for p in procs:
        p.send_signal(signal.SIGTERM)
    outputs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode != 0 for p in procs)
    return outputs[0][0], "".join(err for _, err in outputs)


def start(cmd, tmp_path):
    """A command in the background, its output readable line by line as it comes."""
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**ENV, "TMPDIR": str(tmp_path), "PYTHONUNBUFFERED": "1"})


@pytest.mark.heavy
def test_sigterm_under_torchrun_saves_the_shards_and_says_how_to_resume(tmp_path):
    """How clusters preempt: SIGTERM to torchrun, which passes it to every process; they agree to stop between
    two micro-batches (the step under way is dropped) or two evaluation batches (the evaluation is dropped),
    save the last completed step, and the first process prints the command that resumes. Checkpoints came
    every checkpoint_interval steps before that, apart from the evaluations. A resumed run keeps the
    parallelism it was saved with, unless told otherwise."""
    out = tmp_path / "run"
    proc = start(torchrun(out, "--loss=ce", "--gradient_accumulation_steps=2", "--parallel=fsdp", "--max_iters=100000",
                          "--eval_interval=100000", "--checkpoint_interval=2"), tmp_path)
    deadline = time.time() + 300
    while last_logged(out) < 5:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.01)
    by_interval = (out / "latest").read_text().strip()
    assert re.fullmatch(r"ckpt-\d*[02468]", by_interval)  # saved at an even step, with no evaluation since 0
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0
    stopped_at = ckpt_iter = last_logged(out)
    assert f"interrupted at iteration {stopped_at}" in stdout and f"checkpoint in {out / f'ckpt-{stopped_at}'}" in stdout
    assert "--init_from=resume" in stdout and "torch.distributed.run --standalone --nproc_per_node=2" in stdout
    assert (out / "latest").read_text() == f"ckpt-{stopped_at}\n"

    # resumed without --parallel, with steps of 4000 micro-batches (tens of seconds): SIGTERM within one. The
    # processes as torchrun starts them and SIGTERM to each, as torchrun passes it on (warm.py), from here on
    procs = warm.torchrun_start(train_py(out, "--init_from=resume", "--gradient_accumulation_steps=4000"), cwd=ROOT,
                                env={**ENV, "PYTHONUNBUFFERED": "1"})
    line = ""
    while "resuming from" not in line:
        line = procs[0].stdout.readline()
        assert line or procs[0].poll() is None, procs[0].communicate()
    assert "as it ran: parallel=fsdp, activation_checkpointing=none, compile=False; 16000 sequences an optimizer " \
           "step where the checkpoint's run took 8" in line
    def accumulation():  # of the run config.json was last written by, as training begins
        try:
            return json.loads((out / "config.json").read_text())["gradient_accumulation_steps"]
        except ValueError:  # being written
            return None
    while accumulation() != 4000:
        assert procs[0].poll() is None and time.time() < deadline, procs[0].communicate()
        time.sleep(0.01)
    time.sleep(0.5)  # into the first step (of tens of seconds)
    signalled = time.time()
    stdout, stderr = terminate(procs)
    print(f"SIGTERM within a step to exit, checkpoint saved: {time.time() - signalled:.1f} s")
    assert f"interrupted at iteration {ckpt_iter} (iteration {ckpt_iter + 1}, under way, was dropped): checkpoint " \
           f"in {out / f'ckpt-{ckpt_iter}'}" in stdout, stdout + stderr
    assert last_logged(out) == ckpt_iter and (out / "latest").read_text() == f"ckpt-{ckpt_iter}\n"
    assert json.load(open(out / "config.json"))["parallel"] == "fsdp"

    # resumed again, evaluating (1,000,000 batches a process) after one step: SIGTERM within the evaluation
    procs = warm.torchrun_start(train_py(out, "--init_from=resume", f"--eval_interval={ckpt_iter + 1}",
                                         "--eval_iters=1000000"), cwd=ROOT, env=ENV)
    while last_logged(out) < ckpt_iter + 1:
        assert procs[0].poll() is None and time.time() < deadline, procs[0].communicate()
        time.sleep(0.01)
    time.sleep(1)  # into the evaluation
    stdout, stderr = terminate(procs)
    assert f"interrupted at iteration {ckpt_iter + 1} (the evaluation under way was dropped): checkpoint in " \
           f"{out / f'ckpt-{ckpt_iter + 1}'}" in stdout, stdout + stderr
    assert not any("val_ce" in r and r["iter"] > 0 for r in map(json.loads, open(out / "log.jsonl")))


@pytest.mark.heavy
def test_torchrun_restarts_a_killed_process_and_the_run_ends_as_if_never_killed(tmp_path):
    """How a job survives a lost process: torchrun --max-restarts starts every process again with the same
    command, and --init_from=auto resumes from the newest checkpoint (a scratch run at first). The log holds
    each iteration once, and every number in it is the uninterrupted run's."""
    from test_trust import rank_pid
    args = ["--loss=mile", "--dropout=0.1", "--gradient_accumulation_steps=4", "--max_iters=30", "--eval_interval=10",
            "--checkpoint_interval=5", "--init_from=auto"]
    train(tmp_path / "straight", *args, nproc=2)
    out = tmp_path / "killed"
    proc = start(torchrun(out, *args, restarts=1), tmp_path)
    deadline = time.time() + 300
    while last_logged(out) < 12:  # past the checkpoint at 10
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.005)
    os.kill(rank_pid(proc.pid, 1), signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    assert re.search(rf"resuming from {re.escape(str(out))}/ckpt-\d+ at iteration [1-9]", stdout), stdout

    def records(run):
        return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "mfu", "peak_memory_gib")}
                for r in map(json.loads, open(tmp_path / run / "log.jsonl"))]
    assert records("killed") == records("straight")  # the same records in the same order: bit-exact, no repeats
    assert [r["iter"] for r in records("straight") if "train_loss" in r] == list(range(1, 31))


def _check_shared(rank, world, tmp):
    """checkpoint.check_shared's verdict in each process: first all see one folder, then process 1 another."""
    import checkpoint
    import distributed
    verdicts = []
    for folders in ([tmp / "a", tmp / "a"], [tmp / "a", tmp / "b"]):
        try:
            checkpoint.check_shared(str(folders[rank]), distributed.Processes(rank, rank, world, world))
            verdicts.append(0)
        except SystemExit as e:
            verdicts.append(e.code)
    return verdicts


def test_every_process_must_see_the_out_dir_of_process_0(tmp_path):
    """On several machines out_dir must be one shared folder: here process 1 sees another folder, as a
    machine with a local disk would, and both processes stop before anything is written."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert run_ranks(_check_shared, tmp_path) == [[0, 1], [0, 1]]


def test_barrier_says_why_it_cannot_reach_the_others(monkeypatch, capsys):
    """A process that stopped at a check said why, so the others leave the barrier without a word; any other
    failure (a wrong network interface on several machines) is one sentence naming the variables to set."""
    import distributed
    procs = distributed.Processes(1, 0, 2, 1)
    for error, said in ((RuntimeError("[gloo] Connection closed by peer [10.0.0.2]:41234"), ""),
                        (RuntimeError("Connection refused\n(more lines)"), "GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME")):
        def barrier(group=None):
            raise error
        monkeypatch.setattr(distributed.dist, "barrier", barrier)
        monkeypatch.setenv("RANK", "1")
        with pytest.raises(SystemExit) as stop:
            distributed.barrier(procs)
        err = capsys.readouterr().err
        assert stop.value.code == 1 and (said in err if said else err == ""), err
        if said:
            assert err.startswith("error: process 1 on ") and "cannot reach the other processes (Connection refused)" in err


# train.py with torch.compile's graphs run by aot_eager: what dynamo captures and AOTAutograd traces, as inductor
# would get it, without inductor's minutes of C++ compiling on a CPU
AOT_EAGER = """
import functools, os, runpy, sys, torch
torch.compile = functools.partial(torch.compile, backend="aot_eager")
sys.argv = sys.argv[1:]
sys.path[0] = os.path.dirname(sys.argv[0])
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.heavy
def test_fsdp_compiles_each_block_whole_and_trains_as_eager(tmp_path):
    """The presets' combination on 2 processes: compile + FSDP + activation checkpointing + bf16 through FSDP's
    mixed precision, and the same without activation checkpointing. Each block is compiled whole (its
    recomputation inside the graph), with no graph break anywhere (FSDP's gathers run between the graphs), and
    the runs' losses are eager's. (Inductor's fused kernels round differently: tests/test_cuda.py compiles this
    combination with them on a GPU.)"""
    args = ["--loss=mile", "--gradient_accumulation_steps=2", "--max_iters=4", "--eval_interval=4", "--parallel=fsdp",
            "--dtype=bfloat16", "--loss_path=full"]
    train(tmp_path / "eager", *args, "--activation_checkpointing=full", nproc=2)
    (tmp_path / "aot_eager.py").write_text(AOT_EAGER)
    eager = step_losses(tmp_path / "eager")
    assert sorted(eager) == [1, 2, 3, 4]
    for recompute in ("full", "none"):
        out = tmp_path / f"compiled-{recompute}"
        proc = warm.torchrun([sys.executable, str(tmp_path / "aot_eager.py"), os.path.join(ROOT, "train.py"),
                              f"--out_dir={out}", *TINY, *args, f"--activation_checkpointing={recompute}",
                              "--compile=True"], cwd=ROOT, timeout=600,
                             env={**ENV, "TORCH_LOGS": "graph_breaks,graph_code"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "Graph break" not in proc.stderr, proc.stderr
        graphs = proc.stderr.split("TRACED GRAPH")[1:]
        # the blocks compiled (training and evaluation), the recomputation inside their graph, and the head's loss
        blocks = [g for g in graphs if "scaled_dot_product_attention" in g]
        assert blocks and any("tag_activation_checkpoint" in g for g in blocks) == (recompute == "full")
        assert any("log_softmax" in g for g in graphs)
        # aot_eager runs the very operations eager runs, in the same order, and recomputing changes no number
        assert step_losses(out) == eager
