"""The pipeline's processes as a scenario runs them: `usagepipe bridge`, `usagepipe
consume` and `usagepipe simulate` started with the scenario's environment, their output
in a log of their own, so that a scenario can SIGKILL one and start another."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import urllib.request
from pathlib import Path

from usagepipe.faults.servers import usagepipe_command


class Process:
    """One `usagepipe` subcommand as a process; `start()` again after `kill()` starts a
    new one with the same arguments (its log appended)."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log: Path) -> None:
        self.name = name
        self.args = args
        self.env = env
        self.log = log
        self.starts = 0
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.starts += 1
        with self.log.open("ab") as out:
            out.write(f"---- start {self.starts} of {self.name}\n".encode())
            out.flush()
            self._proc = subprocess.Popen(
                [usagepipe_command(), *self.args],
                env={**os.environ, **self.env},
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    def kill(self) -> None:
        """SIGKILL: no drain, no flush, no commit."""
        if self._proc is not None and self.alive:
            self._proc.send_signal(signal.SIGKILL)
            self._proc.wait()

    def stop(self, timeout_s: float = 60.0) -> int | None:
        """SIGTERM (a graceful stop: drain, commit), SIGKILL after `timeout_s`."""
        if self._proc is None:
            return None
        if self.alive:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        return self._proc.returncode

    def wait(self, timeout_s: float) -> int | None:
        if self._proc is None:
            return None
        try:
            return self._proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def tail(self, lines: int = 12) -> str:
        if not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def scrape(port: int, names: tuple[str, ...]) -> dict[str, float]:
    """Summed values of the named Prometheus samples at 127.0.0.1:`port`/metrics (a
    labelled sample counts under its bare name; 0 where absent or nothing answers)."""
    out = dict.fromkeys(names, 0.0)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as page:
            text = page.read().decode()
    except OSError:
        return out
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name not in out:
            name = name.split("{", 1)[0]
        if name in out:
            with contextlib.suppress(ValueError):
                out[name] += float(value.split()[0])
    return out
