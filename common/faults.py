"""The names of the test-only fault hooks, shared by the router (validation) and the shard (shard/faults.py)."""

FAULTS = ("nan", "step", "fatal", "sleep")
