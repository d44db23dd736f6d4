"""MonitorS: the registry and poller on the manager VM (`python -m monitor_s`)."""
