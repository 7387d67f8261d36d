"""HTTP router: validates and tokenizes requests, batches them continuously over the shards, streams text."""

__version__ = "0.1.0"
