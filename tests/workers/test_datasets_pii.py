import json

import pytest

from workers.datasets import FileFormat, ValidationOptions, validate
from workers.datasets.pii import find, iban_valid, luhn_valid, mask


def kinds(text: str) -> list[str]:
    return [kind for kind, _ in find(text)]


@pytest.mark.parametrize(
    ("text", "kind", "found", "masked"),
    [
        ("write to john.doe@example.com today", "email", "john.doe@example.com", "j***@e***.com"),
        (
            "card 4242 4242 4242 4242, exp 12/27",
            "payment_card",
            "4242 4242 4242 4242",
            "**** **** **** 4242",
        ),
        ("card 4111-1111-1111-1111.", "payment_card", "4111-1111-1111-1111", "****-****-****-1111"),
        ("amex 378282246310005", "payment_card", "378282246310005", "***********0005"),
        (
            "IBAN DE89 3704 0044 0532 0130 00 please",
            "iban",
            "DE89 3704 0044 0532 0130 00",
            "DE89 **** **** **** **** 00",
        ),
        (
            "pay GB82WEST12345698765432 now",
            "iban",
            "GB82WEST12345698765432",
            "GB82 **** **** **** **** 32",
        ),
        ("call +44 20 7946 0958", "phone", "+44 20 7946 0958", "+44 ** **** *958"),
        ("ring (555) 123-4567", "phone", "(555) 123-4567", "(***) ***-*567"),
        ("US 555-123-4567", "phone", "555-123-4567", "***-***-*567"),
        ("toll free 1-800-555-0199", "phone", "1-800-555-0199", "*-***-***-*199"),
        ("London 020 7946 0958", "phone", "020 7946 0958", "*** **** *958"),
        ("Paris 01 23 45 67 89", "phone", "01 23 45 67 89", "** ** ** *7 89"),
        ("Tel:+49 (0)30 1234567", "phone", "+49 (0)30 1234567", "+49 (*)** ****567"),
        ("E.164 +14155552671", "phone", "+14155552671", "+14******671"),
    ],
)
def test_true_positives_are_found_and_masked(text, kind, found, masked):
    assert find(text) == [(kind, found)]
    assert mask(kind, found) == masked
    assert found not in masked


@pytest.mark.parametrize(
    "text",
    [
        # Cards and IBANs that fail their checksums.
        "card 4242 4242 4242 4241",
        "IBAN DE89 3704 0044 0532 0130 01",
        "GB82 WEST 1234 5698 7654 33",
        # Dates and times.
        "on 2024-03-15 at 10:30",
        "15.03.2024",
        "03/15/2024 09:00",
        "2024-03-15T10:00:00Z",
        "from 2023-01-01 2023-12-31",
        # Plain long integers, IDs, timestamps.
        "order 1234567890",
        "12345678901234",
        "1700000000000",
        "id 9780306406157",
        "ID-555-123-4567",
        "sku abc1234567890",
        # Numbers that are not phones.
        "192.168.100.200",
        "10 20 30 40 50 60",
        "1 234 567 EUR",
        "v1.2.3.4567",
        "pi is 3.14159265358979",
        "-1234567890",
        "1,234,567,890",
        "the years 1999 2000 2001",
        # Not an e-mail address.
        "use @decorator or a@b",
        "mail me at name@localhost",
    ],
)
def test_false_positives_are_not_flagged(text):
    assert find(text) == []


def test_a_card_number_is_never_also_a_phone():
    assert kinds("4242 4242 4242 4242 and +44 20 7946 0958") == ["payment_card", "phone"]


def test_checksums():
    assert luhn_valid("4242424242424242")
    assert not luhn_valid("4242424242424241")
    assert iban_valid("DE89370400440532013000")
    assert not iban_valid("DE89370400440532013001")


def test_report_counts_rows_and_matches_with_masked_examples(tmp_path):
    rows = [
        {"text": "reach me at alice@example.com or bob@example.org"},
        {"text": "card 4242 4242 4242 4242"},
        {"text": "nothing to see"},
        {"text": "call +44 20 7946 0958 or alice@example.com"},
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = validate(path, FileFormat.JSONL, ValidationOptions(max_examples=5))
    assert report.pii_rows == 3
    assert report.pii["email"] == {
        "count": 3,
        "rows": 2,
        "examples": ["a***@e***.com", "b***@e***.org"],
    }
    assert report.pii["payment_card"]["examples"] == ["**** **** **** 4242"]
    assert report.pii["phone"]["rows"] == 1
    assert "iban" not in report.pii
    # Nothing in the report holds a whole value.
    dumped = json.dumps(report.as_dict())
    for secret in ("alice@example.com", "4242 4242 4242 4242", "7946 0958"):
        assert secret not in dumped
