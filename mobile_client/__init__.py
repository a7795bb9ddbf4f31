"""The mobile client SDK (issue 4): discovery, sessions, offload, local fallback.

Kept import-light on purpose: a phone that only offloads needs no numpy or wasmtime.
"""
