"""Small pieces every process uses (logging, process helpers)."""
