"""Work in a forked second process while this one works, on a CPU: each process on its own share of the
cores. On a small CPU one process's matrix products use a second thread poorly (SmolLM2's forward: 1.3x
faster on two threads than on one, so 35% of two cores spin), where two independent jobs on one thread each
use both cores fully.

    with Forked(job, threads) as child:   # fork: the child runs job() on ``threads`` threads
        mine = other_job()                # the parent keeps the rest of the cores
        theirs = child.result()           # job()'s return value, or its exception raised here

The child is a copy of this process (the model's weights shared, copy-on-write) and dies with it; its
return value comes back pickled through a pipe (this process's own child, never a file). CPU and Linux only:
CUDA state does not survive a fork, and macOS's frameworks are not fork-safe (``available``).
"""

import ctypes
import os
import pickle
import signal
import sys
import traceback

import torch

PR_SET_PDEATHSIG = 1  # Linux prctl: the signal a process gets when its parent dies


def available() -> int:
    """Cores a forked second process could use: 0 where forking is not offered (anywhere but Linux: macOS's
    frameworks are not fork-safe), else this process's CPUs."""
    if not sys.platform.startswith("linux"):
        return 0
    return len(os.sched_getaffinity(0))


class ChildFailed(RuntimeError):
    """The forked process died (killed, out of memory) or its exception could not be sent back."""


class Forked:
    """``job`` (no arguments) in a forked process on ``threads`` torch threads; the parent's threads are set to
    ``parent_threads`` until the context exits (None: as they are). ``result()`` waits for it."""

    def __init__(self, job, threads: int | None = None, parent_threads: int | None = None):
        self.job, self.threads, self.parent_threads = job, threads, parent_threads
        self.pid = self.read = None
        self.before = torch.get_num_threads()

    def __enter__(self) -> "Forked":
        for stream in (sys.stdout, sys.stderr):  # nothing buffered is printed twice
            stream.flush()
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            _child(self.job, self.threads, write)  # never returns
        os.close(write)
        self.pid, self.read = pid, read
        if self.parent_threads is not None:
            torch.set_num_threads(self.parent_threads)
        return self

    def result(self):
        """The job's return value; its exception re-raised here (ChildFailed when it died without one)."""
        with os.fdopen(self.read, "rb") as pipe:
            self.read = None
            data = pipe.read()
        _, status = os.waitpid(self.pid, 0)
        self.pid = None
        if not data:
            how = (f"killed by signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status)
                   else f"exited with status {os.WEXITSTATUS(status)}")
            raise ChildFailed(f"the second process was {how} (out of memory?); the steps it saved are kept: "
                              "rerun with --resume, or with --processes 1 to run in one process")
        kind, value = pickle.loads(data)
        if kind == "error":
            raise value
        return value

    def __exit__(self, *exc) -> None:
        torch.set_num_threads(self.before)
        if self.read is not None:
            os.close(self.read)
        if self.pid is not None:  # the parent failed before collecting: the child's work is not wanted
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)


def _child(job, threads: int | None, write: int) -> None:
    """Run ``job`` in the forked process, send ("ok", value) or ("error", exception) and exit."""
    code = 0
    try:
        _die_with_parent()
        if threads is not None:
            torch.set_num_threads(threads)
        payload = ("ok", job())
    except BaseException as e:  # noqa: BLE001 - everything goes back to the parent
        code = 1
        try:
            pickle.dumps(e)
            payload = ("error", e)
        except Exception:  # noqa: BLE001 - an exception that does not pickle travels as text
            payload = ("error", ChildFailed("".join(traceback.format_exception(e))))
    try:
        with os.fdopen(write, "wb") as pipe:
            pickle.dump(payload, pipe)
    finally:
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(code)


def _die_with_parent() -> None:
    """SIGKILL this process when its parent dies (Linux; elsewhere nothing)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
