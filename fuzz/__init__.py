"""Fuzz harnesses for every decoder of outside bytes, and the runner that drives them.

Why: a cloudlet decodes bytes it did not write all day long (snapshot files,
migration messages from peers, call bodies and WebSocket frames from clients,
bearer tokens, uploaded wasm modules), and each decoder promises to refuse
bad bytes with a typed error (`cloudlet.errors.CloudletError`), never a
traceback, a hang or an allocation out of proportion to the input. Hand-written
and property tests check the cases someone thought of; coverage-guided mutation
(atheris, libFuzzer) finds the ones nobody did.

A target is a module of this package that defines `TestOneInput(data: bytes)`:
it feeds `data` to one decoder the way the product does and lets only
`CloudletError` through; anything else escaping it is a crash. The runner finds
targets by that name alone, so a new decoder gets fuzzed by adding one file
(the control-plane payloads of `cloudlet/protocol.py` will be
`fuzz/control_plane.py`). A target may also define:

- `MAX_INPUT_BYTES`: the longest input the fuzzer makes (libFuzzer `-max_len`);
- `TIMEOUT_S`: how long one input may run before it counts as a hang;
- `DICTIONARY`: byte strings the mutator should splice in (libFuzzer `-dict`):
  map keys, msgpack's edge shapes, what the decoder compares against;
- `MUTATOR`: a libFuzzer custom mutator, e.g. `structure.msgpack_mutator`,
  which changes the decoded value of msgpack inputs rather than their bytes;
- `seeds() -> dict[str, bytes]`: the seed corpus, written to
  `fuzz/corpus/<target>/` by `python -m fuzz seed`.

Inputs that once crashed a target live in `fuzz/regressions/<target>/`;
tests/test_fuzz_corpus.py replays them and the corpus through every target, so
fixes stay fixed where atheris is not installed. See docs/fuzzing.md.
"""
