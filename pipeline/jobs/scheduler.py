"""Recurring retraining: `attnpipe schedule add/list/remove` and the one scheduling
process, `attnpipe scheduler`.

Schedules live in a SQLite table (`schedules.db` in the state folder) that the commands
write and the scheduler reads every few seconds, so schedules come and go while it runs.
The scheduler is APScheduler 3 with its SQLAlchemy job store on SQLite (`jobstore.db`),
which keeps each schedule's next slot: a scheduler that was down while a slot passed fires
it when it is back, within the misfire grace time, once (coalesced), and a file lock keeps
a second scheduler off the same state.

Every firing submits with submission id `<schedule>-<slot, UTC>`. Ray refuses a second job
with an id it holds, so a restarted scheduler or a repeated firing never runs a slot twice.
A slot whose previous run is still going is skipped. Each firing's outcome (submitted,
already submitted, skipped, missed, failed) is a row in the `firings` table and a line in
the log (stderr and `scheduler.log`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import signal
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

import yaml

from pipeline.config import JobSpec, cron_trigger, resolved_yaml, validate_spec
from pipeline.errors import UserError

FIRE = "pipeline.jobs.scheduler:fire_schedule"  # a textual reference: the job store pickles it
log = logging.getLogger("attnpipe.scheduler")


def default_state_dir() -> Path:
    """Where the scheduler keeps its state unless --state-dir or $ATTNPIPE_SCHEDULER_DIR
    say otherwise: a per-user folder ($XDG_STATE_HOME/attnpipe/scheduler, by default
    ~/.local/state/attnpipe/scheduler), the same whatever folder a command runs in and never
    inside a checkout."""
    base = os.environ.get("XDG_STATE_HOME", "").strip()
    root = Path(base) if base and Path(base).is_absolute() else Path.home() / ".local" / "state"
    return root / "attnpipe" / "scheduler"


@dataclass
class Schedule:
    """One schedule: a resolved spec, when to submit it, and where."""

    name: str
    cron: str
    timezone: str
    spec: str  # the resolved spec, YAML
    address: str | None = None  # None: the scheduler's RAY_ADDRESS
    image: str | None = None
    pip: list[str] = field(default_factory=list)
    entrypoint_cpus: float = 0.0
    source: str = ""

    @property
    def version(self) -> str:
        """Changes whenever the schedule does: the scheduler then replaces its job."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    def next_slot(self, after: datetime | None = None) -> datetime | None:
        now = after or datetime.now(timezone.utc)
        slot = cron_trigger(self.cron, self.timezone).get_next_fire_time(None, now)
        return slot.astimezone(timezone.utc) if slot else None


def slot_text(slot: datetime) -> str:
    return slot.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------- the state


class Store:
    """The schedules and the record of every firing, in `<state_dir>/schedules.db`."""

    def __init__(self, state_dir: str | Path) -> None:
        self.dir = Path(state_dir).resolve()
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"--state-dir {state_dir}: cannot create it: {exc.strerror}") from None
        self.path = self.dir / "schedules.db"
        with self._db() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS schedules (name TEXT PRIMARY KEY, body TEXT NOT NULL)"
            )
            db.execute(
                "CREATE TABLE IF NOT EXISTS firings (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                "schedule TEXT, slot TEXT, submission_id TEXT, outcome TEXT, detail TEXT, "
                "at TEXT)"
            )

    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30)
        try:
            with db:  # one transaction
                yield db
        finally:
            db.close()

    def put(self, schedule: Schedule, replace: bool = False) -> None:
        body = json.dumps(asdict(schedule))
        with self._db() as db:
            found = db.execute("SELECT 1 FROM schedules WHERE name = ?", (schedule.name,))
            if not replace and found.fetchone():
                raise UserError(
                    f"schedule {schedule.name!r} exists; pass --replace, or "
                    f"`attnpipe schedule remove {schedule.name}` first"
                )
            db.execute("INSERT OR REPLACE INTO schedules VALUES (?, ?)", (schedule.name, body))

    def get(self, name: str) -> Schedule | None:
        with self._db() as db:
            row = db.execute("SELECT body FROM schedules WHERE name = ?", (name,)).fetchone()
        return Schedule(**json.loads(row[0])) if row else None

    def all(self) -> list[Schedule]:
        with self._db() as db:
            rows = db.execute("SELECT body FROM schedules ORDER BY name").fetchall()
        return [Schedule(**json.loads(body)) for (body,) in rows]

    def remove(self, name: str) -> None:
        with self._db() as db:
            removed = db.execute("DELETE FROM schedules WHERE name = ?", (name,)).rowcount
        if not removed:
            known = ", ".join(s.name for s in self.all()) or "none"
            raise UserError(f"no schedule named {name!r} in {self.dir} (schedules: {known})")

    def record(self, name: str, slot: datetime, sid: str, outcome: str, detail: str = "") -> None:
        at = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        with self._db() as db:
            db.execute(
                "INSERT INTO firings (schedule, slot, submission_id, outcome, detail, at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (name, slot_text(slot), sid, outcome, detail, at),
            )
        log.info("%s slot %s: %s %s%s", name, slot_text(slot), outcome, sid, _dash(detail))

    def firings(self, name: str | None = None) -> list[dict[str, str]]:
        query = "SELECT schedule, slot, submission_id, outcome, detail, at FROM firings"
        with self._db() as db:
            db.row_factory = sqlite3.Row
            rows = (
                db.execute(query + " WHERE schedule = ? ORDER BY id", (name,))
                if name
                else db.execute(query + " ORDER BY id")
            ).fetchall()
        return [dict(r) for r in rows]


def _dash(detail: str) -> str:
    return f" - {detail}" if detail else ""


# --------------------------------------------------------------------------- commands


def add_schedule(
    spec: JobSpec,
    source: str,
    state_dir: str | Path,
    *,
    name: str | None = None,
    address: str | None = None,
    image: str | None = None,
    pip: Sequence[str] = (),
    entrypoint_cpus: float = 0.0,
    replace: bool = False,
) -> Schedule:
    """Store a schedule for the spec's `schedule` node; the scheduler picks it up."""
    from pipeline.jobs.submit import cluster_address

    if spec.schedule.cron is None:
        raise UserError(
            f"{source}: schedule.cron: not set; a schedule needs a cron expression, "
            "e.g. schedule.cron='0 3 * * *'"
        )
    name = name or spec.job.name
    if not all(c.isalnum() or c in "._-" for c in name) or not name[:1].isalnum():
        raise UserError(f"--name {name!r}: letters, digits, '.', '_' and '-' only")
    schedule = Schedule(
        name=name,
        cron=spec.schedule.cron,
        timezone=spec.schedule.timezone,
        spec=resolved_yaml(spec),
        address=cluster_address(address) if address else None,
        image=image,
        pip=list(pip),
        entrypoint_cpus=entrypoint_cpus,
        source=source,
    )
    Store(state_dir).put(schedule, replace=replace)
    return schedule


def schedule_table(store: Store) -> list[str]:
    """`attnpipe schedule list`: each schedule, its next slot and its last firing."""
    from pipeline.jobs.submit import columns

    last = {f["schedule"]: f for f in store.firings()}
    rows = [("NAME", "CRON", "TIMEZONE", "NEXT SLOT (UTC)", "LAST FIRING")]
    for s in store.all():
        slot = s.next_slot()
        fired = last.get(s.name)
        rows.append(
            (
                s.name,
                s.cron,
                s.timezone,
                slot_text(slot) if slot else "-",
                f"{fired['slot']} {fired['outcome']}" if fired else "-",
            )
        )
    return columns(rows)


# --------------------------------------------------------------------------- a firing


def fire_schedule(state_dir: str, name: str, version: str, slot: datetime | None = None) -> str:
    """Submit one slot of a schedule, at most once; returns the outcome it recorded.
    (`version` only tells the scheduler when a stored job is out of date.)"""
    if slot is None:  # a default only because APScheduler checks the stored arguments
        raise ValueError("fire_schedule needs its slot: the scheduler's executor passes it")
    from pipeline.jobs.submit import (
        ACTIVE,
        AlreadySubmitted,
        Cluster,
        status_of,
        submission_id,
        submit_spec,
    )

    store = Store(state_dir)
    schedule = store.get(name)
    sid = submission_id(name, slot)
    if schedule is None:
        log.info("%s slot %s: the schedule was removed; nothing submitted", name, slot_text(slot))
        return "removed"
    try:
        cluster = Cluster(schedule.address)
        if cluster.exists(sid):
            store.record(name, slot, sid, "already submitted")
            return "already submitted"
        busy = [
            j.submission_id
            for j in cluster.jobs()
            if (j.metadata or {}).get("attnpipe.schedule") == name and status_of(j) in ACTIVE
        ]
        if busy:
            store.record(name, slot, sid, "skipped", f"{busy[-1]} is still running")
            return "skipped"
        spec = validate_spec(yaml.safe_load(schedule.spec), f"schedule {name}")
        submit_spec(
            spec,
            cluster,
            sid,
            image=schedule.image,
            pip=schedule.pip,
            entrypoint_cpus=schedule.entrypoint_cpus,
            metadata={"attnpipe.schedule": name, "attnpipe.slot": slot_text(slot)},
        )
    except AlreadySubmitted:
        store.record(name, slot, sid, "already submitted")
        return "already submitted"
    except UserError as exc:
        store.record(name, slot, sid, "failed", str(exc))
        return "failed"
    store.record(name, slot, sid, "submitted")
    return "submitted"


def _slot_executor(max_workers: int) -> Any:
    """A thread pool that hands each firing its slot. APScheduler 3 calls a job function
    without the time it was scheduled for, and that time is the submission id; this
    overrides the one method that starts a run (APScheduler is pinned below 4)."""
    from apscheduler.executors.base import run_job
    from apscheduler.executors.pool import ThreadPoolExecutor

    class AtSlot:
        """The job as run_job sees it, with `slot=` added to its keyword arguments."""

        def __init__(self, job: Any, slot: datetime) -> None:
            self.id, self.func, self.args = job.id, job.func, job.args
            self.misfire_grace_time = job.misfire_grace_time
            self.kwargs = {**job.kwargs, "slot": slot}
            self.text = str(job)

        def __str__(self) -> str:
            return self.text

    class SlotExecutor(ThreadPoolExecutor):  # type: ignore[misc]
        def _do_submit_job(self, job: Any, run_times: list[datetime]) -> None:
            def run() -> list[Any]:
                alias, logger = job._jobstore_alias, self._logger.name
                return [e for t in run_times for e in run_job(AtSlot(job, t), alias, [t], logger)]

            def done(future: Any) -> None:
                exc = future.exception()
                if exc is not None:
                    self._run_job_error(job.id, exc, exc.__traceback__)
                else:
                    self._run_job_success(job.id, future.result())

            self._pool.submit(run).add_done_callback(done)

    return SlotExecutor(max_workers)


# --------------------------------------------------------------------------- the scheduler


def acquire_lock(state_dir: Path) -> IO[str]:
    """One scheduler per state folder: an exclusive lock that the kernel drops when the
    process dies, so a crashed scheduler leaves nothing stale behind."""
    handle = open(state_dir / "scheduler.lock", "a+")  # noqa: SIM115 (held for the run)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        pid = handle.read().strip() or "?"
        handle.close()
        raise UserError(
            f"another scheduler is already running on {state_dir} (pid {pid}); "
            "one scheduler per state folder"
        ) from None
    handle.truncate(0)
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def _sync(scheduler: Any, store: Store, grace: int) -> None:
    """Make the scheduler's jobs the stored schedules: new ones added, changed ones
    replaced, removed ones dropped. An unchanged job keeps its next slot, so a slot missed
    while the scheduler was down still fires."""
    wanted = {s.name: s for s in store.all()}
    jobs = {j.id: j for j in scheduler.get_jobs()}
    for name in jobs.keys() - wanted.keys():
        scheduler.remove_job(name)
        log.info("%s: removed", name)
    for name, s in wanted.items():
        kwargs = {"state_dir": str(store.dir), "name": name, "version": s.version}
        job = jobs.get(name)
        if job is not None and job.kwargs == kwargs:
            if job.misfire_grace_time != grace:
                scheduler.modify_job(name, misfire_grace_time=grace)
            continue
        job = scheduler.add_job(
            FIRE,
            trigger=cron_trigger(s.cron, s.timezone),
            id=name,
            name=name,
            kwargs=kwargs,
            misfire_grace_time=grace,
            replace_existing=True,
        )
        slot = s.next_slot()
        log.info("%s: scheduled '%s' %s, next slot %s", name, s.cron, s.timezone,
                 slot_text(slot) if slot else "none")  # fmt: skip


def _on_event(store: Store) -> Any:
    """Slots APScheduler drops before they reach a firing are recorded too."""
    from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_MAX_INSTANCES, EVENT_JOB_MISSED

    from pipeline.jobs.submit import submission_id

    def listener(event: Any) -> None:
        if event.code == EVENT_JOB_MISSED:
            slot = event.scheduled_run_time
            store.record(event.job_id, slot, submission_id(event.job_id, slot), "missed",
                         "later than the misfire grace time")  # fmt: skip
        elif event.code == EVENT_JOB_MAX_INSTANCES:
            for slot in event.scheduled_run_times:
                store.record(event.job_id, slot, submission_id(event.job_id, slot), "skipped",
                             "the previous firing is still submitting")  # fmt: skip
        elif event.code == EVENT_JOB_ERROR:
            log.error("%s: firing failed: %r", event.job_id, event.exception)

    return listener, EVENT_JOB_MISSED | EVENT_JOB_MAX_INSTANCES | EVENT_JOB_ERROR


def run_scheduler(state_dir: str | Path, misfire_grace_s: int = 600, poll_s: float = 5.0) -> None:
    """Fire every stored schedule until SIGINT or SIGTERM."""
    store = Store(state_dir)
    lock = acquire_lock(store.dir)  # first: a second scheduler learns it at once
    from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
    from apscheduler.schedulers.background import BackgroundScheduler

    _log_to(store.dir / "scheduler.log")
    scheduler = BackgroundScheduler(
        jobstores={"default": SQLAlchemyJobStore(url=f"sqlite:///{store.dir / 'jobstore.db'}")},
        executors={"default": _slot_executor(4)},
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": misfire_grace_s},
        timezone="UTC",
    )
    listener, mask = _on_event(store)
    scheduler.add_listener(listener, mask)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    scheduler.start(paused=True)  # reconcile before any slot fires
    try:
        _sync(scheduler, store, misfire_grace_s)
        scheduler.resume()
        log.info("scheduler running (pid %d; Ctrl-C or `kill %d` stops it): state in %s, "
                 "%d schedule(s), misfire grace %ds", os.getpid(), os.getpid(), store.dir,
                 len(scheduler.get_jobs()), misfire_grace_s)  # fmt: skip
        while not stop.wait(poll_s):
            try:
                _sync(scheduler, store, misfire_grace_s)
            except Exception:  # a locked database, a bad row: the next poll tries again
                log.exception("reading the schedules failed")
    finally:
        scheduler.shutdown(wait=False)
        log.info("scheduler stopped")
        lock.close()


def _log_to(path: Path) -> None:
    """Plain timestamped lines on stderr and in `scheduler.log`; APScheduler's own only
    when something went wrong."""
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%S")
    for handler in (logging.StreamHandler(), logging.FileHandler(path)):
        handler.setFormatter(formatter)
        for name, level in (("attnpipe.scheduler", logging.INFO), ("apscheduler", logging.WARNING)):
            logger = logging.getLogger(name)
            logger.setLevel(level)
            logger.addHandler(handler)
