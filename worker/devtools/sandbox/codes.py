"""The status and error objects the sandbox puts on the wire, taken from the vendor's code list."""

from __future__ import annotations

from typing import Any, Final

# Shared, never-mutated dicts: orjson serialises them as they are, so a 1000-message
# response reuses one status object instead of building 1000 of them.
JsonObj = dict[str, Any]


def _status(group_id: int, group_name: str, status_id: int, name: str, description: str) -> JsonObj:
    return {
        "groupId": group_id,
        "groupName": group_name,
        "id": status_id,
        "name": name,
        "description": description,
    }


def _error(group_id: int, group_name: str, error_id: int, name: str, description: str, permanent: bool) -> JsonObj:
    return {
        "groupId": group_id,
        "groupName": group_name,
        "id": error_id,
        "name": name,
        "description": description,
        "permanent": permanent,
    }


# --- statuses (group ids: 1 PENDING, 2 UNDELIVERABLE, 3 DELIVERED, 4 EXPIRED, 5 REJECTED) ---
PENDING_ACCEPTED: Final = _status(1, "PENDING", 26, "PENDING_ACCEPTED", "Message sent to next instance")
DELIVERED_TO_HANDSET: Final = _status(3, "DELIVERED", 5, "DELIVERED_TO_HANDSET", "Message delivered to handset")
UNDELIVERABLE_REJECTED_OPERATOR: Final = _status(
    2, "UNDELIVERABLE", 4, "UNDELIVERABLE_REJECTED_OPERATOR", "Message rejected by operator"
)
UNDELIVERABLE_NOT_DELIVERED: Final = _status(
    2, "UNDELIVERABLE", 9, "UNDELIVERABLE_NOT_DELIVERED", "Message sent not delivered"
)
EXPIRED_EXPIRED: Final = _status(4, "EXPIRED", 15, "EXPIRED_EXPIRED", "Message expired")
EXPIRED_DLR_UNKNOWN: Final = _status(4, "EXPIRED", 29, "EXPIRED_DLR_UNKNOWN", "Delivery report unknown")
REJECTED_NETWORK: Final = _status(5, "REJECTED", 6, "REJECTED_NETWORK", "Network is forbidden")
REJECTED_DESTINATION_BLOCKLISTED: Final = _status(
    5, "REJECTED", 14, "REJECTED_DESTINATION_BLOCKLISTED", "Destination is blocklisted"
)
REJECTED_DESTINATION_NOT_REGISTERED: Final = _status(
    5, "REJECTED", 18, "REJECTED_DESTINATION_NOT_REGISTERED", "Destination not registered"
)
REJECTED_FLOODING_FILTER: Final = _status(
    5, "REJECTED", 20, "REJECTED_FLOODING_FILTER", "Message rejected by the flooding filter"
)
REJECTED_DUPLICATE_MESSAGE_ID: Final = _status(
    5, "REJECTED", 23, "REJECTED_DUPLICATE_MESSAGE_ID", "Message ID is not unique"
)
REJECTED_MESSAGE_TOO_LONG: Final = _status(5, "REJECTED", 25, "REJECTED_MESSAGE_TOO_LONG", "Message too long")
MISSING_TO: Final = _status(5, "REJECTED", 51, "MISSING_TO", "Missing destination address")
REJECTED_DESTINATION: Final = _status(5, "REJECTED", 52, "REJECTED_DESTINATION", "Invalid destination address")
# Not in the vendor's list: the `unknown_status_rate` fault answers an accepted destination with it,
# standing for a status group the provider adds after the client was written.
SCHEDULED_ACCEPTED: Final = _status(7, "SCHEDULED", 99, "SCHEDULED_ACCEPTED", "Message accepted and scheduled")

# --- errors (group ids: 0 OK, 1 HANDSET_ERRORS, 2 USER_ERRORS, 3 OPERATOR_ERRORS) ---
NO_ERROR: Final = _error(0, "OK", 0, "NO_ERROR", "No Error", False)
EC_UNKNOWN_SUBSCRIBER: Final = _error(1, "HANDSET_ERRORS", 1, "EC_UNKNOWN_SUBSCRIBER", "Unknown subscriber", True)
EC_ABSENT_SUBSCRIBER_SM: Final = _error(1, "HANDSET_ERRORS", 6, "EC_ABSENT_SUBSCRIBER_SM", "Absent subscriber", False)
EC_ABSENT_SUBSCRIBER: Final = _error(1, "HANDSET_ERRORS", 27, "EC_ABSENT_SUBSCRIBER", "Absent subscriber", False)
EC_BLACKLISTED_DESTINATIONADDRESS: Final = _error(
    2, "USER_ERRORS", 2052, "EC_BLACKLISTED_DESTINATIONADDRESS", "Destination address blacklisted", True
)
EC_DESTINATION_FLOODING: Final = _error(2, "USER_ERRORS", 4103, "EC_DESTINATION_FLOODING", "Destination flooding", True)
EC_OPERATOR_NOT_FOUND: Final = _error(3, "OPERATOR_ERRORS", 345, "EC_OPERATOR_NOT_FOUND", "Operator not found", True)
EC_SMS_REJECTED_BY_MOBILE_OPERATOR: Final = _error(
    3, "OPERATOR_ERRORS", 632, "EC_SMS_REJECTED_BY_MOBILE_OPERATOR", "SMS rejected by mobile operator", True
)
EC_VP_EXPIRED: Final = _error(3, "OPERATOR_ERRORS", 4098, "EC_VP_EXPIRED", "Validity period expired", False)

# The four outcome kinds of --outcome-mix, each with the (status, error) pairs drawn from it.
# Several variants per kind so consumers see realistic variety, not one canned object.
OUTCOME_VARIANTS: Final[dict[str, tuple[tuple[JsonObj, JsonObj], ...]]] = {
    "delivered": ((DELIVERED_TO_HANDSET, NO_ERROR),),
    "undeliverable": (
        (UNDELIVERABLE_NOT_DELIVERED, EC_ABSENT_SUBSCRIBER),
        (UNDELIVERABLE_NOT_DELIVERED, EC_UNKNOWN_SUBSCRIBER),
        (UNDELIVERABLE_REJECTED_OPERATOR, EC_SMS_REJECTED_BY_MOBILE_OPERATOR),
    ),
    "expired": (
        (EXPIRED_EXPIRED, EC_VP_EXPIRED),
        (EXPIRED_EXPIRED, EC_ABSENT_SUBSCRIBER_SM),
        (EXPIRED_DLR_UNKNOWN, NO_ERROR),
    ),
    "rejected": (
        (REJECTED_NETWORK, EC_OPERATOR_NOT_FOUND),
        (REJECTED_DESTINATION_NOT_REGISTERED, EC_UNKNOWN_SUBSCRIBER),
        (REJECTED_DESTINATION_BLOCKLISTED, EC_BLACKLISTED_DESTINATIONADDRESS),
        (REJECTED_FLOODING_FILTER, EC_DESTINATION_FLOODING),
    ),
}
OUTCOME_KINDS: Final = tuple(OUTCOME_VARIANTS)

# Country prefix -> (MCC, MNC) of one big network there; longest prefix wins. The rest fall
# back to 001/01, the ITU test network, so mccMnc is always present and well-formed.
_MCC_MNC_BY_PREFIX: Final[dict[str, str]] = {
    "1": "310260",
    "33": "20801",
    "34": "21401",
    "39": "22201",
    "41": "22801",
    "44": "23415",
    "49": "26201",
    "52": "334020",
    "54": "722070",
    "55": "72405",
    "56": "73001",
    "57": "732101",
    "82": "45005",
    "90": "28601",
    "91": "40445",
    "351": "26801",
    "385": "21901",
    "598": "74801",
}
_DEFAULT_MCC_MNC: Final = "00101"


def mcc_mnc_for(to: str) -> str:
    """The MCC+MNC the sandbox pretends the destination belongs to."""
    digits = to[1:] if to[:1] == "+" else to
    table = _MCC_MNC_BY_PREFIX
    return table.get(digits[:3]) or table.get(digits[:2]) or table.get(digits[:1]) or _DEFAULT_MCC_MNC
