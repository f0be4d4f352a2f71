"""What only a CUDA GPU can check: the fast head-plus-loss path under bf16 autocast, a compiled
training step of both blocks, DDP and FSDP2 on NCCL, and sampling on the GPU. Every test here is
skipped, by name, on a machine without one (run `pytest -rs` to see them listed)."""

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from conftest import sum_tolerance  # noqa: E402
from mile import build_loss, chunked_loss  # noqa: E402

BF16 = torch.finfo(torch.bfloat16).eps
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TINY = ["--device=cuda", "--n_layer=2", "--n_head=2", "--n_embd=64", "--block_size=64", "--batch_size=8",
        "--eval_iters=2", "--warmup_iters=2", "--log_interval=1", "--max_iters=4", "--eval_interval=4"]


def relative_error(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("loss", ["ce", "focal", "mile"])
@pytest.mark.parametrize("compiled", [False, True])
def test_chunked_matches_readable_under_bf16_autocast(loss, compiled):
    """float32 parameters, bf16 autocast, as train.py runs on a GPU. The two paths make the same bf16 logits
    up to one bf16 step (another GEMM blocking) and sum the same float32 terms in other orders; the gradients
    are rounded to bf16 three times on the way (logits' gradient, the products)."""
    torch.manual_seed(0)
    N, d, V = 1000, 256, 5000  # N not a multiple of the chunk size
    hidden = torch.randn(N, d, device="cuda", requires_grad=True)
    weight = (0.05 * torch.randn(V, d, device="cuda")).requires_grad_()
    targets = torch.randint(V, (N,), device="cuda")
    targets[::17] = -1  # ignored positions
    with torch.autocast("cuda", dtype=torch.bfloat16):
        readable = build_loss(loss)(hidden @ weight.t(), targets)
    g_hidden, g_weight = torch.autograd.grad(readable, (hidden, weight))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fast = chunked_loss(hidden, weight, targets, loss=loss, chunk_size=256, compiled=compiled)
    f_hidden, f_weight = torch.autograd.grad(fast, (hidden, weight))
    assert fast.dtype == torch.float32
    tol = sum_tolerance(V + N + d)
    assert fast.item() == pytest.approx(readable.item(), rel=tol + BF16)
    assert relative_error(f_hidden, g_hidden) < tol + 3 * BF16
    assert relative_error(f_weight, g_weight) < tol + 3 * BF16


def run(*cmd, env=None):
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def losses(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return {r["iter"]: r["train_loss"] for r in map(json.loads, f) if "train_loss" in r}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A compiled bf16 run of the GPT-2 block on the GPU."""
    out = tmp_path_factory.mktemp("cuda")
    run(sys.executable, "train.py", f"--out_dir={out}", *TINY, "--compile=True")
    return out


def test_compiled_training_step_gpt2(trained):
    logged = losses(trained)
    assert sorted(logged) == [1, 2, 3, 4] and all(map(lambda v: v == v and v < 10, logged.values()))


@pytest.mark.parametrize("path", ["chunked", "full"])
def test_compiled_training_step_llama(tmp_path, path):
    run(sys.executable, "train.py", f"--out_dir={tmp_path}", *TINY, "--arch=llama", "--compile=True",
        f"--loss_path={path}")
    assert sorted(losses(tmp_path)) == [1, 2, 3, 4]


@pytest.mark.parametrize("nproc", [1, 2])
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_nccl_processes_equal_plain_run(tmp_path, parallel, nproc):
    """torchrun with one NCCL process, and with two (their collectives at work), computes what a plain run
    computes on the same global batch (CE: no per-process alpha)."""
    if nproc > torch.cuda.device_count():
        pytest.skip(f"needs {nproc} CUDA GPUs")
    args = ["--loss=ce", "--dtype=float32", "--gradient_accumulation_steps=2"]
    run(sys.executable, "train.py", f"--out_dir={tmp_path / 'plain'}", *TINY, *args)
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = run(sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train.py",
               f"--out_dir={tmp_path / parallel}", *TINY, *args, f"--parallel={parallel}", env=env)
    assert f"on {nproc} x cuda ({parallel})" in proc.stdout
    plain, dist = losses(tmp_path / "plain"), losses(tmp_path / parallel)
    assert sorted(plain) == sorted(dist)
    for it in plain:  # the same matmuls in TF32 (10 bits of mantissa), summed in another order at most
        assert dist[it] == pytest.approx(plain[it], rel=max(it, 1) * 2.0 ** -10)


def test_greedy_samples_on_cuda_are_the_cpus(trained):
    """Greedy decoding of one checkpoint on the GPU and on the CPU, both in float32 (no TF32 in sample.py): the
    logits differ by float32 rounding alone (~1e-6 relative), so the same argmax, token for token, unless two
    logits tie that closely; in bf16 the GPU's text may part from the CPU's, and is only checked to exist."""
    args = [f"--out_dir={trained}", "--num_samples=1", "--max_new_tokens=30", "--temperature=0"]
    texts = {device: run(sys.executable, "sample.py", *args, f"--device={device}", "--dtype=float32").stdout
             for device in ("cpu", "cuda")}
    assert texts["cuda"] == texts["cpu"] and len(texts["cpu"].strip()) > 0
    assert run(sys.executable, "sample.py", *args, "--device=cuda", "--dtype=bfloat16").stdout.strip()


def test_compiled_fsdp_blocks_train_without_graph_breaks(tmp_path):
    """The presets' combination with inductor, on one NCCL process: each block compiled with its recomputation,
    FSDP's bf16 weights, no graph break, and a run that learns."""
    env = {**os.environ, "TMPDIR": str(tmp_path), "TORCH_LOGS": "graph_breaks"}
    proc = run(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "train.py",
               f"--out_dir={tmp_path}", *TINY, "--arch=llama", "--parallel=fsdp", "--compile=True",
               "--activation_checkpointing=full", "--loss_path=full", env=env)
    assert "Graph break" not in proc.stderr, proc.stderr
    logged = losses(tmp_path)
    assert sorted(logged) == [1, 2, 3, 4] and all(v == v and v < 10 for v in logged.values())
