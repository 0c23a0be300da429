"""Running `rpo train sft --progress-json` as a child process and reading its progress.

The training verb prints one JSON object per line on stderr:
`{"event": "step", "step": i, "total": n, "loss": x, "eta_s": s}` ... then
`{"event": "done", ...}`. Other stderr lines become `{"event": "log", "message": line}`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable, Sequence

EventSink = Callable[[dict], None]


def train_command(profile: str) -> list[str]:
    """The fine-tuning run for `profile`, with this interpreter (works without `rpo` on PATH)."""
    return [sys.executable, "-m", "rpo_local", "train", "sft", "--profile", profile, "--progress-json"]


def parse_event(line: str) -> dict:
    line = line.strip()
    try:
        data = json.loads(line)
    except ValueError:
        return {"event": "log", "message": line}
    if not isinstance(data, dict) or "event" not in data:
        return {"event": "log", "message": line}
    return data


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = max(0, int(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class TrainProcess:
    """One training run; `run` blocks (call it from a worker thread), `cancel` stops it."""

    def __init__(self, command: Sequence[str]) -> None:
        self.command = list(command)
        self.proc: subprocess.Popen | None = None
        self.tail: deque[str] = deque(maxlen=5)  # last log lines, for the error message
        self.cancelled = False
        self._lock = threading.Lock()

    def run(self, on_event: EventSink) -> int:
        """Start the run, pass each event to `on_event`, return the exit code."""
        with self._lock:
            if self.cancelled:
                return -1
            self.proc = subprocess.Popen(
                self.command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE, text=True, encoding="utf-8", errors="replace",
            )
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            for segment in line.split("\r"):  # a progress bar redraws with \r on the same line
                if not segment.strip():
                    continue
                event = parse_event(segment)
                if event["event"] == "log":
                    self.tail.append(event["message"])
                on_event(event)
        return self.proc.wait()

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            if self.proc is not None and self.proc.poll() is None:
                self.proc.terminate()

    def failure(self, code: int) -> str:
        last = self.tail[-1] if self.tail else "no message"
        return f"training exited with code {code}: {last}"
