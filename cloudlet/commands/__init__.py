"""Subcommands of the `cloudlet` command line, one module per group."""
