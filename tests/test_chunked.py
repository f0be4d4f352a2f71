"""mile.chunked_loss against the readable losses: value, and gradients for the hidden states and the
output weight, for ce, focal and mile, eager and compiled, float32 and bf16; the choice of the loss
path (mile.choose_loss_path); and bench.py on a tiny setting."""

import json
import os
import re
import sys

import pytest
import torch

import warm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import mile  # noqa: E402
from conftest import sum_tolerance  # noqa: E402
from mile import build_loss, choose_loss_path, chunked_loss  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BF16 = torch.finfo(torch.bfloat16).eps


def tolerance(dtype, N, d, V):
    """How far the chunked path may be from the readable one, relative to a tensor's largest entry: the
    float32 sums a value goes through in another order (V terms in the log-sum-exp and in dL/dh, N in
    dL/dW and the loss, d in a logit); in bf16 the logits, their gradient and the gradients' products are
    also rounded to bf16, three roundings that may each land one bf16 step apart."""
    tol = sum_tolerance(2 * V + N + d)
    return tol if dtype == torch.float32 else tol + 3 * BF16


def assert_near(actual, expected, tol):
    """|actual - expected| <= tol * max|expected|, elementwise: relative to the tensor's scale."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    err = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    assert err <= tol * scale, f"error {err:.3g} is more than {tol} of the scale {scale:.3g}"


def make_inputs(N, d, V, dtype, seed, ignore=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, d, generator=g).to(dtype)
    weight = (torch.randn(V, d, generator=g) * 2 / d ** 0.5).to(dtype)  # logits of scale about 2
    targets = torch.randint(0, V, (N,), generator=g)
    if ignore:
        targets[torch.randperm(N, generator=g)[: N // 5]] = -1
    return hidden, weight, targets


def readable(hidden, weight, targets, loss, gamma):
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    value = build_loss(loss, gamma=gamma)(h @ w.t(), targets)
    value.backward()
    return value.detach(), h.grad, w.grad


def chunked(hidden, weight, targets, loss, gamma, **kw):
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    value = chunked_loss(h, w, targets, loss=loss, gamma=gamma, **kw)
    value.backward()
    return value.detach(), h.grad, w.grad


def check(hidden, weight, targets, loss, gamma, **kw):
    tol = tolerance(hidden.dtype, *hidden.shape, weight.size(0))
    expected = readable(hidden, weight, targets, loss, gamma)
    actual = chunked(hidden, weight, targets, loss, gamma, **kw)
    assert actual[0].dtype == torch.float32
    assert actual[0].item() == pytest.approx(expected[0].item(), rel=tol)
    assert_near(actual[1], expected[1], tol)  # dL/dhidden
    assert_near(actual[2], expected[2], tol)  # dL/dweight


@pytest.mark.parametrize("loss", ["ce", "focal", "mile"])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N, chunk_size", [(1000, 128), (256, 64), (300, 1024), (7, 1)])
def test_eager_matches_readable(loss, gamma, dtype, N, chunk_size):
    # many chunks with a short last one; an exact multiple; a single chunk; one row per chunk
    hidden, weight, targets = make_inputs(N, 48, 333, dtype, seed=N + int(gamma * 10))
    check(hidden, weight, targets, loss, gamma, chunk_size=chunk_size, compiled=False)


@pytest.fixture
def fresh_compile():
    torch._dynamo.reset()  # each test compiles anew: no cache limit hides a fallback to eager
    yield
    assert mile._compiled_terms is not False, "torch.compile failed and the chunked loss fell back to eager"


@pytest.mark.parametrize("loss", ["ce", "focal", "mile"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_matches_readable(fresh_compile, loss, dtype):
    hidden, weight, targets = make_inputs(1000, 48, 333, dtype, seed=11)
    check(hidden, weight, targets, loss, 1.0, chunk_size=128, compiled=True)


@pytest.mark.parametrize("loss, gamma", [("mile", 0.0), ("focal", 2.0), ("ce", 2.0)])
def test_compiled_other_gammas(fresh_compile, loss, gamma):
    hidden, weight, targets = make_inputs(500, 32, 400, torch.float32, seed=18)
    check(hidden, weight, targets, loss, gamma, chunk_size=96, compiled=True)


def test_compiled_gamma_two_at_a_large_vocabulary(fresh_compile):
    hidden, weight, targets = make_inputs(600, 64, 32000, torch.float32, seed=12)
    check(hidden, weight, targets, "mile", 2.0, chunk_size=256, compiled=True)


def test_no_ignored_positions_and_large_logits():
    hidden, weight, targets = make_inputs(500, 32, 1000, torch.float32, seed=13, ignore=False)
    check(hidden, weight * 5, targets, "mile", 1.0, chunk_size=100, compiled=False)  # logits of scale 10


@pytest.mark.parametrize("compiled", [False, True])
def test_autocast_runs_the_matmuls_in_bf16(fresh_compile, compiled):
    # float32 parameters and hidden states under bf16 autocast, as train.py runs on a GPU: bf16 matmuls,
    # float32 loss math, float32 gradients
    hidden, weight, targets = make_inputs(400, 32, 500, torch.float32, seed=14)
    h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = mile.mile_loss(h1 @ w1.t(), targets)  # the logits are bf16 here
        actual = chunked_loss(h2, w2, targets, chunk_size=96, compiled=compiled)
    expected.backward()
    actual.backward()
    tol = tolerance(torch.bfloat16, 400, 32, 500)
    assert actual.item() == pytest.approx(expected.item(), rel=tol)
    # the matmuls ran in bf16: the very numbers of the same chunks on bf16 inputs without autocast
    assert actual.item() == chunked_loss(hidden.bfloat16(), weight.bfloat16(), targets, chunk_size=96,
                                         compiled=compiled).item()
    assert_near(h2.grad, h1.grad, tol)
    assert_near(w2.grad, w1.grad, tol)


@pytest.mark.parametrize("compiled", [False, True])
def test_no_grad(fresh_compile, compiled):
    hidden, weight, targets = make_inputs(300, 32, 200, torch.float32, seed=15)
    value = chunked_loss(hidden, weight, targets, chunk_size=64, compiled=compiled)
    logits = hidden @ weight.t()
    tol = tolerance(torch.float32, 300, 32, 200)
    assert value.item() == pytest.approx(mile.mile_loss(logits, targets).item(), rel=tol)
    assert not value.requires_grad  # nothing needed a gradient: none was computed
    with torch.no_grad():
        h = hidden.clone().requires_grad_(True)
        value = chunked_loss(h, weight, targets, chunk_size=64, compiled=compiled)
        assert not value.requires_grad
        assert value.item() == pytest.approx(mile.mile_loss(logits, targets).item(), rel=tol)


def test_compiled_chunks_have_static_shapes(fresh_compile):
    # 7 chunks of 128 rows and one of 104: two static graphs, each compiled once (not a dynamic-shape
    # graph that a later chunk size would reuse); another chunk size gets a graph of its own
    from torch._dynamo.utils import counters
    hidden, weight, targets = make_inputs(1000, 32, 300, torch.float32, seed=19)
    counters.clear()
    for _ in range(2):
        check(hidden, weight, targets, "mile", 1.0, chunk_size=128, compiled=True)
    assert counters["stats"]["unique_graphs"] == 2
    check(hidden, weight, targets, "mile", 1.0, chunk_size=100, compiled=True)
    assert counters["stats"]["unique_graphs"] == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("compiled", [False, True])
def test_cuda_bf16_matches_readable(fresh_compile, compiled):
    # on CUDA the weight's gradient is summed by a bf16 x bf16 -> float32 GEMM (out_dtype) where PyTorch has it
    hidden, weight, targets = make_inputs(3000, 64, 5000, torch.bfloat16, seed=20)
    check(hidden.cuda(), weight.cuda(), targets.cuda(), "mile", 1.0, chunk_size=1024, compiled=compiled)


def test_gradient_scales_with_grad_output():
    hidden, weight, targets = make_inputs(200, 16, 100, torch.float32, seed=16)
    h = hidden.clone().requires_grad_(True)
    (3.0 * chunked_loss(h, weight, targets, chunk_size=50, compiled=False)).backward()
    _, expected, _ = readable(hidden, weight, targets, "mile", 1.0)
    assert_near(h.grad, 3.0 * expected, tolerance(torch.float32, 200, 16, 100))


def test_train_curve_chunked_matches_readable(tmp_path):
    """A short train.py run gives the same losses with the chunked and the readable head."""
    logs = []
    for path in ("chunked", "full"):
        out = tmp_path / path
        warm.run([sys.executable, os.path.join(ROOT, "train.py"), f"--out_dir={out}", f"--loss_path={path}",
                        "--device=cpu",
                        "--loss_chunk_size=100", "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32",
                        "--batch_size=8", "--max_iters=20", "--eval_interval=10", "--eval_iters=2", "--log_interval=2"],
                       cwd=ROOT, check=True, capture_output=True, timeout=600)
        logs.append([json.loads(line) for line in open(out / "log.jsonl")])
    assert len(logs[0]) == len(logs[1]) > 10
    # each step the two paths differ by the sums' rounding (V = 84 and N = 256 terms, d = 32); Adam's update
    # carries a relative difference of the gradients over about one to one, so after k steps about k times that
    for a, b in zip(*logs):
        assert a["iter"] == b["iter"]
        for key in ("train_loss", "val_ce"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=max(a["iter"], 1) * sum_tolerance(2 * 84 + 256 + 32))


def test_entropy_clamp_is_reproduced():
    # confident rows (every other probability far below 1e-8) next to unsure ones: the 1e-8 clamp of
    # the reference raises the confident rows' entropy by about V * 1.8e-7 nats, and so their weight
    g = torch.Generator().manual_seed(17)
    V, d, N = 32000, 64, 64
    weight = torch.nn.functional.normalize(torch.randn(V, d, generator=g), dim=1)
    hidden = torch.randn(N, d, generator=g) * 0.1
    hidden[: N // 2] = 60 * weight[: N // 2]  # logit 60 for one class, at most about 30 for the rest
    targets = torch.randint(0, V, (N,), generator=g)
    entropy = mile.token_entropy(hidden @ weight.t())
    assert entropy[: N // 2].min() > 0.5 * V * 1e-8 * 18.4  # the clamp is what makes these rows' entropy
    check(hidden, weight, targets, "mile", 1.0, chunk_size=16, compiled=False)


# -----------------------------------------------------------------------------
# the path of the training loss


def test_auto_path_on_a_cpu_is_what_docs_chunked_says():
    """python train.py (12 x 64 rows of Shakespeare-char's 84 letters) and a GPT-2 batch on a CPU or MPS take
    the chunked path in the chunks docs/chunked.md states and measured: a new default must come with the docs'
    new figures."""
    doc = open(os.path.join(ROOT, "docs", "chunked.md")).read()
    stated = int(re.search(r"\*\*On a CPU\*\* \(and MPS\): chunks of (\d+) rows", doc).group(1))
    for device in ("cpu", "mps"):
        assert choose_loss_path(12 * 64, 84, device) == ("chunked", stated)
        assert choose_loss_path(16384, 50304, device) == ("chunked", stated)


def test_auto_path_on_a_gpu_takes_the_logits_when_they_fit():
    budget = 80 * 2 ** 30 // 4  # a quarter of an 80 GB GPU
    # GPT-2 124M at 16 sequences a micro-batch: 16 x 1024 x 50304 logits at 20 bytes (eager), 16.5 GB: whole
    assert choose_loss_path(16 * 1024, 50304, "cuda", budget_bytes=budget) == ("full", 2048)
    assert choose_loss_path(8192, 32000, "cuda:0", budget_bytes=budget) == ("full", 4096)
    # four times the batch, 66 GB: chunks, large ones; compiled, 4 bytes a logit, 13 GB: whole
    assert choose_loss_path(64 * 1024, 50304, "cuda", budget_bytes=budget) == ("chunked", 2048)
    assert choose_loss_path(64 * 1024, 50304, "cuda", budget_bytes=budget, compiled=True) == ("full", 2048)
    assert choose_loss_path(16 * 1024, 128256, "cuda", budget_bytes=budget) == ("chunked", 1024)
    assert choose_loss_path(16 * 1024, 50304, "cuda", budget_bytes=budget // 4) == ("chunked", 2048)  # a 20 GB GPU
    assert choose_loss_path(16 * 1024, 50304, "cuda", budget_bytes=budget // 4, compiled=True)[0] == "full"


def test_forced_paths_and_chunk_size():
    assert choose_loss_path(8, 10, "cuda", "chunked", budget_bytes=2 ** 40) == ("chunked", 2 ** 23)
    assert choose_loss_path(10 ** 6, 50304, "cpu", "full")[0] == "full"
    assert choose_loss_path(100, 50304, "cpu", "auto", chunk_size=300) == ("chunked", 300)
    assert choose_loss_path(100, 50304, "cuda", "auto", chunk_size=300, budget_bytes=0) == ("chunked", 300)
    with pytest.raises(ValueError, match="auto, full or chunked"):
        choose_loss_path(1, 1, "cpu", "maybe")


@pytest.mark.parametrize("path", ["chunked", "full"])
def test_model_follows_the_path(path):
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=70, n_layer=1, n_head=2, n_embd=16)).configure_run(path)
    idx, targets = torch.randint(0, 70, (3, 16)), torch.randint(0, 70, (3, 16))
    logits, loss = model(idx, targets)
    assert (logits is None) == (path == "chunked")
    reference = mile.mile_loss(model.lm_head(model.hidden(idx)), targets)
    assert loss.item() == pytest.approx(reference.item(), rel=tolerance(torch.float32, 48, 16, 70))


def test_old_checkpoints_name_the_path_as_before():
    """Checkpoints of earlier versions saved chunked_loss (True, False or "auto") and compile_loss."""
    import settings
    assert settings.upgrade({"chunked_loss": True, "compile_loss": True}) == {"loss_path": "chunked"}
    assert settings.upgrade({"chunked_loss": "false"})["loss_path"] == "full"
    assert settings.upgrade({"chunked_loss": "auto"})["loss_path"] == "auto"  # train.py decides anew on resume
    # model arguments held the path until 2026-12-07: a run's settings give it now (tests/test_train.py)
    assert settings.upgrade({"chunked_loss": True, "compile_loss": True, "n_layer": 2}, model_args=True) == {"n_layer": 2}
    cfg = settings.resumed(settings.Settings(), {"chunked_loss": True, "loss": "ce"}, explicit=set())
    assert (cfg.loss_path, cfg.loss) == ("chunked", "ce")


@pytest.mark.parametrize("flag, message", [("--loss_path=maybe", "loss_path must be one of auto, full, chunked"),
                                           ("--chunked_loss=True", "--chunked_loss is now --loss_path"),
                                           ("--loss_chunk_size=-5", "loss_chunk_size must not be negative")])
def test_train_rejects_bad_paths(tmp_path, flag, message):
    proc = warm.run([sys.executable, os.path.join(ROOT, "train.py"), f"--out_dir={tmp_path}", flag], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("error: ") and message in proc.stderr and "Traceback" not in proc.stderr


# -----------------------------------------------------------------------------
# bench.py


def table_rows(text, first_cell):
    """The cells of the Markdown table rows of text whose first cell is first_cell."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.startswith("|")]
    return [r for r in rows if r[0] == first_cell]


@pytest.mark.heavy
def test_bench_prints_its_tables(tmp_path):
    """bench.py on a tiny shape (head + loss) and --train --tiny: both tables, parsed."""
    out = tmp_path / "bench.md"
    run = lambda *args: warm.run([sys.executable, os.path.join(ROOT, "bench.py"), *args], cwd=ROOT, within=True,  # noqa: E731
                                       capture_output=True, text=True, timeout=300)
    head = run("--N=64", "--d=16", "--V=300", "--repeats=1", "--cases=CE compiled,MiLe eager,chunked MiLe eager,Cut CE",
               f"--out={out}")
    assert head.returncode == 0, head.stderr
    rows = {r[3]: r for r in table_rows(head.stdout, "64")}
    assert set(rows) == {"CE compiled", "MiLe eager", "chunked MiLe eager", "Cut CE"}
    assert all(len(r) == 12 for r in rows.values())
    assert float(rows["CE compiled"][6]) == 1.00  # the baseline of the "x CE" column
    for case in ("MiLe eager", "chunked MiLe eager"):
        assert float(rows[case][5]) > 0 and float(rows[case][6]) > 0 and float(rows[case][7]) > -50
    assert rows["chunked MiLe eager"][4] == "512" and rows["MiLe eager"][4] == ""
    assert rows["Cut CE"][5].startswith(("not installed", "needs CUDA"))  # optional, never required
    assert float(rows["MiLe eager"][9]) > 0  # bytes a logit, what choose_loss_path's rule is set from
    assert rows["CE compiled"][10] == "n/a"  # no peak FLOP/s on a CPU unless --peak gives one
    assert out.read_text().count("| 64 | 16 | 300 |") == 4

    train = run("--train", "--tiny", "--loss=ce", "--", "--max_iters=4")  # one loss: the test stays short
    assert train.returncode == 0, train.stderr
    rows = {r[1]: r for r in table_rows(train.stdout, "ce")}
    assert set(rows) == {"full", "chunked"} and float(rows["full"][3]) == 1.00  # the baseline of "x CE full"
    for r in rows.values():
        assert float(r[2]) > 0 and float(r[4].replace(",", "")) > 0 and int(r[6]) == 3  # 4 steps, the first left out
    assert re.search(r"auto \(the default\) takes: (full|chunked, chunk \d+) \(N = 128, V = 84", train.stdout)


def test_bench_counts_the_loops_over_the_vocabulary():
    """bench.py --logits counts the loops over V in inductor's C++: a loop bound by V or by V over the vector
    width counts, any other loop not."""
    import bench
    code = """
    for(int64_t x0=static_cast<int64_t>(0L); x0<static_cast<int64_t>(2048L); x0+=static_cast<int64_t>(1L))
        for(int64_t x1=static_cast<int64_t>(0L); x1<static_cast<int64_t>(50304L); x1+=static_cast<int64_t>(16L))
        for(int64_t x1=static_cast<int64_t>(0L); x1<static_cast<int64_t>(3144L); x1+=static_cast<int64_t>(1L))
        for(int64_t x2=static_cast<int64_t>(0L); x2<static_cast<int64_t>(768L); x2+=static_cast<int64_t>(1L))
    """
    assert bench.loops_over_v(code, 50304) == 2 and bench.loops_over_v(code, 8192) == 0


def test_compiled_chunks_fall_back_to_eager_only_for_a_first_call_that_fails(monkeypatch):
    """No compiler at the first call: a warning, then eager, the same loss. Out of memory, or an error once the
    compiled function has run: raised as it is, never hidden as a compiler failure (nor retried with more memory)."""
    import mile
    hidden, weight, targets = torch.randn(6, 4), torch.randn(5, 4), torch.randint(5, (6,))
    expected = chunked_loss(hidden, weight, targets, chunk_size=4, compiled=False)

    def failing(error):
        def terms(*args):
            raise error
        return terms
    monkeypatch.setattr(mile, "_compiled_ran", False)
    monkeypatch.setattr(mile, "_compiled_terms", failing(RuntimeError("no C compiler")))
    with pytest.warns(UserWarning, match=r"torch.compile failed \(RuntimeError\); chunked loss falls back to eager"):
        assert chunked_loss(hidden, weight, targets, chunk_size=4, compiled=True) == expected
    assert mile._compiled_terms is False
    monkeypatch.setattr(mile, "_compiled_terms", failing(torch.OutOfMemoryError("CUDA out of memory")))
    with pytest.raises(torch.OutOfMemoryError):
        chunked_loss(hidden, weight, targets, chunk_size=4, compiled=True)
    monkeypatch.setattr(mile, "_compiled_terms", mile.chunk_loss_terms)  # it ran once ...
    assert chunked_loss(hidden, weight, targets, chunk_size=4, compiled=True) == expected and mile._compiled_ran
    monkeypatch.setattr(mile, "_compiled_terms", failing(RuntimeError("a later error")))  # ... so this is raised
    with pytest.raises(RuntimeError, match="a later error"):
        chunked_loss(hidden, weight, targets, chunk_size=4, compiled=True)
