"""MonitorC: the agent on every app instance (`python -m monitor_c`)."""

AGENT_VERSION = "0.1.0"
