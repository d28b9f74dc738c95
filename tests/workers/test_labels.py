"""Worker labels: the syntax a worker's AIBOX_WORKER_LABELS and a deployment's wanted
and unwanted labels share, and how they match."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from workers.labels import labels_check, labels_match, labels_parse

ROOT = Path(__file__).resolve().parents[2]


def test_comma_separated_words_and_pairs_parse_blanks_ignored():
    assert labels_parse("gpu=a100, zone=b,spot,,") == ["gpu=a100", "zone=b", "spot"]
    assert labels_parse("nvidia.com/gpu=true,node-pool_2=large.x") == [
        "nvidia.com/gpu=true",
        "node-pool_2=large.x",
    ]
    assert labels_parse("") == [] and labels_parse(" , ") == []


@pytest.mark.parametrize(
    "text",
    ["gpu=", "=a100", "gpu a100", "-gpu", "zone=b/c", "gpu=a=b", "x" * 64, "a=" + "b" * 64],
)
def test_a_malformed_label_says_what_a_label_is(text):
    with pytest.raises(ValueError, match="is not a label: a label is a word or key=value"):
        labels_parse(text)


def test_a_key_is_given_once_and_a_limit_is_kept():
    with pytest.raises(ValueError, match="'zone=a' and 'zone=b' give 'zone' twice"):
        labels_parse("zone=a,zone=b")
    with pytest.raises(ValueError, match="give 'spot' twice"):
        labels_parse("spot,spot")
    with pytest.raises(ValueError, match="At most 2 labels, not 3"):
        labels_check(["a", "b", "c"], limit=2)
    with pytest.raises(ValueError, match="not a label"):
        labels_check([7])


def test_wanted_labels_all_match_and_unwanted_ones_none():
    worker = ["gpu=a100", "zone=b", "spot"]
    assert labels_match(worker, wanted=["gpu=a100", "zone=b"], unwanted=[])
    assert labels_match(worker, wanted=["gpu"], unwanted=["zone=a"])  # a bare word: any value
    assert not labels_match(worker, wanted=["gpu=h100"], unwanted=[])
    assert not labels_match(worker, wanted=["gpu", "rack"], unwanted=[])
    assert not labels_match(worker, wanted=[], unwanted=["spot"])
    assert not labels_match(worker, wanted=[], unwanted=["zone"])
    # A worker's bare word is not any particular value.
    assert not labels_match(["gpu"], wanted=["gpu=a100"], unwanted=[])
    assert labels_match([], wanted=[], unwanted=["spot"])


def test_a_malformed_worker_setting_stops_start_up_with_a_clear_message():
    env = {**os.environ, "AIBOX_WORKER_LABELS": "gpu=a100,zone="}
    result = subprocess.run(
        [sys.executable, "-c", "import aibox.settings"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "ImproperlyConfigured: AIBOX_WORKER_LABELS: 'zone=' is not a label" in result.stderr
