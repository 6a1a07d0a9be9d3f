"""Rendezvous hashing of sequences: the same pick in every process, little movement when a backend leaves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass

from gateway.routing.rendezvous import Rendezvous, sequence_key, stable_hash


@dataclass(frozen=True)
class FakeBackend:
    address: str


BACKENDS = [FakeBackend(f"10.0.0.{i}:8001") for i in range(1, 6)]
SEQUENCES = [*range(1, 2001), *(f"session-{i}" for i in range(500))]


def _picks(backends) -> dict:
    rendezvous = Rendezvous()
    return {repr(s): rendezvous.pick(sequence_key("m", s), backends).address for s in SEQUENCES}


def test_the_hash_is_pinned_and_not_pythons():
    # Fixed values: a change of the hash or the mix would move every live sequence after an
    # upgrade, and workers of two versions would disagree.
    assert stable_hash("tensorgate") == 3541056828679698407
    assert sequence_key("m", 42) == 9185467321210791936
    assert Rendezvous().weight(sequence_key("m", 42), "10.0.0.1:8001") == 17961794933731794036
    assert sequence_key("m", 42) != sequence_key("m", "42")  # int and string ids are different sequences
    assert sequence_key("m", 42) != sequence_key("n", 42)


def test_every_process_picks_the_same_backend():
    code = (
        "import json, sys; sys.path.insert(0, %r)\n"
        "from tests.test_rendezvous import BACKENDS, _picks\n"
        "print(json.dumps(_picks(BACKENDS)))\n" % os.getcwd()
    )
    answers = []
    for seed in ("1", "2", "random"):
        environment = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True,
                             check=True, timeout=120)
        answers.append(json.loads(out.stdout))
    here = _picks(BACKENDS)
    assert all(answer == here for answer in answers)
    # and the order of the candidates does not matter
    assert _picks(list(reversed(BACKENDS))) == here


def test_a_backend_that_leaves_moves_only_its_own_sequences():
    before = _picks(BACKENDS)
    gone = BACKENDS[2].address
    after = _picks([b for b in BACKENDS if b.address != gone])
    moved = [s for s in before if before[s] != after[s]]
    assert moved, "the sequences of the backend that left must move"
    assert all(before[s] == gone for s in moved), "only the departed backend's sequences move"
    assert len(moved) == sum(1 for s in before if before[s] == gone)
    # ... and a backend that comes back takes back exactly those
    assert _picks(BACKENDS) == before


def test_sequences_spread_evenly():
    counts = Counter(_picks(BACKENDS).values())
    expected = len(SEQUENCES) / len(BACKENDS)
    assert set(counts) == {b.address for b in BACKENDS}
    assert all(abs(count - expected) < 0.2 * expected for count in counts.values()), counts
