"""Shared fixtures: an image store per session, the workloads, WAT modules compiled on the fly."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import wasmtime

from cloudlet.vm import Image, ImageStore

# Broker fixtures (mosquitto, the embedded broker, both) for control-plane tests.
pytest_plugins = ["tests.mqtt_brokers"]

ROOT = Path(__file__).resolve().parent.parent
WORKLOADS = ROOT / "workloads"
WAT_DIR = Path(__file__).resolve().parent / "wat"
WORKLOAD_NAMES = ("vdi", "filter", "kvstore", "memhog")


@pytest.fixture(scope="session")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("image-store")


@pytest.fixture(scope="session")
def store(store_dir: Path) -> ImageStore:
    return ImageStore(store_dir)


@pytest.fixture(scope="session")
def workload(store: ImageStore) -> dict[str, Image]:
    return {name: store.add_file(WORKLOADS / f"{name}.wasm") for name in WORKLOAD_NAMES}


def wat(source: str) -> bytes:
    """Compile WebAssembly text (wasmtime ships the assembler)."""
    return bytes(wasmtime.wat2wasm(source))


def wat_file(name: str) -> bytes:
    return wat((WAT_DIR / name).read_text())


@pytest.fixture
def cli_env(store_dir: Path) -> Iterator[dict[str, str]]:
    """Environment for `cloudlet` subprocesses sharing the session's image store."""
    env = dict(os.environ)
    env["CLOUDLET_HOME"] = str(store_dir.parent / "cloudlet-home")
    yield env
