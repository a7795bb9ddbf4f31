"""Every committed fuzz input, replayed through its target: the seed corpus and each
input that once crashed a decoder (`fuzz/regressions/<target>/`). No atheris
needed, so fixed crashes stay fixed on any machine; a few seconds in all."""

from __future__ import annotations

from pathlib import Path

import pytest

from fuzz import runner

CASES = [(target, path) for target in runner.targets() for path in runner.inputs(target)]


@pytest.mark.parametrize(("target", "path"), CASES,
                         ids=[f"{t}/{p.parent.parent.name}/{p.name}" for t, p in CASES])
def test_committed_input_is_handled(target: str, path: Path) -> None:
    runner.entry_point(target)(path.read_bytes())


@pytest.mark.parametrize("target", runner.targets())
def test_every_target_has_a_seed_corpus(target: str) -> None:
    assert (runner.CORPUS_DIR / target).is_dir(), f"run: python -m fuzz seed {target}"
    assert any((runner.CORPUS_DIR / target).iterdir())


def test_targets_are_found_by_their_entry_point() -> None:
    assert {"snapshot_file", "migration_message", "call_body", "stream_message", "reply_log",
            "bearer_token", "wasm_image"} <= set(runner.targets())
    assert "fixtures" not in runner.targets() and "runner" not in runner.targets()
