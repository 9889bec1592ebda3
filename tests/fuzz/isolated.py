"""Run one fuzz example in a forked child: a hang (past ``timeout``), a crash (a signal such as SIGSEGV), or an
allocation past the memory bound then ends only the child, and the test reports it as the outcome it is."""

from __future__ import annotations

import os
import pickle
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

# Virtual memory the child may add to the parent's size: a reader that tries to allocate more (a header claiming
# absurd dimensions) fails with MemoryError, reported as such.
MARGIN = 2 << 30


@dataclass
class Outcome:
    kind: str  # "ok", "hang", "crash", or the exception's type name
    message: str = ""
    value: object = None
    classes: tuple[str, ...] = ()  # an exception's class and its bases, by name

    def raised(self, error_type: type[BaseException]) -> bool:
        return error_type.__name__ in self.classes

    def describe(self) -> str:
        return f"{self.kind}: {self.message}"


def _vm_size() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmSize in /proc/self/status")


def _child(fn: Callable[[], object], margin: int, write_fd: int) -> None:
    import faulthandler
    import resource

    import SimpleITK as sitk

    # Threads do not survive fork: ITK runs in the calling thread only.
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    faulthandler.disable()  # a crash is the parent's to report, without pytest's traceback dump
    limit = _vm_size() + margin
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    try:
        result = Outcome("ok", value=fn())
    except BaseException as error:  # everything is reported to the parent, which decides
        result = Outcome(type(error).__name__, f"{error}\n{traceback.format_exc(limit=-3)}",
                         classes=tuple(c.__name__ for c in type(error).__mro__))
    try:
        data = pickle.dumps(result)
    except Exception:
        data = pickle.dumps(Outcome(result.kind, result.message, classes=result.classes))
    with os.fdopen(write_fd, "wb") as fh:
        fh.write(data)


def run_isolated(fn: Callable[[], object], timeout: float = 30.0, margin: int = MARGIN) -> Outcome:
    """``fn()`` in a forked child; its return value must pickle."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        os.close(read_fd)
        code = 0
        try:
            _child(fn, margin, write_fd)
        except BaseException:
            code = 70
        os._exit(code)
    os.close(write_fd)
    chunks, deadline = [], time.monotonic() + timeout
    os.set_blocking(read_fd, False)
    status = None
    while status is None:
        try:
            while chunk := os.read(read_fd, 1 << 16):
                chunks.append(chunk)
        except BlockingIOError:
            pass
        done, wait_status = os.waitpid(pid, os.WNOHANG)
        if done:
            status = wait_status
        elif time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            os.close(read_fd)
            return Outcome("hang", f"no result within {timeout} s")
        else:
            time.sleep(0.002)
    try:
        while chunk := os.read(read_fd, 1 << 16):
            chunks.append(chunk)
    except BlockingIOError:
        pass
    os.close(read_fd)
    if os.WIFSIGNALED(status):
        return Outcome("crash", f"killed by signal {os.WTERMSIG(status)}")
    if not chunks:
        return Outcome("crash", f"exit status {os.waitstatus_to_exitcode(status)} without a result")
    return pickle.loads(b"".join(chunks))
