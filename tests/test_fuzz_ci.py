"""CI fuzzes every target for a few seconds over its committed corpus (docs/fuzzing.md).

Why in the test suite: CI runs exactly the README's command, and this keeps it
so; a decoder change that crashes on a mutation of a committed input fails the
build like any test. Four seconds a target (about 45 s for all, beside the
rest of the suite) finds shallow crashes; longer runs are `python -m fuzz run` by hand.
Off outside CI (CI=true), where the replay test still runs every committed input.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest

from fuzz import runner

# Starts daemons, brokers or other processes: not in the fast subset (-m 'not slow').
pytestmark = pytest.mark.slow

SECONDS_PER_TARGET = 4
IN_CI = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@pytest.mark.skipif(not IN_CI, reason="runs when CI is set; by hand: python -m fuzz run")
@pytest.mark.timeout(len(runner.targets()) * (SECONDS_PER_TARGET + runner.STARTUP_SLACK_S))
def test_every_target_survives_a_short_fuzz_run(tmp_path: Path) -> None:
    missing = runner.atheris_missing()
    assert missing is None, f"CI must fuzz: {missing}"
    outcomes = runner.run(runner.targets(), SECONDS_PER_TARGET, tmp_path)
    failed = [o for o in outcomes if not o.ok]
    report = []
    for outcome in failed:
        report.append(runner.describe(outcome))
        for artifact in outcome.artifacts:  # the CI log keeps the input; the runner may not
            if artifact.stat().st_size <= 64 << 10:
                report.append(f"  {artifact.name} (base64, `base64 -d > file` to replay):\n"
                              f"  {base64.b64encode(artifact.read_bytes()).decode()}")
    assert not failed, "\n".join(report)
