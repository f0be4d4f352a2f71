"""What several test files share: a data folder outside the working tree, and a tiny comparison run
(compare.py), made once per session."""

import fcntl
import os
import shutil
import sys
import tempfile

import pytest
import torch

import warm

# named datasets (data/common.dataset_dir) are prepared into a temporary folder, removed at the end:
# the tests never write into the working tree. Set before any test imports data.common, and inherited
# by every train.py, sample.py and prepare script the tests start.
SCRATCH = tempfile.mkdtemp(prefix="nanomile-tests-")
os.environ["NANOMILE_DATA"] = os.path.join(SCRATCH, "data")
# and the scratch files of the processes the tests start (torchrun's torchelastic_* folders) go there too
os.makedirs(os.path.join(SCRATCH, "tmp"))
os.environ["TMPDIR"] = os.path.join(SCRATCH, "tmp")
# one thread per process: the tests run in two workers (pytest -n 2) on small models, and more threads
# than cores only spin
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_unconfigure(config):
    shutil.rmtree(SCRATCH, ignore_errors=True)

def sum_tolerance(n_terms, dtype=torch.float32):
    """How far two computations of a sum of n_terms numbers in dtype may differ, relative to the sum of
    the numbers' magnitudes: n_terms * eps, the worst case of any summation order (a CPU's vector width
    and threads choose the order). A tolerance is this, for the largest sum a value goes through, never
    a ratio to another run's error."""
    return n_terms * torch.finfo(dtype).eps


def steps_tolerance(steps, n_terms):
    """How far two training runs that sum the same numbers in different orders may drift apart after
    `steps` optimizer steps, relative: each step's gradients differ by sum_tolerance(n_terms), and Adam's
    normalised update carries a relative difference of the gradients over about one to one."""
    return max(steps, 1) * sum_tolerance(n_terms)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4", "--max_iters=8",
        "--eval_interval=4", "--eval_iters=2", "--log_interval=4", "--warmup_iters=2"]


def compare(out, *args):
    """python compare.py on the tiny model, two seeds."""
    return warm.run([sys.executable, os.path.join(ROOT, "compare.py"), f"--out_dir={out}", "--seeds=1,2",
                     "--eval_iters=3", *args, "--", *TINY], cwd=ROOT, timeout=900, within=True)


@pytest.fixture(scope="session")
def compared(tmp_path_factory, worker_id):
    """(directory, stdout) of a finished tiny comparison: CE, Focal and MiLe, seeds 1 and 2. Made once per
    session, also when the tests that read it run in different workers (pytest -n): the first makes it in
    the folder the workers share, under a lock, and the others wait for it. Read it, do not change it."""
    root = tmp_path_factory.getbasetemp()
    root = root.parent if worker_id != "master" else root  # the workers' folders are in one of the session
    with open(root / "compare.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "compare.stdout").exists():
            proc = compare(root / "compare")
            assert proc.returncode == 0, proc.stdout + proc.stderr
            (root / "compare.stdout").write_text(proc.stdout)
    return root / "compare", (root / "compare.stdout").read_text()


def pytest_configure(config):
    config.addinivalue_line("markers", "heavy: a test of 20 s or more, started first (pytest_collection_modifyitems)")


def pytest_collection_modifyitems(items):
    """The heavy tests first: under pytest -n 2 each worker then takes some of them at the start, rather than
    one worker finishing a long test alone at the end while the other waits."""
    items.sort(key=lambda item: item.get_closest_marker("heavy") is None)
