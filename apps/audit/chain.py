"""The audit hash chain: canonical serialisation, hashing and verification.

Pure functions over plain values, so that a verifier outside AIBox can re-implement
them from this file alone: each event's hash is

    sha256(prev_hash + "\\n" + canonical_json(fields))

where ``canonical_json`` is JSON with sorted keys, no insignificant whitespace and
UTF-8 text, and ``prev_hash`` of the first event is 64 zeros.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

GENESIS_HASH = "0" * 64

# The fields covered by the hash, in the form they are serialised.
HASHED_FIELDS = (
    "seq",
    "created_at",
    "actor_label",
    "action",
    "target_type",
    "target_id",
    "target_label",
    "outcome",
    "source_ip",
    "user_agent",
    "details",
)


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def format_timestamp(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="microseconds")


def event_payload(fields: Mapping[str, Any]) -> dict[str, Any]:
    payload = {name: fields[name] for name in HASHED_FIELDS}
    if isinstance(payload["created_at"], datetime):
        payload["created_at"] = format_timestamp(payload["created_at"])
    return payload


def compute_hash(prev_hash: str, fields: Mapping[str, Any]) -> str:
    data = prev_hash + "\n" + canonical_json(event_payload(fields))
    return hashlib.sha256(data.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ChainBreak:
    seq: int | None
    reason: str

    def __str__(self) -> str:
        where = f"event #{self.seq}" if self.seq is not None else "chain"
        return f"{where}: {self.reason}"


@dataclass(frozen=True)
class VerifyResult:
    checked: int
    first_hash: str | None
    last_hash: str | None
    error: ChainBreak | None

    @property
    def ok(self) -> bool:
        return self.error is None


class ChainChecker:
    """Checks events fed one at a time in chain order; remembers the first broken link.

    The streaming form of ``verify_events``: an export feeds every event of its range
    through one of these while it writes them out, so no range is ever held in memory.
    """

    def __init__(
        self, *, expected_prev_hash: str | None = GENESIS_HASH, expected_first_seq: int | None = 1
    ) -> None:
        self.checked = 0
        self.first_hash: str | None = None
        self.last_hash: str | None = None
        self.error: ChainBreak | None = None
        self._prev_hash = expected_prev_hash
        self._expected_seq = expected_first_seq

    def feed(self, event: Mapping[str, Any]) -> bool:
        """Check one event; False once the chain is broken (at this event or before)."""
        if self.error is not None:
            return False
        seq = event["seq"]
        expected_seq = self._expected_seq
        reason = None
        if expected_seq is not None and seq != expected_seq:
            if seq > expected_seq:
                missing = (
                    f"event #{expected_seq} is"
                    if seq - 1 == expected_seq
                    else f"events #{expected_seq}..#{seq - 1} are"
                )
                reason = f"{missing} missing before it"
            else:
                reason = f"out of order: expected #{expected_seq}"
        elif self._prev_hash is not None and event["prev_hash"] != self._prev_hash:
            reason = "its prev_hash does not match the previous event's hash"
        elif compute_hash(event["prev_hash"], event) != event["hash"]:
            reason = "its contents do not match its hash (altered after it was written)"
        if reason is not None:
            self.error = ChainBreak(seq, reason)
            return False
        self.checked += 1
        self.first_hash = self.first_hash or event["hash"]
        self.last_hash = self._prev_hash = event["hash"]
        self._expected_seq = seq + 1
        return True

    def result(self) -> VerifyResult:
        return VerifyResult(self.checked, self.first_hash, self.last_hash, self.error)


def verify_events(
    events: Iterable[Mapping[str, Any]],
    *,
    expected_prev_hash: str | None = GENESIS_HASH,
    expected_first_seq: int | None = 1,
) -> VerifyResult:
    """Check a run of events in chain order; stop at the first broken link.

    Each event is a mapping with the hashed fields plus ``prev_hash`` and ``hash``.
    For a range that does not start at the beginning of the chain, pass
    ``expected_prev_hash=None`` and ``expected_first_seq=None`` to trust the first
    event's link into the earlier part.
    """
    checker = ChainChecker(
        expected_prev_hash=expected_prev_hash, expected_first_seq=expected_first_seq
    )
    for event in events:
        if not checker.feed(event):
            break
    return checker.result()
