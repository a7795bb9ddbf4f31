"""The guest workloads behave as documented: imports, exports, the common ABI, and each
workload's behaviour against a small Python reference model (tests/workload_checks.py)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.workload_checks import (
    EXPORTS,
    check_common,
    check_filter,
    check_kvstore,
    check_memhog,
    check_module_shape,
    check_vdi,
)


@pytest.mark.parametrize("name", sorted(EXPORTS))
def test_imports_and_exports_are_the_documented_ones(name: str) -> None:
    check_module_shape(name)


@pytest.mark.parametrize("name", sorted(EXPORTS))
def test_the_common_abi_works(name: str) -> None:
    check_common(name)


@pytest.mark.parametrize("check", [check_vdi, check_filter, check_kvstore, check_memhog],
                         ids=["vdi", "filter", "kvstore", "memhog"])
def test_behaviour_matches_the_reference_model(check: Callable[[], None]) -> None:
    check()
