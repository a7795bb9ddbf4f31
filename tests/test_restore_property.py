"""For every workload: snapshot -> restore in a fresh process continues exactly like the original.

Hypothesis draws a random call sequence and a split point. The original VM runs
the whole sequence in this process; at the split it is snapshotted to a file, and
a new `cloudlet vm run --from-snapshot` process (which never saw the VM) applies
the rest. The two must print the same results and end in the same state, bit for
bit: the fresh process writes a final snapshot, compared with the original's.
"""

from __future__ import annotations

import hashlib
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloudlet.commands.vm import apply_call
from cloudlet.vm import VM, Image, ImageStore, Snapshot
from tests.conftest import WORKLOAD_NAMES, WORKLOADS, wat_file

# Starts daemons, brokers or other processes: not in the fast subset (-m 'not slow').
pytestmark = pytest.mark.slow

SEED_HEX = "ab" * 32
SETTINGS = settings(max_examples=8, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])

small = st.integers(min_value=0, max_value=60)
i32 = st.integers(min_value=-(2**31), max_value=2**31 - 1)
text = st.text(alphabet="abcdefgh", min_size=1, max_size=6)

kv_calls = st.one_of(
    st.builds(lambda k, v: f"kv_put {k} {v}", small, i32),
    st.builds(lambda k: f"kv_get {k}", small),
    st.builds(lambda k: f"kv_del {k}", small),
    st.just("kv_count"), st.just("kv_checksum"),
    st.builds(lambda k, v: f"kv_set s:{k}={v}", text, text),
    st.builds(lambda k: f"kv_lookup s:{k}", text),
)


def _events(evs: list[tuple[int, int, int]]) -> str:
    return "vdi_events x:" + b"".join(struct.pack("<BHH", *e) for e in evs).hex()


coord = st.integers(min_value=0, max_value=300)
vdi_calls = st.one_of(
    st.builds(lambda c: f"vdi_key {c}", st.integers(min_value=0, max_value=127)),
    st.builds(lambda x, y: f"vdi_click {x} {y}", coord, coord),
    st.builds(lambda x, y: f"vdi_move {x} {y}", coord, coord),
    st.just("vdi_frame"), st.just("vdi_checksum"),
    st.builds(_events, st.lists(st.tuples(st.integers(1, 4), coord, coord), max_size=8)),
)


def _frame(w: int, h: int, pixels: bytes) -> str:
    return "filter_blur x:" + (struct.pack("<HH", w, h) + pixels[: w * h].ljust(w * h, b"\0")).hex()


filter_calls = st.one_of(
    st.builds(lambda w, h, s: f"filter_frame {w} {h} {s}", st.integers(1, 48), st.integers(1, 48),
              i32),
    st.builds(_frame, st.integers(1, 16), st.integers(1, 16), st.binary(max_size=256)),
    st.just("filter_frames"), st.just("filter_state"),
)

hog_calls = st.one_of(
    st.builds(lambda m: f"hog_grow {m}", st.integers(1, 3)),
    st.builds(lambda n, s: f"hog_dirty {n} {s}", st.integers(0, 64), i32),
    st.builds(lambda p, n, v: f"hog_fill {p} {n} {v}", st.integers(0, 200), st.integers(0, 40),
              i32),
    st.just("hog_checksum"), st.just("hog_mib"),
)

# Hand-written guests: state in unexported globals, and in host functions (random, clock, log).
stackdep_calls = st.one_of(
    st.builds(lambda v: f"push {v}", i32), st.just("pop"),
    st.builds(lambda v: f"alloc {v}", i32), st.just("heap_sum"), st.just("calls"),
)
wasi_calls = st.sampled_from(["rand", "now 0", "now 1", "log"])

CALLS = {"kvstore": kv_calls, "vdi": vdi_calls, "filter": filter_calls, "memhog": hog_calls,
         "stackdep": stackdep_calls, "wasi": wasi_calls}


def state_fingerprint(snap: Snapshot) -> str:
    """Everything a snapshot says about the VM, except ids and wall-clock stamps."""
    h = hashlib.sha256()
    for m in snap.memories:
        h.update(struct.pack("<I", m.pages))
        h.update(m.chunk_ids.tobytes())
        h.update(m.zero_ids.tobytes())
        h.update(m.data)
    h.update(repr(sorted(snap.globals.items())).encode())
    host = {k: v for k, v in snap.host.items() if k != "monotonic_ns"}
    h.update(repr(sorted(host.items())).encode())
    h.update(repr((snap.seq, snap.image_digest)).encode())
    return h.hexdigest()


def _image_file(name: str, tmp: Path) -> Path:
    if name in WORKLOAD_NAMES:
        return WORKLOADS / f"{name}.wasm"
    path = tmp / f"{name}.wasm"
    path.write_bytes(wat_file(f"{name}.wat"))
    return path


def _check(name: str, image: Image, calls: list[str], split: int, tmp: Path,
           env: dict[str, str]) -> None:
    split = min(split, len(calls))
    vm = VM.create(image, clock="virtual", random_seed=bytes.fromhex(SEED_HEX))
    before = [apply_call(vm, c) for c in calls[:split]]
    snap_path = tmp / f"{name}.snap"
    vm.snapshot().write(snap_path)
    expected = [apply_call(vm, c) for c in calls[split:]]
    final_path = tmp / f"{name}-final.snap"
    cmd = [sys.executable, "-m", "cloudlet.cli", "vm", "run", "--from-snapshot", str(snap_path),
           "--image-store", str(tmp / "fresh-store"), str(_image_file(name, tmp)),
           "--snapshot-out", str(final_path)]
    for c in calls[split:]:
        cmd += ["--call", c]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:-1] == expected, (before, calls[split:])
    assert state_fingerprint(Snapshot.read(final_path)) == state_fingerprint(vm.snapshot())


def _property(name: str):  # type: ignore[no-untyped-def]
    @SETTINGS
    @given(calls=st.lists(CALLS[name], min_size=1, max_size=25), split=st.integers(0, 25))
    def prop(store: ImageStore, cli_env: dict[str, str], tmp_path: Path,
             calls: list[str], split: int) -> None:
        image = store.add(_image_file(name, tmp_path).read_bytes())
        _check(name, image, calls, split, tmp_path, cli_env)

    prop.__name__ = f"test_{name}_resumes_identically_in_a_fresh_process"
    return prop


test_kvstore_resumes_identically_in_a_fresh_process = _property("kvstore")
test_vdi_resumes_identically_in_a_fresh_process = _property("vdi")
test_filter_resumes_identically_in_a_fresh_process = _property("filter")
test_memhog_resumes_identically_in_a_fresh_process = _property("memhog")
test_stackdep_resumes_identically_in_a_fresh_process = _property("stackdep")
test_wasi_resumes_identically_in_a_fresh_process = _property("wasi")
