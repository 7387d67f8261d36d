"""TGI's batching flags' defaults: the shard's engine core honours them (shard/core.py), the router reports
them in /info, the launcher passes them on. Declared here once, for the three configs."""

# Prompt tokens of a step that runs new prompts only.
MAX_BATCH_PREFILL_TOKENS = 4096
# Engines that do not schedule for themselves (transformers, ct2): waiting requests join a running batch
# once they are this many times the running ones...
WAITING_SERVED_RATIO = 1.2
# ... or after this many steps.
MAX_WAITING_TOKENS = 20
