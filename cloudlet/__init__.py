"""Cloudlet: VM-based cloudlets for edge computing.

The core library. It holds no daemon and no network code of its own: the
microVM runtime (`cloudlet.vm`), and, as they land, migration, placement and
simulation. `edge_agent` and `mobile_client` build on it; it imports neither.
"""

__version__ = "0.1.0"
