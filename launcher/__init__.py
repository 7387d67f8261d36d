"""text-generation-launcher: resolves the weights, then starts and supervises the shards and the router."""
