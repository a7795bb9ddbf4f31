"""`cloudlet emulate`: the simulator's scenario, played by real cloudlets, VMs and clients.

The simulator (cloudlet.sim) answers "which placement policy keeps sessions in
budget" with models: a latency model, a pre-copy cost model, a bandwidth share.
The emulator runs the same scenario for real on this machine, so the models can
be checked against what daemons, live migrations, the broker and the SDK really
do: one `cloudlet agent` process per scenario cloudlet, an embedded broker, one
SDK session per user whose links are delayed as the latency model says for
where the user is, and backhaul links shaped to the scenario's bandwidth. The
same run also simulates the scenario with the same (scaled) sizes and writes
both side by side.

Modules, one job each: `world` (the simulator's world, replayed), `scaling`
(guest sizes that fit the machine), `scenario_file` (the resolved scenario the
orchestrator reads), `cluster` (broker, secrets, daemons, ingress links),
`links` (a client's delayed links), `user` (one emulated user), `events`
(migration records from the events topic), `results` (measurements into the
simulator's result shape), `compare` (the comparison and its tables), `run`
(one policy, then all of them) and `command` (the command line).
"""
