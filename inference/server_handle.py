"""A rollout server as the client sees it: where it listens, and how to tell that it died.

The launcher hands out handles for the processes it started (liveness from the
process, last lines from its log file); servers started elsewhere (a Slurm step, a
second node) get a handle with a URL only, and their liveness comes from ``/health``.
Either way an error about a server names it and, when there is a log, quotes it.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ServerHandle:
    url: str
    name: str
    process: subprocess.Popen | None = field(default=None, repr=False)
    log_path: Path | None = None

    def alive(self) -> bool | None:
        """True/False for a process started here; None when only the URL is known."""
        if self.process is None:
            return None
        return self.process.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        if self.log_path is None:
            return "(no log: this server was not launched by this process)"
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, 2)
                f.seek(max(0, f.tell() - 64 * 1024))
                text = f.read().decode("utf-8", "replace")
        except OSError as err:
            return f"(log {self.log_path} unreadable: {err})"
        return "\n".join(text.splitlines()[-lines:])

    def describe_death(self, lines: int = 20) -> str:
        """One message for a dead server: name, URL, exit code, log path and last log lines."""
        code = self.process.poll() if self.process is not None else None
        status = f"exited with code {code}" if code is not None else "stopped answering"
        where = f" (log: {self.log_path})" if self.log_path else ""
        tail = self.log_tail(lines)
        return f"rollout server {self.name} at {self.url} {status}{where}; last log lines:\n{tail}"


class ServerDiedError(RuntimeError):
    """A rollout server process exited or stopped answering; the message quotes its log."""
