"""The cloudlet daemon (issue 3): hosts VMs from `cloudlet.vm` for clients and peers."""
