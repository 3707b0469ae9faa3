"""One batch of events through the pure core, as offline code drives it (evaluation, training sets).

:func:`apply_batch` groups the events by key, runs the user stage
(:func:`streams.core.state.apply_user_batch`) and then the item stage
(:func:`streams.core.state.apply_item_batch`) on the item upserts and the user stage's
forwards. What a caller does with the new item states (which replica to update, which times
to remember) is left to it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from streams.core.state import (
    CoreConfig,
    Forward,
    ItemState,
    ItemVectorSource,
    UserState,
    apply_item_batch,
    apply_user_batch,
    upsert_forward,
)
from streams.events import Event, EventType

__all__ = ["apply_batch"]


def apply_batch(
    events: Iterable[Event],
    cfg: CoreConfig,
    users: dict[str, UserState],
    items: dict[str, ItemState],
    replica: ItemVectorSource,
) -> list[tuple[str, list[Forward], ItemState]]:
    """Apply one batch of events (arrival order): the user stage, then the item stage.

    An ``item_upsert`` goes straight to the item stage, ahead of the user stage's forwards
    (whether or not it carries a ``user_id``: routed by type, as the live worker routes it);
    every other event goes to its user (one without a user id is skipped).
    The user stage reads item vectors from ``replica`` as of the start of the batch.
    ``users`` and ``items`` are updated in place; the result is every item the item stage
    applied, in order, as ``(item_id, forwards applied, new state)``.
    """
    by_user: dict[str, list[Event]] = defaultdict(list)
    by_item: dict[str, list[Forward]] = defaultdict(list)
    for ev in events:
        if ev.type is EventType.ITEM_UPSERT:  # routed by type, as the live worker does
            if ev.item_id is not None:
                by_item[ev.item_id].append(upsert_forward(ev))
        elif ev.user_id is not None:
            by_user[ev.user_id].append(ev)
    batch = [(uid, users.get(uid), evs) for uid, evs in by_user.items()]
    for (uid, _, _), (ustate, out) in zip(batch, apply_user_batch(batch, cfg, replica), strict=True):
        users[uid] = ustate
        for fw in out.forwards:
            by_item[fw.item_id].append(fw)
    item_batch = [(iid, items.get(iid), fws) for iid, fws in by_item.items()]
    applied = []
    for (iid, _, fws), istate in zip(item_batch, apply_item_batch(item_batch, cfg), strict=True):
        items[iid] = istate
        applied.append((iid, fws, istate))
    return applied
