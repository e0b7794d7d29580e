"""Crontab expressions for `schedule.cron`, read as cron reads them."""

from __future__ import annotations

from typing import Any

_CRON_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")


def cron_trigger(expr: str, timezone: str = "UTC") -> Any:
    """An APScheduler CronTrigger for a crontab expression: `minute hour day month weekday`,
    or six fields with seconds first. Weekday numbers mean what they mean to cron (0 and 7
    are Sunday); APScheduler 3 counts from Monday, so they are passed as names."""
    from apscheduler.triggers.cron import CronTrigger

    fields = expr.split()
    if len(fields) not in (5, 6):
        raise ValueError(
            f"expected 5 fields (minute hour day month weekday) or 6 (seconds first), "
            f"got {len(fields)}"
        )
    second = fields[0] if len(fields) == 6 else "0"
    minute, hour, day, month, weekday = fields[-5:]
    return CronTrigger(
        second=second,
        minute=minute,
        hour=hour,
        day=day,
        month=month,
        day_of_week=_cron_weekdays(weekday),
        timezone=timezone,
    )


def _cron_weekdays(field: str) -> str:
    """Cron's numeric weekdays (`1-5`, `0,6`, `*/2`) as day names; names pass through."""
    if field == "*" or any(c.isalpha() for c in field):
        return field
    days: list[str] = []
    for part in field.split(","):
        base, _, step = part.partition("/")
        first, _, last = base.partition("-")
        try:
            lo, hi = (0, 6) if base == "*" else (int(first), int(last or (7 if step else first)))
            stride = int(step or 1)
        except ValueError:
            raise ValueError(f"day of week: cannot read {part!r}") from None
        if not (0 <= lo <= hi <= 7) or stride < 1:
            raise ValueError(f"day of week: {part!r} is outside 0-7 (0 and 7 are Sunday)")
        days += [_CRON_DAYS[d % 7] for d in range(lo, hi + 1, stride)]
    return ",".join(dict.fromkeys(days))
