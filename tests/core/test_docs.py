"""The operator guide, settings.ENVIRONMENT_VARIABLES and what settings.py reads agree."""

from __future__ import annotations

import re
from pathlib import Path

from django.conf import settings

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "operator-guide.md"
SETTINGS_SOURCE = ROOT / "aibox" / "settings.py"


def configuration_table_names() -> list[str]:
    """Backticked names in the first column of the table right under "## Configuration".

    The section ends at the next heading of any level, so tables in its subsections
    (bin/aibox's own variables) are not part of it.
    """
    lines = GUIDE.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(r"^#+\s+Configuration\b", line))
    names = []
    for line in lines[start + 1 :]:
        if line.startswith("#"):
            break
        if not line.startswith("|"):
            continue
        first_cell = line.strip().strip("|").split("|")[0]
        names += re.findall(r"`([A-Z][A-Z0-9_]*)`", first_cell)
    return names


def test_configuration_table_names_exactly_the_environment_variables():
    names = configuration_table_names()
    duplicates = sorted({n for n in names if names.count(n) > 1})
    assert not duplicates, f"listed twice in the configuration table: {duplicates}"
    expected = set(settings.ENVIRONMENT_VARIABLES)
    assert not expected - set(names), (
        f"not documented in docs/operator-guide.md: {sorted(expected - set(names))}"
    )
    assert not set(names) - expected, (
        f"documented but not in settings.ENVIRONMENT_VARIABLES: {sorted(set(names) - expected)}"
    )


def test_settings_reads_only_listed_variables():
    source = SETTINGS_SOURCE.read_text()
    # env("X"), env.str("X", ...), env.bool(...), env.db_url(...), env.list(...), ...
    read = set(re.findall(r"\benv(?:\.\w+)?\(\s*['\"]([A-Za-z0-9_]+)['\"]", source))
    assert read, 'found no env.<type>("NAME") calls in aibox/settings.py'
    unlisted = sorted(read - set(settings.ENVIRONMENT_VARIABLES))
    assert not unlisted, f"aibox/settings.py reads {unlisted} without listing them"
    unread = sorted(set(settings.ENVIRONMENT_VARIABLES) - read)
    assert not unread, f"settings.ENVIRONMENT_VARIABLES lists {unread}, which it never reads"
