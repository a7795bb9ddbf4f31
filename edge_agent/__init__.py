"""The cloudlet daemon: hosts VMs from `cloudlet.vm` for clients and peers."""
