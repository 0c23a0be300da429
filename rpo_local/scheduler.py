"""Periodic local fine-tuning inside the daemon.

When a profile is due (`rpo_local.training.due`, the rule `rpo train auto` applies too: enough
new material since its last run, and the interval passed), the scheduler starts `rpo train
auto` as a separate, low-priority process, so serving never waits for training. When that run
reports `"activated"`, the daemon switches the reflection engine to the profile's new adapter
between requests.

While `style` is on, the scheduler also rebuilds a profile's style vector (`rpo style build`,
seconds of work) whenever STYLE_MIN_NEW texts arrived since its last build, before the first
training and between trainings: never two background jobs at once. The daemon's worker picks
up the new vector on the next request.

What a run covered and when it started are the database's (`train_runs`), so a restart
neither retrains on old material nor forgets when the last run was; `scheduler.json` beside
the database keeps the report and log file of the scheduler's own last run per profile.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rpo_local import paths
from rpo_local.config import Config
from rpo_local.db import now
from rpo_local.fsutil import atomic_write_text
from rpo_local.names import file_stem
from rpo_local.training.due import training_due

if TYPE_CHECKING:
    from rpo_local.store import Store

STATE_FILE = "scheduler.json"
NICE = 10
STYLE_MIN_NEW = 5  # new texts that make a style vector worth rebuilding (it costs seconds)
Switch = Callable[[str], None]
CommandFactory = Callable[[str], Sequence[str]]
log = logging.getLogger(__name__)


def train_command(profile: str, device: str = "auto") -> list[str]:
    """The real training verb on `device` (the daemon's config device); prints one JSON object on stdout."""
    return [sys.executable, "-m", "rpo_local", "train", "auto", "--profile", profile, "--device", device, "--json"]


def style_command(profile: str) -> list[str]:
    """The real style-vector verb; prints one JSON object on stdout."""
    return [sys.executable, "-m", "rpo_local", "style", "build", "--profile", profile, "--json", "--quiet"]


def state_path() -> Path:
    return paths.data_dir() / STATE_FILE


def read_state(path: Path | None = None) -> dict:
    """The persisted scheduler state ({} when there is none or it is unreadable)."""
    path = path or state_path()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def parse_report(stdout: str) -> dict | None:
    """The JSON object a training run printed (pretty-printed or on one line), if any."""
    text = stdout.strip()
    try:
        data = json.loads(text)
        return data if isinstance(data, dict) else None
    except ValueError:
        pass
    decoder = json.JSONDecoder()
    for i in range(len(text) - 1, -1, -1):  # the last complete object wins
        if text[i] == "{":
            try:
                data, end = decoder.raw_decode(text, i)
            except ValueError:
                continue
            if isinstance(data, dict) and not text[end:].strip():
                return data
    return None


def background_threads() -> int:
    """CPU threads a background training run may use: half the CPUs, the rest stay for serving.

    Priority alone is not enough: llama.cpp's and torch's worker threads spin while they wait
    for each other, so two processes each running a thread per core slowed both more than 10x
    on a 2-core machine.
    """
    return max(1, (os.cpu_count() or 2) // 2)


def low_priority(cmd: Sequence[str]) -> tuple[list[str], dict]:
    """`cmd` made to run at low CPU priority on `background_threads()`, and the Popen keywords."""
    env = {**os.environ, "RPO_N_THREADS": str(background_threads())}
    if os.name == "nt":
        return list(cmd), {"creationflags": subprocess.BELOW_NORMAL_PRIORITY_CLASS, "env": env}
    nice = shutil.which("nice")
    return ([nice, "-n", str(NICE), *cmd] if nice else list(cmd)), {"env": env}


class TrainScheduler:
    """Watches every profile and runs one training process at a time."""

    def __init__(
        self,
        store: Store,
        config: Config,
        *,
        switch: Switch | None = None,
        command: CommandFactory | None = None,  # default: train_command on config.device
        style: CommandFactory = style_command,
        check_s: float = 60.0,
        state_file: Path | None = None,
        log_dir: Path | None = None,
        persist: bool = True,
    ) -> None:
        self.store = store
        self.config = config
        self.switch = switch
        self.command = command or (lambda profile: train_command(profile, config.device))
        self.style_command = style
        self.check_s = check_s
        self.state_file = state_file or state_path()
        self.log_dir = log_dir or paths.runs_dir()
        self.persist = persist
        self.state: dict[str, Any] = read_state(self.state_file)
        self.state.setdefault("profiles", {})
        self._lock = threading.RLock()  # the state, and `store`'s connection (status() comes from other threads)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._proc: subprocess.Popen | None = None
        self._running: dict | None = None  # the run in progress: profile, started_at, files
        self._style: tuple[subprocess.Popen, str, int, str] | None = None  # (process, profile, texts, stdout file)
        self._last_check: str | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="rpo-train-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop watching; a training run still going is terminated (its output is discarded)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        for proc in (self._proc, self._style[0] if self._style else None):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    def wake(self) -> None:
        """Check now rather than at the next tick (new material arrived)."""
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # a scheduler bug must never take the daemon down, nor go unseen
                log.exception("training scheduler failed; it keeps watching")
            self._wake.wait(1.0 if self._proc is not None or self._style is not None else self.check_s)
            self._wake.clear()

    # -- one step -------------------------------------------------------------------------------

    def tick(self) -> None:
        """Collect a finished run, or start one for the first profile that is due."""
        with self._lock:
            self._tick()

    def _tick(self) -> None:
        if self._proc is not None:
            if self._proc.poll() is None:
                return
            self._finish()
        self._last_check = now()
        if self._style is not None and not self._style_finished():
            return
        profiles = [p["name"] for p in self.store.list_profiles()]
        for profile in profiles:
            if self._due(profile):
                self._launch(profile)
                return
        for profile in profiles:
            if (texts := self._style_due(profile)) is not None:
                self._launch_style(profile, texts)
                return

    # -- style vectors --------------------------------------------------------------------------

    def _style_due(self, profile: str) -> int | None:
        """The profile's text count when its style vector should be (re)built, else None."""
        from rpo_local.style import MIN_PAIRS

        if not self.config.style:
            return None
        texts = self.store.count_items(profile)
        built = (self.state["profiles"].get(profile) or {}).get("style", {}).get("texts", 0)
        return texts if texts >= MIN_PAIRS and texts - built >= STYLE_MIN_NEW else None

    def _launch_style(self, profile: str, texts: int) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        out_path = self.log_dir / f"style-{file_stem(profile)}.json"
        cmd, extra = low_priority(self.style_command(profile))
        try:
            with open(out_path, "wb") as out:
                proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        start_new_session=os.name == "posix", **extra)
        except OSError as exc:
            self._style_done(profile, texts, "failed", f"cannot start {cmd[0]}: {exc.strerror or exc}", None)
            return
        self._style = (proc, profile, texts, str(out_path))

    def _style_finished(self) -> bool:
        """Record the style build once it is over; False while it runs."""
        assert self._style is not None
        proc, profile, texts, out_path = self._style
        if proc.poll() is None:
            return False
        self._style = None
        report = parse_report(Path(out_path).read_text(encoding="utf-8", errors="replace")) or {}
        ok = proc.returncode == 0 and report.get("path")
        self._style_done(profile, texts, "built" if ok else "failed",
                         None if ok else f"exit code {proc.returncode}; see {out_path}", report.get("path"))
        return True

    def _style_done(self, profile: str, texts: int, status: str, reason: str | None, path: str | None) -> None:
        """A failed build is recorded like a finished one: the next try waits for STYLE_MIN_NEW more texts."""
        self.state["profiles"].setdefault(profile, {})["style"] = {
            "texts": texts, "finished_at": now(), "status": status, "reason": reason, "path": path}
        self._save()

    def _due(self, profile: str) -> bool:
        return training_due(self.store, profile, self.config).due

    def _launch(self, profile: str) -> None:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        base = self.log_dir / f"auto-{file_stem(profile)}-{stamp}"
        out_path, log_path = base.with_suffix(".json"), base.with_suffix(".log")
        cmd, extra = low_priority(self.command(profile))
        started = now()
        try:
            with open(out_path, "wb") as out, open(log_path, "wb") as log:
                # A new session: Ctrl-C in the daemon's terminal is handled by the daemon, which
                # then terminates the run itself.
                self._proc = subprocess.Popen(
                    cmd, stdout=out, stderr=log, stdin=subprocess.DEVNULL,
                    start_new_session=os.name == "posix", **extra,
                )
        except OSError as exc:
            reason = f"cannot start {cmd[0]}: {exc.strerror or exc}"
            self._record_failure(profile, started, reason)
            self.state["profiles"].setdefault(profile, {})["last_run"] = {
                "started_at": started, "finished_at": now(), "status": "failed", "adapter": None,
                "reason": reason, "figures": {}, "returncode": None, "log": None,
            }
            self._save()
            return
        self._running = {
            "profile": profile, "started_at": started, "pid": self._proc.pid,
            "stdout": str(out_path), "log": str(log_path),
        }
        print(f"rpo: training run started for profile {profile!r} (pid {self._proc.pid}, log {log_path})",
              file=sys.stderr, flush=True)

    def _finish(self) -> None:
        run, proc = self._running or {}, self._proc
        assert proc is not None
        self._proc, self._running = None, None
        stdout = Path(run["stdout"]).read_text(encoding="utf-8", errors="replace")
        report = parse_report(stdout) or {}
        status = report.get("status") if report.get("status") in {"activated", "rejected", "skipped", "failed"} else "failed"
        reason = report.get("reason") or (
            None if proc.returncode == 0 and report else f"exit code {proc.returncode}, no JSON report"
        )
        last = {
            "started_at": run["started_at"], "finished_at": now(), "status": status,
            "adapter": report.get("adapter"), "reason": reason, "figures": report.get("figures") or {},
            "returncode": proc.returncode, "log": run["log"],
        }
        profile = run["profile"]
        if status == "failed":
            self._record_failure(profile, run["started_at"], reason or "failed")
        with self._lock:
            self.state["profiles"].setdefault(profile, {})["last_run"] = last
            self._save()
        detail = f"; its log: {run['log']}" if status == "failed" else ""
        print(f"rpo: training run for {profile!r}: {status} ({reason or 'ok'}){detail}", file=sys.stderr, flush=True)
        if status == "activated" and self.switch is not None:
            self.switch(profile)

    # -- material and timing --------------------------------------------------------------------

    def _record_failure(self, profile: str, started: str, reason: str) -> None:
        """A run that failed before recording itself (it could not start, or died first) becomes
        a failed train_runs row, so the interval applies before the next attempt."""
        runs = self.store.list_train_runs(profile, limit=1)
        if runs and runs[0]["started_at"] >= started:
            return  # the run recorded itself
        run_id = self.store.start_train_run(profile, "sft")
        self.store.finish_train_run(run_id, "failed", error=reason)

    def profile_status(self, profile: str) -> dict:
        due = training_due(self.store, profile, self.config)
        entry = self.state["profiles"].get(profile) or {}
        return {
            "due": due.due,
            "reason": due.reason,
            "new_material": due.new_material,
            "needed": due.needed,
            "interval_ok": due.interval_ok,
            "next_run_earliest": due.next_run_earliest.isoformat() if due.next_run_earliest else None,
            "last_run": entry.get("last_run"),
            "style": entry.get("style"),
        }

    def status(self) -> dict:
        with self._lock:
            return self._status()

    def _status(self) -> dict:
        running = None
        if self._running is not None:
            running = {k: self._running[k] for k in ("profile", "started_at", "pid", "log")}
        return {
            "enabled": not self._stop.is_set() and self._thread is not None and self._thread.is_alive(),
            "check_every_s": self.check_s,
            "interval_hours": self.config.train_interval_hours,
            "min_new_items": self.config.train_min_new_items,
            "last_check": self._last_check,
            "running": running,
            "profiles": {p["name"]: self.profile_status(p["name"]) for p in self.store.list_profiles()},
        }

    def _save(self) -> None:
        if self.persist:
            atomic_write_text(self.state_file, json.dumps(self.state, indent=2) + "\n")


def summary(store: Store, config: Config, profile: str) -> dict:
    """A profile's training status as the daemon sees it, read-only (`rpo doctor`)."""
    return TrainScheduler(store, config, persist=False).profile_status(profile)
