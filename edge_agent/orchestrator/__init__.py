"""The orchestrator: the live placer that moves VMs ahead of their users.

`config` (the `[orchestrator]` table), `view` (what the control plane says,
aged, as a `ClusterState`), `tracker` (moves in flight, retries, what was
decided), `lease` (one leader per region, fenced by epoch), `runner` (the one
I/O edge: the broker connection and the decision loop). docs/orchestrator.md
says how they fit.
"""
