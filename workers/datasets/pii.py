"""Personal data in row text: e-mail addresses, phone numbers, payment cards, IBANs.

Tuned to flag what a compliance officer would call personal data and to stay quiet on
the numbers every dataset is full of (dates, prices, counts, IDs, version numbers):
payment cards must pass the Luhn check, IBANs the ISO 13616 mod-97 check, and a phone
number needs an international "+" prefix or a national layout with separators (a
trunk "0" prefix, or the North American 3-3-4 grouping). A bare run of digits is never
a phone number. Findings are only ever shown masked.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

EMAIL = "email"
PHONE = "phone"
PAYMENT_CARD = "payment_card"
IBAN = "iban"
KINDS = (EMAIL, PHONE, PAYMENT_CARD, IBAN)

# The part after the "@"; the local part is walked back by hand from each "@", which is
# far cheaper than letting a regex try every word of the text.
_DOMAIN = re.compile(
    r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*\.[A-Za-z]{2,24}\b"
)
_LOCAL = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._%+-")
# A number written with single separators between digit groups: "+44 20 7946 0958",
# "(555) 123-4567", "4111-1111-1111-1111", "+49 (0)30 1234567".
_NUMBER = re.compile(r"\+?\(?[0-9]+\)?(?:(?:[ .\-]|(?<=\)))\(?[0-9]+\)?)*")
# Stretches of text that could hold a number or an IBAN; the precise patterns below run
# only inside them (one cheap scan of the whole text instead of two slow ones).
_SPAN = re.compile(r"[+(0-9A-Z][0-9A-Z() .\-]{6,}[0-9)]")
_IBAN = re.compile(r"[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]){11,30}")
_NOT_DIGIT = re.compile(r"[^0-9]")
_GROUPS = re.compile(r"[0-9]+")
_BEFORE_NUMBER = frozenset("+-./_,") | frozenset("0123456789")

# ISO 13616 IBAN lengths by country (SWIFT IBAN registry).
_IBAN_LENGTHS = {
    code: int(n)
    for code, n in re.findall(
        r"([A-Z]{2}):(\d+)",
        ":"
        "AD:24 AE:23 AL:28 AT:20 AZ:28 BA:20 BE:16 BG:22 BH:22 BI:27 BR:29 BY:28 CH:21 "
        "CR:22 CY:28 CZ:24 DE:22 DJ:27 DK:18 DO:28 EE:20 EG:29 ES:24 FI:18 FK:18 FO:18 "
        "FR:27 GB:22 GE:22 GI:23 GL:18 GR:27 GT:28 HR:21 HU:28 IE:22 IL:23 IQ:23 IS:26 "
        "IT:27 JO:30 KW:30 KZ:20 LB:28 LC:32 LI:21 LT:20 LU:20 LV:21 LY:25 MC:27 MD:24 "
        "ME:22 MK:19 MN:20 MR:27 MT:31 MU:30 NI:28 NL:18 NO:15 OM:23 PK:24 PL:28 PS:29 "
        "PT:25 QA:29 RO:24 RS:22 RU:33 SA:24 SC:31 SD:18 SE:24 SI:19 SK:24 SM:27 SO:23 "
        "ST:25 SV:28 TL:23 TN:24 TR:26 UA:29 VA:22 VG:24 XK:20 YE:30",
    )
}


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def card_prefix(digits: str) -> bool:
    """The issuer prefixes of the card networks in use (Visa, Mastercard, American Express,
    Diners, JCB, Discover, UnionPay, Maestro): a 13-digit millisecond timestamp or an
    order number that happens to pass Luhn does not start like a card."""
    first = digits[0]
    if first in "3456":
        return True
    return first == "2" and 2221 <= int(digits[:4]) <= 2720


def iban_valid(compact: str) -> bool:
    rearranged = compact[4:] + compact[:4]
    try:
        number = int("".join(str(int(ch, 36)) for ch in rearranged))
    except ValueError:
        return False
    return number % 97 == 1


def may_contain(data: bytes | bytearray) -> bool:
    """False when the raw bytes of a JSON line cannot hold any finding: no "@" and fewer
    than 8 digits. (JSON escapes only ever add digits, and never hide one.) Much cheaper
    than building a row's text to scan it."""
    return b"@" in data or len(data) - len(data.translate(None, b"0123456789")) >= 8


def find(text: str) -> list[tuple[str, str]]:
    """Every finding in text as (kind, matched text)."""
    found: list[tuple[str, str]] = []
    if "@" in text:
        found.extend((EMAIL, email) for email in _emails(text))
    # Every phone number, card and IBAN has at least 8 digits, and most prose has fewer:
    # counting them is far cheaper than any regex scan.
    data = text.encode("utf-8", "surrogatepass")
    if len(data) - len(data.translate(None, b"0123456789")) < 8:
        return found
    for span in _SPAN.finditer(text):
        start, end = span.span()
        for m in _NUMBER.finditer(text, start, end):
            s = m.group()
            if len(s) < 8:
                continue
            i = m.start()
            if i and (text[i - 1] in _BEFORE_NUMBER or text[i - 1].isalpha()):
                continue  # part of something longer: an ID, a decimal, a range
            j = m.end()
            if j < len(text) and (text[j].isalnum() or text[j] in "-/"):
                continue
            kind = classify_number(s)
            if kind:
                found.append((kind, s))
        if end - start >= 15:
            for m in _IBAN.finditer(text, start, end):
                i = m.start()
                if i and text[i - 1].isalnum():
                    continue
                iban = _iban_at(m.group())
                if iban:
                    found.append((IBAN, iban))
    return found


def _emails(text: str) -> list[str]:
    out = []
    at = text.find("@")
    while at != -1:
        m = _DOMAIN.match(text, at + 1)
        if m:
            start = at
            while start > 0 and at - start < 64 and text[start - 1] in _LOCAL:
                start -= 1
            while start < at and not text[start].isalnum():
                start += 1
            if start < at:
                out.append(text[start : m.end()])
        at = text.find("@", at + 1)
    return out


def _iban_at(s: str) -> str | None:
    compact = s.replace(" ", "")
    length = _IBAN_LENGTHS.get(compact[:2])
    if length is None:
        return None
    if len(compact) < length:
        return None
    if len(compact) > length:
        # The match ran on into the next word: cut it at the country's length, which
        # must fall on a gap in the written form.
        seen = 0
        for pos, ch in enumerate(s):
            if ch != " ":
                seen += 1
                if seen == length:
                    if pos + 1 < len(s) and s[pos + 1] != " ":
                        return None
                    s = s[: pos + 1]
                    break
        compact = compact[:length]
    return s if iban_valid(compact) else None


def classify_number(s: str) -> str | None:
    digits = _NOT_DIGIT.sub("", s)
    n = len(digits)
    plus = s.startswith("+")
    groups = _GROUPS.findall(s)
    separators = set(_GROUPS.sub("", s.lstrip("+")))
    if not plus and 13 <= n <= 19 and separators <= {" ", "-"}:
        # Card-like; a phone number is never written like this.
        return PAYMENT_CARD if card_prefix(digits) and luhn_valid(digits) else None
    if plus:
        if not 8 <= n <= 15 or digits[0] == "0":
            return None
        return PHONE
    if len(groups) < 2 or n > 13:
        return None  # a bare run of digits: an ID, an amount, a timestamp
    if separators == {"."} and len(groups) == 4 and all(len(g) <= 3 for g in groups):
        return None  # an IPv4 address
    lengths = [len(g) for g in groups]
    if lengths == [3, 3, 4] and digits[0] in "23456789":
        return PHONE  # North American: (555) 123-4567, 555-123-4567
    if lengths == [1, 3, 3, 4] and digits[0] == "1" and digits[1] in "23456789":
        return PHONE  # 1-800-555-0199
    if digits[0] == "0" and 9 <= n <= 12 and min(lengths) >= 2 and "." not in separators:
        return PHONE  # a national number with a trunk prefix: 020 7946 0958, 030 1234567
    return None


def mask(kind: str, value: str) -> str:
    """Enough of a finding to recognise its kind, never the whole value."""
    if kind == EMAIL:
        local, _, domain = value.partition("@")
        labels = domain.split(".")
        return f"{local[0]}***@{labels[0][0]}***.{labels[-1]}"
    if kind == IBAN:
        compact = value.replace(" ", "")
        masked = compact[:4] + "*" * (len(compact) - 6) + compact[-2:]
        return " ".join(masked[i : i + 4] for i in range(0, len(masked), 4))
    digits = sum(ch.isdigit() for ch in value)
    keep_last = 4 if kind == PAYMENT_CARD else 3
    keep_first = 0
    if kind == PHONE and value.startswith("+"):
        first = _GROUPS.search(value).group()
        keep_first = len(first) if len(first) <= 3 else 2
    out = []
    seen = 0
    for ch in value:
        if ch.isdigit():
            seen += 1
            if seen > keep_first and seen <= digits - keep_last:
                ch = "*"
        out.append(ch)
    return "".join(out)


@dataclass
class PiiTally:
    """Findings over a whole file: matches and rows per kind, a few masked examples."""

    max_examples: int = 5
    counts: dict[str, int] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    rows_with_any: int = 0

    def add(self, findings: list[tuple[str, str]]) -> None:
        if not findings:
            return
        self.rows_with_any += 1
        kinds = set()
        for kind, value in findings:
            self.counts[kind] = self.counts.get(kind, 0) + 1
            kinds.add(kind)
            examples = self.examples.setdefault(kind, [])
            if len(examples) < self.max_examples:
                masked = mask(kind, value)
                if masked not in examples:
                    examples.append(masked)
        for kind in kinds:
            self.rows[kind] = self.rows.get(kind, 0) + 1

    def as_dict(self) -> dict[str, dict]:
        return {
            kind: {
                "count": self.counts[kind],
                "rows": self.rows[kind],
                "examples": self.examples.get(kind, []),
            }
            for kind in KINDS
            if kind in self.counts
        }
