"""The project's commands started as a user starts them, `python script.py args`, but in processes that
have imported torch already: each is forked from a server process (multiprocessing's forkserver, one
per test worker) that imported torch, torch._dynamo (which AdamW's constructor imports) and numpy
once. A tiny training run spends about 4 of its 5 to 6 seconds on those imports; forked, it skips them.

The rest is as a new interpreter has it: __main__ is the script, sys.argv, sys.orig_argv, sys.path,
the environment, the working directory, stdout and stderr (to files, read back as text like
subprocess's), the exit status (negative: the signal that ended it) and a pid to signal. run and Popen
take subprocess's arguments and fall back on subprocess for any other command (torchrun, python -c),
and where torch reads the environment as it is imported (OMP_NUM_THREADS; TORCH_LOGS is read again).
torchrun runs a command as torchrun's processes, for the tests whose subject is not torchrun itself."""

import multiprocessing
import os
import runpy
import signal
import socket
import subprocess
import sys
import tempfile
import time

PRELOAD = ["torch", "torch._dynamo", "torch.distributed.checkpoint", "torch.distributed.fsdp", "numpy", "tqdm",
           "tiktoken"]
IMPORT_TIME_VARIABLES = ("TORCH_COMPILE_DEBUG", "OMP_NUM_THREADS", "MKL_NUM_THREADS")  # read by torch's import
_context = None


def warm(args, env):
    """Whether args is `python script.py ...` in an environment a warm process can have."""
    env = os.environ if env is None else env
    return (len(args) >= 2 and args[0] == sys.executable and str(args[1]).endswith(".py")
            and all(env.get(k) == os.environ.get(k) for k in IMPORT_TIME_VARIABLES))


def _main(args, env, cwd, out, err, new_session):
    """In the forked process: become `python script args`, then run the script as __main__."""
    if new_session:
        os.setsid()
    for fd, path in ((1, out), (2, err)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(f, fd)
        os.close(f)
    if env.get("PYTHONUNBUFFERED"):
        sys.stdout.reconfigure(line_buffering=True, write_through=True)
        sys.stderr.reconfigure(line_buffering=True, write_through=True)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    script = os.path.abspath(args[1])
    system = [p for p in sys.path if p.startswith((sys.prefix, sys.base_prefix))]  # the standard library, site-packages
    extra = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:] = [os.path.dirname(script), *extra, *system]
    sys.argv = [str(a) for a in args[1:]]
    sys.orig_argv = [str(a) for a in args]
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if env.get("TORCH_LOGS"):  # read as torch is imported: read again
        import torch._logging
        torch._logging._init_logs()
    runpy.run_path(script, run_name="__main__")


class Popen:
    """subprocess.Popen's pid, args, returncode, poll, wait, send_signal, kill and communicate, for a
    command started warm; stdout and stderr come back as text from communicate."""

    def __init__(self, args, cwd=None, env=None, start_new_session=False, **_):
        global _context
        if _context is None:
            _context = multiprocessing.get_context("forkserver")
            _context.set_forkserver_preload(PRELOAD)
        self.args, self.returncode, self._stdout = list(args), None, None
        files = tempfile.mkdtemp(prefix="warm-")
        self._out, self._err = os.path.join(files, "stdout"), os.path.join(files, "stderr")
        for path in (self._out, self._err):
            open(path, "w").close()
        env = dict(os.environ if env is None else env)
        self._process = _context.Process(target=_main, args=(self.args, env, cwd or os.getcwd(), self._out,
                                                             self._err, start_new_session))
        self._process.start()
        self.pid = self._process.pid

    @property
    def stdout(self):
        """stdout as it is written, read by whole lines (readline gives "" until the next line is complete)."""
        if self._stdout is None:
            self._stdout = Lines(self._out)
        return self._stdout

    def poll(self):
        if self.returncode is None and self._process.exitcode is not None:
            self.returncode = self._process.exitcode
        return self.returncode

    def wait(self, timeout=None):
        self._process.join(timeout)
        if self.poll() is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def send_signal(self, number):
        if self.poll() is None:
            os.kill(self.pid, number)

    def kill(self):
        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout=None):
        self.wait(timeout)
        with open(self._out) as out, open(self._err) as err:
            return out.read(), err.read()


class Lines:
    """The whole lines of a file being written, one by one."""

    def __init__(self, path):
        self._file, self._part = open(path), ""

    def readline(self):
        self._part += self._file.readline()
        line, self._part = (self._part, "") if self._part.endswith("\n") else ("", self._part)
        return line


def start(args, fresh=False, **kw):
    """A command in the background: warm where it can be (fresh: never), else subprocess.Popen (text, output
    piped)."""
    if warm(args, kw.get("env")) and not fresh:
        return Popen(args, **kw)
    kw = {k: v for k, v in kw.items() if k not in ("stdout", "stderr", "text", "capture_output")}
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def run(args, timeout=None, check=False, **kw):
    """subprocess.run(args, capture_output=True, text=True, ...), warm where it can be."""
    if not warm(args, kw.get("env")):
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=check,
                              **{k: v for k, v in kw.items() if k not in ("capture_output", "text")})
    proc = Popen(args, **kw)
    try:
        stdout, stderr = proc.communicate(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    result = subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)
    if check:
        result.check_returncode()
    return result


def torchrun(args, nproc=2, env=None, timeout=600, check=False, **kw):
    """What `torchrun --standalone --nproc_per_node=nproc script args` (args: python, the script, its arguments)
    gives a run that ends by itself: nproc warm processes in the environment torchrun gives its processes, their
    stdout and their stderr each joined in the order of the ranks, exit status 1 if one failed (torchrun's); when
    one fails the others are stopped with SIGTERM, as torchrun stops them. Not torchrun's restarts, its passing on
    of signals or the command line its processes see: the tests of those start torchrun itself."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = os.environ if env is None else env
    procs = [start(args, env={**env, "RANK": str(r), "LOCAL_RANK": str(r), "GROUP_RANK": "0", "WORLD_SIZE": str(nproc),
                              "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}, **kw)
             for r in range(nproc)]
    deadline, stopped = time.time() + timeout, False
    while any(p.poll() is None for p in procs):
        if any(p.poll() for p in procs) and not stopped:  # one failed: the others are stopped
            for p in procs:
                p.send_signal(signal.SIGTERM)
            stopped = True
        if time.time() > deadline:
            for p in procs:
                p.kill()
            raise subprocess.TimeoutExpired(args, timeout)
        time.sleep(0.01)
    outputs = [p.communicate() for p in procs]
    result = subprocess.CompletedProcess(args, int(any(p.returncode for p in procs)), "".join(o for o, _ in outputs),
                                         "".join(e for _, e in outputs))
    if check:
        result.check_returncode()
    return result
