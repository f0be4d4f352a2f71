"""The project's commands started as a user starts them, `python script.py args` (or `python -c code`),
but in processes that have imported torch already: each is forked from a server process
(multiprocessing's forkserver, one per test worker) that imported torch, torch._dynamo (which AdamW's
constructor imports) and numpy once. A tiny training run spends about 4 of its 5 to 6 seconds on
those imports; forked, it skips them.

The rest is as a new interpreter has it: __main__ is the script, sys.argv, sys.orig_argv, sys.path,
the environment, the working directory, stdout and stderr (to files, read back as text like
subprocess's), the exit status (negative: the signal that ended it) and a pid to signal. run and Popen
take subprocess's arguments and fall back on subprocess for any other command (torchrun, python -m),
and where torch or the C library reads the environment as the process starts (OMP_NUM_THREADS,
MALLOC_*; TORCH_LOGS is read again). torchrun runs a command as torchrun's processes, for the tests
whose subject is not torchrun itself."""

import multiprocessing
import os
import runpy
import signal
import socket
import subprocess
import sys
import tempfile
import time
import types

PRELOAD = ["torch", "torch._dynamo", "torch.distributed.checkpoint", "torch.distributed.fsdp", "numpy", "tqdm",
           "tiktoken"]
IMPORT_TIME_VARIABLES = ("TORCH_COMPILE_DEBUG", "OMP_NUM_THREADS", "MKL_NUM_THREADS")  # read by torch's import
_context = None


def warm(args, env):
    """Whether args is `python script.py ...` or `python -c code ...` in an environment a warm process can have
    (the variables torch and the C library read as the process starts as in this one)."""
    def read_at_start(env):
        return {k: v for k, v in env.items() if k in IMPORT_TIME_VARIABLES or k.startswith("MALLOC_")}
    return (len(args) >= 2 and args[0] == sys.executable and (str(args[1]).endswith(".py") or args[1] == "-c")
            and read_at_start(os.environ if env is None else env) == read_at_start(os.environ))


def _run_within(args, **kw):
    """subprocess.run in a command started with within=True: the python commands it starts are warm too (their
    output, when not captured, written to this process's own)."""
    if not warm(args, kw.get("env")) or {"stdin", "stdout", "stderr", "input"} & set(kw):
        return _subprocess_run(args, **kw)
    result = run(args, cwd=kw.get("cwd"), env=kw.get("env"), timeout=kw.get("timeout"))
    if not kw.get("capture_output"):
        sys.stdout.write(result.stdout)
        sys.stderr.write(result.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        result.stdout = result.stderr = None
    elif not (kw.get("text") or kw.get("universal_newlines")):
        result.stdout, result.stderr = result.stdout.encode(), result.stderr.encode()
    if kw.get("check"):
        result.check_returncode()
    return result


_subprocess_run = subprocess.run


def _main(args, env, cwd, out, err, new_session, within):
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
    code = args[1] == "-c"
    system = [p for p in sys.path if p.startswith((sys.prefix, sys.base_prefix))]  # the standard library, site-packages
    extra = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:] = ["" if code else os.path.dirname(os.path.abspath(args[1])), *extra, *system]
    sys.argv = ["-c", *map(str, args[3:])] if code else [str(a) for a in args[1:]]
    sys.orig_argv = [str(a) for a in args]
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if within:
        subprocess.run = _run_within
    if env.get("TORCH_LOGS"):  # read as torch is imported: read again
        import torch._logging
        torch._logging._init_logs()
    if code:
        main = sys.modules["__main__"] = types.ModuleType("__main__")
        exec(compile(args[2], "<string>", "exec"), main.__dict__)
    else:
        runpy.run_path(os.path.abspath(args[1]), run_name="__main__")


class Popen:
    """subprocess.Popen's pid, args, returncode, poll, wait, send_signal, kill, communicate and stdout.readline,
    for a command started warm; stdout and stderr come back as text. within: the python commands the command
    starts through subprocess.run (compare.py's training runs, bench.py's measurements) start warm too."""

    def __init__(self, args, cwd=None, env=None, start_new_session=False, within=False, **_):
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
                                                             self._err, start_new_session, within))
        here = os.path.dirname(os.path.abspath(__file__))
        added = here not in sys.path  # in a command started within=True: where the forked process finds warm.py
        sys.path += [here] if added else []
        try:
            self._process.start()
        finally:
            if added:
                sys.path.remove(here)
        self.pid = self._process.pid

    @property
    def stdout(self):
        """stdout as it is written, read line by line (Lines)."""
        if self._stdout is None:
            self._stdout = Lines(self._out, self)
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
        """(stdout, stderr) once the process has ended; stdout without the lines read from it already, as a pipe."""
        self.wait(timeout)
        with open(self._err) as err:
            if self._stdout is not None:
                return self._stdout.rest(), err.read()
            with open(self._out) as out:
                return out.read(), err.read()


class Lines:
    """A process's output file read as a pipe is: readline waits for the next whole line, and gives what is
    left, or "", once the process has ended."""

    def __init__(self, path, process):
        self._file, self._process, self._part = open(path), process, ""

    def readline(self):
        while True:
            ended = self._process.poll() is not None  # before reading: what it wrote is all there
            self._part += self._file.readline()
            if self._part.endswith("\n") or ended:
                line, self._part = self._part, ""
                return line
            time.sleep(0.01)

    def rest(self):
        """What was not read yet, once the process has ended."""
        with self._file:
            return self._part + self._file.read()


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


def torchrun_start(args, nproc=2, env=None, **kw):
    """torchrun's nproc processes of args, started warm in the environment torchrun gives them, as a list."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = os.environ if env is None else env
    return [start(args, env={**env, "RANK": str(r), "LOCAL_RANK": str(r), "GROUP_RANK": "0", "WORLD_SIZE": str(nproc),
                             "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}, **kw)
            for r in range(nproc)]


def torchrun(args, nproc=2, env=None, timeout=600, check=False, **kw):
    """What `torchrun --standalone --nproc_per_node=nproc script args` (args: python, the script, its arguments)
    gives a run that ends by itself: nproc warm processes in the environment torchrun gives its processes, their
    stdout and their stderr each joined in the order of the ranks, exit status 1 if one failed (torchrun's); when
    one fails the others are stopped with SIGTERM, as torchrun stops them. Not torchrun's restarts, its passing on
    of signals or the command line its processes see: the tests of those start torchrun itself."""
    procs = torchrun_start(args, nproc, env, **kw)
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
