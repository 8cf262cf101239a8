"""A job's driver as a process of its own, joined to a running Ray instance: a test can kill
it, or fail, without leaving the job running in the test's own process (a job left running
in a thread of a failed test kept its actors' CPUs and starved the next test's job)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path


class JobDriver:
    """``otmel.jobs.<module>.run(<config>(**cfg))`` in a new process, its stdout and stderr
    in ``log`` (a file: a pipe nobody reads while the job runs would fill and stop it); give
    ``cfg["address"]`` to join the test's Ray instance."""

    def __init__(self, module: str, config: str, cfg: dict, log: Path):
        code = f"from otmel.jobs.{module} import {config}, run; run({config}(**{cfg!r}))"
        self.log = Path(log)
        with self.log.open("w") as f:
            self.proc = subprocess.Popen([sys.executable, "-c", code], stdout=f, stderr=subprocess.STDOUT, text=True)

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def poll(self) -> int | None:
        return self.proc.poll()

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def output(self, tail: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-tail:]

    def sigkill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)

    def kill(self) -> None:
        """Ends the driver if it still runs (its job's actors end with it)."""
        self.proc.kill()
        self.proc.wait(60)
