"""Crash testing by SIGKILL: run a child, read what it acknowledges, kill it at seeded moments.

The child prints one line per event on stdout, flushed, and only once the event is done (for a log:
``ack <lsn>`` after ``append`` returned). Every complete line the parent reads, before or after the
kill, was printed by the child before it died, so it is a real acknowledgement; a torn last line is
ignored. After each kill the caller checks the survivors (``after_kill``): everything acknowledged
must be there.

Kill moments come from a ``random.Random(seed)``: each round either kills a uniform delay after the
spawn (which lands in start-up, recovery or the work itself), or, when a ``trigger`` is given, a
short uniform delay after the first line the trigger accepts (for example the start of a large
append). One seed reproduces one schedule; the OS decides the rest, so checks must hold for any
interleaving. The child runs in its own session and the whole group is killed, so a child that
spawns helpers (an engine with worker processes) is killed entirely.
"""

from __future__ import annotations

import os
import queue
import random
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence


@dataclass
class KillRound:
    index: int
    mode: str               # "timer": delay after spawn; "trigger": delay after a trigger line
    delay_s: float
    lines: int              # complete lines read from the child in this round
    last_line: str | None
    returncode: int         # -SIGKILL when killed; anything else: the child ended by itself
    triggered: bool         # a trigger line was seen (mode "trigger" only)


def _pump(stream, lines: queue.Queue) -> None:
    for raw in iter(stream.readline, b""):
        if raw.endswith(b"\n"):     # a line torn by the kill is not an acknowledgement
            lines.put(raw[:-1].decode())
    lines.put(None)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _one_round(index: int, argv: Sequence[str], on_line: Callable[[str], None], mode: str,
               delay_s: float, trigger, trigger_wait_s: float, round_timeout_s: float, env,
               cwd) -> KillRound:
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=err, env=env, cwd=cwd,
                                start_new_session=True)
        lines: queue.Queue = queue.Queue()
        reader = threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True)
        reader.start()
        start = time.monotonic()
        deadline = start + round_timeout_s
        # A trigger that never comes must not stall the round: kill at trigger_wait_s regardless.
        kill_at = start + delay_s if mode == "timer" else None
        if mode == "trigger":
            deadline = min(deadline, start + trigger_wait_s)
        count, last, triggered, eof = 0, None, False, False
        try:
            while not eof:
                now = time.monotonic()
                until = min(kill_at or deadline, deadline)
                if now >= until:
                    break
                try:
                    line = lines.get(timeout=until - now)
                except queue.Empty:
                    continue
                if line is None:
                    eof = True
                    break
                on_line(line)
                count, last = count + 1, line
                if mode == "trigger" and not triggered and trigger(line):
                    triggered, kill_at = True, time.monotonic() + delay_s
        finally:
            _kill_group(proc)
            proc.wait()
            reader.join()
        while not eof and (line := lines.get()) is not None:  # printed before death: acknowledged
            on_line(line)
            count, last = count + 1, line
        if proc.returncode not in (-signal.SIGKILL, 0):
            err.seek(0)
            tail = err.read()[-4000:].decode(errors="replace")
            raise RuntimeError(f"kill round {index}: child exited {proc.returncode} on its own:\n"
                               f"{tail}")
    return KillRound(index, mode, delay_s, count, last, proc.returncode, triggered)


def run_kill_loop(child_argv: Sequence[str], on_line: Callable[[str], None], kills: int, seed: int,
                  *, trigger: Callable[[str], bool] | None = None, trigger_fraction: float = 0.4,
                  max_delay_s: float = 0.5, trigger_delay_s: float = 0.003,
                  trigger_wait_s: float = 3.0,
                  after_kill: Callable[[KillRound], None] | None = None,
                  round_timeout_s: float = 20.0, env=None, cwd=None) -> list[KillRound]:
    """Spawn ``child_argv`` ``kills`` times, SIGKILL it at a seeded moment each time, hand every
    complete stdout line to ``on_line`` (in order, on this thread) and call ``after_kill`` after
    each round. The child must keep working until killed (it may exit 0 when done; any other exit
    raises RuntimeError with its stderr). Each round is bounded by ``round_timeout_s`` (and a
    trigger round by ``trigger_wait_s``)."""
    rng = random.Random(seed)
    rounds = []
    for index in range(kills):
        mode = "trigger" if trigger is not None and rng.random() < trigger_fraction else "timer"
        delay = rng.uniform(0.0, trigger_delay_s if mode == "trigger" else max_delay_s)
        rnd = _one_round(index, child_argv, on_line, mode, delay, trigger, trigger_wait_s,
                         round_timeout_s, env, cwd)
        rounds.append(rnd)
        if after_kill is not None:
            after_kill(rnd)
    return rounds
