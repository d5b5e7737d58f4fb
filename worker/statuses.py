"""The provider's status groups (api/contract.md, "Status groups"): the one table of them.

A send result and a delivery report carry `status: {groupId, groupName, id, name, ...}`. The group
decides what the worker does: a send result in an accepted group is accepted, a report in a final
group ends the message's life.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final


class StatusGroup(StrEnum):
    ACCEPTED = "ACCEPTED"
    PENDING = "PENDING"
    UNDELIVERABLE = "UNDELIVERABLE"
    DELIVERED = "DELIVERED"
    EXPIRED = "EXPIRED"
    REJECTED = "REJECTED"


# groupId -> group, as documented.
GROUP_BY_ID: Final = {0: StatusGroup.ACCEPTED, 1: StatusGroup.PENDING, 2: StatusGroup.UNDELIVERABLE,
                      3: StatusGroup.DELIVERED, 4: StatusGroup.EXPIRED, 5: StatusGroup.REJECTED}
ID_BY_GROUP: Final = {group: group_id for group_id, group in GROUP_BY_ID.items()}
KNOWN_GROUPS: Final = frozenset(StatusGroup)
# A send result in one of these groups means the provider took the message.
ACCEPTED_GROUPS: Final = frozenset({StatusGroup.PENDING, StatusGroup.ACCEPTED, StatusGroup.DELIVERED})
# A report in one of these groups is the message's last.
FINAL_GROUPS: Final = frozenset({StatusGroup.DELIVERED, StatusGroup.UNDELIVERABLE, StatusGroup.EXPIRED,
                                 StatusGroup.REJECTED})
INTERMEDIATE_GROUPS: Final = KNOWN_GROUPS - FINAL_GROUPS
# The send result of a message id the provider has seen before (a resend after an ambiguous POST).
DUPLICATE_MESSAGE_ID: Final = "REJECTED_DUPLICATE_MESSAGE_ID"


def group_of(status: object) -> StatusGroup | None:
    """The status group of a status object, if it is one this code knows.

    The group's name decides when there is one: a name this code does not know (a group added to
    the API later, e.g. SCHEDULED) is unknown even when its groupId is that of a known group,
    because a guess could make a report final that is not. Only a status without a name is read by
    its groupId (the contract's table)."""
    if not isinstance(status, dict):
        return None
    name = status.get("groupName")
    if name is not None:
        return StatusGroup(name) if isinstance(name, str) and name in KNOWN_GROUPS else None
    group_id = status.get("groupId")
    if isinstance(group_id, int) and not isinstance(group_id, bool):
        return GROUP_BY_ID.get(group_id)
    return None
