"""The campaign's report (tests/campaign.py) is written from what the tests recorded: every
section appears, every invariant of docs/architecture.md §4 is listed with its tests, every test
it names exists, and a failed test shows as a failure."""

import json
import re
from pathlib import Path

from tests.campaign import DRIVER_ROWS, INVARIANTS, Outcomes, render

ROOT = Path(__file__).resolve().parent.parent


def test_every_test_the_report_names_exists():
    for test in [t for _, _, t in DRIVER_ROWS] + [t for _, ts in INVARIANTS for t in ts]:
        file, _, name = test.partition("::")
        source = (ROOT / file).read_text()
        assert not name or re.search(rf"def {name}\(", source), test


def test_the_report_shows_the_figures_and_the_failures(tmp_path):
    rows = {"faults": {"target": "KME idq of link C-E, at node C", "fault": "hang", "detected_by": "driver up = 0",
                       "detect_s": 4.3, "served_during": "6/9 pairs", "resume_s": 3.9, "daemons_up": True,
                       "passed": True},
            "faults_totals": {"keys_issued": 10, "keys_fetched": 10, "unfetched": 0, "problems": 0,
                              "statuses": {"200": 5}},
            "tls": {"case": "an expired certificate", "listener": "SKIP", "outcome": "refused"},
            "fuzz": {"target": "peer verb relay", "passed": True}}
    for section, row in rows.items():
        (tmp_path / f"{section}.jsonl").write_text(json.dumps(row) + "\n")
    outcomes = Outcomes()

    class Report:
        def __init__(self, nodeid, failed=False):
            self.nodeid, self.duration, self.when = nodeid, 1.0, "call"
            self.failed, self.skipped = failed, False

    outcomes.pytest_runtest_logreport(Report("tests/test_backbone.py::test_no_key_bits_in_metrics_or_logs"))
    outcomes.pytest_runtest_logreport(Report("tests/test_soak.py::test_memory_and_descriptors_stay_flat_under_"
                                             "load_and_random_faults", failed=True))
    text = render(tmp_path, outcomes, "ci", 60.0)
    for heading in ("## 1. Fault matrix", "## 2. Crash campaign", "## 3. Hostile input", "## 4. TLS",
                    "## 5. Soak", "## 6. The invariants"):
        assert heading in text
    assert "| KME idq of link C-E, at node C | hang | driver up = 0 | 4.3 | 6/9 pairs | 3.9 | yes | pass |" in text
    assert "an expired certificate | SKIP | refused" in text
    assert "**Failed:** `tests/test_soak.py::" in text
    assert text.count("| 1. A key is handed") == 1 and "| 5. Bad input" in text
    assert "`test_backbone.py::test_no_key_bits_in_metrics_or_logs` passed" in text
