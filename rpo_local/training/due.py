"""The one rule for whether a profile is due for training, used by `rpo train auto` and by
the daemon's scheduler alike (so the daemon never starts a run that then skips).

New material is what came after the newest finished run on the profile's own texts (its
`train_runs` row records the newest item and feedback ids it trained on): history items
(accepted and edited rewrites become items) plus rejected rewrites. A profile is due when it
has `train_min_new_items` of it, holds at least MIN_ITEMS texts, and no run of any kind or
outcome (a failed or still running one included) started within `train_interval_hours`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rpo_local.config import Config
    from rpo_local.store import Store

MIN_ITEMS = 8  # fewer texts than this teach nothing and leave nothing to evaluate on


@dataclass(frozen=True)
class Due:
    due: bool
    reason: str
    new_material: int
    needed: int
    interval_ok: bool
    last_started: datetime | None
    next_run_earliest: datetime | None


def parse_time(value: str | None) -> datetime | None:
    """A stored timestamp (UTC when it carries no zone), None when missing or unreadable."""
    if not value:
        return None
    try:
        stamp = datetime.fromisoformat(value)
    except ValueError:
        return None
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)


def training_due(store: Store, profile: str, config: Config) -> Due:
    """Whether `profile` (which must exist) should be trained now, and why (not)."""
    new = store.new_material(profile, store.last_covered_marks(profile))
    needed = config.train_min_new_items
    runs = store.list_train_runs(profile, limit=1)
    last = parse_time(runs[0]["started_at"]) if runs else None
    earliest = last + timedelta(hours=config.train_interval_hours) if last else None
    now = datetime.now(UTC)
    interval_ok = earliest is None or now >= earliest
    total = store.count_items(profile)
    if new < needed:
        reason = f"{new} new texts or rejected rewrites since the last run; {needed} needed"
    elif total < MIN_ITEMS:
        reason = f"{total} texts in the profile; training needs at least {MIN_ITEMS}"
    elif not interval_ok:
        reason = f"last run {(now - last).total_seconds() / 3600:.1f} h ago; interval {config.train_interval_hours} h"
    else:
        reason = f"{new} new texts or rejected rewrites"
    return Due(new >= needed and total >= MIN_ITEMS and interval_ok, reason, new, needed, interval_ok, last, earliest)
