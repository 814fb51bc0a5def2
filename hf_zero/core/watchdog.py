"""Hangs turned into errors: a rank that waits too long in one of hf_zero's collectives says what
it waits in and what every rank last did, and exits.

Collectives pair up across ranks by call order, so ranks that disagree (one calls `generate`,
`save_model`, `full_state_dict` or a step the others do not; a rank's data skips a unit's
collective; a rank died) leave the others waiting forever, silently on NCCL. Each engine keeps a
`CollectiveWatch`: the engine call under way (`forward`, `backward`, `step`, `generate`, ...), the
collectives it issued (operation, communicator, sequence number, unit) and the one it is waiting
in. One daemon thread per process looks at every watch: it publishes each rank's record into the
launcher's store about once a second, and when a wait has lasted `ZeroConfig.collective_timeout`
seconds it gives the other ranks a moment to notice their own waits, prints one report with every
rank's last record (a rank that stopped publishing is named as gone) and ends the process with exit
status `HANG_EXIT_STATUS`, so that the launcher stops the rest. A rank waiting in a collective when
another reports a hang reports it too, at once: it waits in the same hang. A rank ends only once the
other ranks that are reporting have written their reports, which the launcher, stopping every rank
once one exits, would otherwise cut off.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any

import torch.distributed as dist

HANG_EXIT_STATUS = 75
_KEY = "hf_zero/watch/{rank}"
# Counters in the launcher's store, so that every look costs one store operation at any world size:
_HUNG = "hf_zero/watch/hung"  # ranks that started reporting a hang (each then exits)
_REPORTED = "hf_zero/watch/reported"  # ranks whose report is written


class CollectiveWatch:
    """What one engine on this rank is doing, as the hang report tells it."""

    def __init__(self, timeout: float, rank: int, world_size: int, label: str = "hf_zero") -> None:
        self.timeout = timeout
        self.rank = rank
        self.world_size = world_size
        self.label = label
        self.call = "idle"  # the engine call under way
        self.issued = 0  # collectives issued so far, all communicators together
        self.last: dict[str, Any] | None = None  # the last one issued
        self.waiting: dict[str, Any] | None = None  # the one being waited in, with its start
        self.reported = False
        if timeout > 0 and world_size > 1:
            _monitor().add(self)

    def begin(self, name: str) -> None:
        """The engine call `name` starts (inside another call, the outer one keeps the label)."""
        if self.call == "idle":
            self.call = name

    def end(self, name: str) -> None:
        """The engine call `name` is over."""
        if self.call == name:
            self.call = "idle"

    @contextlib.contextmanager
    def engine_call(self, name: str) -> Iterator[None]:
        """Label what runs inside as the engine call `name` (`begin` and `end` around it)."""
        outer = self.call
        self.begin(name)
        try:
            yield
        finally:
            self.call = outer

    def issue(self, op: str, communicator: str, unit: int | None) -> dict[str, Any]:
        """Record a collective this rank issued; returns its record."""
        self.issued += 1
        self.last = {
            "op": op,
            "communicator": communicator,
            "seq": self.issued,
            "unit": unit,
            "call": self.call,
        }
        return self.last

    def wait_for_device(self, what: str) -> contextlib.AbstractContextManager:
        """Mark the block as a host wait for the device (`what`), behind the collectives issued so
        far: on NCCL that is where a collective no peer joins keeps the host waiting. Its errors
        (a device's own) are left as they are."""
        record = {"op": what, "device": True, "after": self.last, "call": self.call}
        return self.wait(record, name_errors=False)

    @contextlib.contextmanager
    def wait(self, record: dict[str, Any], name_errors: bool = True) -> Iterator[None]:
        """Mark this rank as waiting in the collective `record` while the block runs. A backend
        error there (a peer's connection closed: it died) is raised again naming the collective."""
        if self.waiting is not None:  # a wait inside a wait (a handle waited in a blocking call)
            yield
            return
        self.waiting = {**record, "since": time.monotonic()}
        try:
            yield
        except RuntimeError as error:
            if not name_errors:
                raise
            if self.reported:
                # This rank timed out too, and the monitor thread is writing its report: let it end
                # the process (it does within seconds) rather than this error overtaking it.
                time.sleep(10.0)
            elif _count(_HUNG) > 0:
                # The peer timed out first (its wait began earlier) and left: this rank's wait is the
                # same hang, so it reports it too, rather than a peer gone for an unknown reason.
                self.reported = True
                _report_and_exit(self, after_peer=True)
            message = (
                f"{self.label}: rank {self.rank}'s {describe(record)} failed (another rank may have died "
                f"or left this collective): {error}"
            )
            try:
                named = type(error)(message)
            except Exception:  # an error type that cannot be built from a message: keep it as it is
                raise error from None
            raise named from error
        finally:
            self.waiting = None

    def close(self) -> None:
        """Stop watching (the engine was closed)."""
        self.waiting = None
        if _MONITOR is not None:
            _MONITOR.watches.discard(self)

    def snapshot(self) -> dict[str, Any]:
        """This rank's record for the others: its call, its last collective, its wait."""
        waiting = self.waiting
        return {
            "rank": self.rank,
            "call": self.call,
            "last": self.last,
            "waiting": None if waiting is None else {**waiting, "for": time.monotonic() - waiting["since"]},
            "time": time.time(),
        }


def describe(record: dict[str, Any] | None) -> str:
    """`all_gather #12 on 'gather' (unit 3), in generate`."""
    if record is None:
        return "nothing yet"
    if record.get("device"):
        # On NCCL the host waits here for the collectives queued before, the last one named.
        return (
            f"a wait for the device ({record['op']}), in {record['call']}, behind {describe(record['after'])}"
        )
    unit = f" (unit {record['unit']})" if record.get("unit") is not None else ""
    return f"{record['op']} #{record['seq']} on '{record['communicator']}'{unit}, in {record['call']}"


class _Monitor:
    """The one thread per process that publishes the watches and ends a hung process."""

    def __init__(self) -> None:
        self.watches: weakref.WeakSet[CollectiveWatch] = weakref.WeakSet()
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None

    def add(self, watch: CollectiveWatch) -> None:
        with self.lock:
            self.watches.add(watch)
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._run, name="hf_zero-collective-watch", daemon=True)
                self.thread.start()

    def _run(self) -> None:
        published = 0.0
        while True:
            watches = list(self.watches)
            if not watches:
                time.sleep(1.0)
                continue
            tick = min(1.0, max(0.05, min(w.timeout for w in watches) / 10))
            time.sleep(tick)
            now = time.monotonic()
            if now - published >= min(1.0, tick * 5):
                published = now
                for watch in watches:
                    _publish(watch)
            for watch in watches:
                waiting = watch.waiting
                if waiting is None or watch.reported:
                    continue
                if now - waiting["since"] >= watch.timeout:
                    watch.reported = True
                    _report_and_exit(watch)
                elif _count(_HUNG) > 0:
                    watch.reported = True
                    _report_and_exit(watch, after_peer=True)


_MONITOR: _Monitor | None = None


def _monitor() -> _Monitor:
    global _MONITOR
    if _MONITOR is None:
        _MONITOR = _Monitor()
    return _MONITOR


def launcher_store() -> Any:
    """The launcher's key-value store (through the default process group), or None."""
    if not (dist.is_available() and dist.is_initialized()):
        return None  # the process group ended: nothing more to tell the others
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # no default group, or a torch without the accessor: report this rank alone
        return None


def _publish(watch: CollectiveWatch) -> None:
    store = launcher_store()
    if store is None:
        return
    with contextlib.suppress(Exception):  # a store gone with the launcher: nothing to tell
        store.set(_KEY.format(rank=watch.rank), json.dumps(watch.snapshot()))


def _read(rank: int) -> dict[str, Any] | None:
    store = launcher_store()
    key = _KEY.format(rank=rank)
    try:
        if store is None or not store.check([key]):
            return None
        return json.loads(store.get(key))
    except Exception:
        return None


def _count(key: str, add: int = 0) -> int:
    """The counter `key` in the launcher's store, after adding `add` (0 without a store)."""
    store = launcher_store()
    try:
        return 0 if store is None else int(store.add(key, add))
    except Exception:  # a store gone with the launcher: nothing to tell
        return 0


def _report_and_exit(watch: CollectiveWatch, after_peer: bool = False) -> None:
    """Tell what this rank waits in and what every rank last did; end the process. `after_peer`:
    another rank timed out first (it reported, or its leaving broke this rank's wait)."""
    waiting = watch.waiting or {}  # (read once: the wait may end meanwhile on the training thread)
    waited = (
        f"{time.monotonic() - waiting['since']:.1f} s, until another rank timed out,"
        if after_peer and waiting
        else f"{watch.timeout:g} s (ZeroConfig.collective_timeout)"
    )
    _publish(watch)
    _count(_HUNG, 1)  # first: the ranks waiting, and those whose wait this rank's exit breaks, report too
    # The other ranks' waits began about when this one's did: give them a moment to publish theirs,
    # unless one is reporting already (once the first rank leaves, the launcher ends the others).
    deadline = time.monotonic() + min(2.0, max(0.5, watch.timeout / 2))
    while not after_peer and time.monotonic() < deadline and _count(_HUNG) < 2:
        time.sleep(0.05)
    cause = (
        "a collective queued on the device has not finished: the ranks disagree about which collectives "
        "come next, or a rank is gone."
        if waiting.get("device")
        else "the ranks disagree about which collectives come next."
    )
    lines = [
        f"{watch.label}: rank {watch.rank} waited {waited} in {describe(waiting or watch.last)}; {cause}",
        "What each rank last issued:",
    ]
    now = time.time()
    for rank in range(watch.world_size):
        record = watch.snapshot() if rank == watch.rank else _read(rank)
        if record is None:
            lines.append(f"  rank {rank}: no record (it never started, or its process is gone)")
            continue
        stale = now - record["time"]
        state = (
            f"waiting {record['waiting']['for']:.1f} s in {describe(record['waiting'])}"
            if record["waiting"]
            else (f"running {record['call']}")
        )
        gone = f" (silent for {stale:.0f} s: its process may be gone)" if stale > 5 else ""
        lines.append(f"  rank {rank}: {state}; last issued {describe(record['last'])}{gone}")
    lines.append(
        "  Every rank must make the same hf_zero calls in the same order: forward/backward/step, generate, "
        "save_model and save_checkpoint, full_state_dict, gathered_parameters (see the README, "
        "'Which calls are collectives')."
    )
    # One write of the whole report: every rank writes to the same pipe at about the same moment,
    # and print's separate writes of text and newline let the reports run into each other.
    sys.stderr.flush()
    os.write(sys.stderr.fileno(), ("\n".join(lines) + "\n").encode())
    # The launcher stops every rank once one exits: stay until the peers that are reporting too have
    # written theirs (a slower one was cut off before its report under a loaded machine).
    _count(_REPORTED, 1)
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and _count(_REPORTED) < _count(_HUNG):
        time.sleep(0.05)
    os._exit(HANG_EXIT_STATUS)
