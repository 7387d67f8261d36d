"""Serving benchmark tool: ``text-generation-benchmark`` (also ``python -m benchmark``).

Layout (one responsibility per module):

- ``config``    ServeConfig, Level and GenerationParams: the run's settings, built once from the CLI.
- ``clients/``  one small streaming client per API (``tgi``: TGI-native ``/generate_stream``; ``openai``:
                ``/v1/chat/completions`` and ``/v1/completions``), on a shared aiohttp/SSE base (``http``),
                all speaking the StreamingClient protocol and yielding StreamEvents.
- ``sse``       incremental Server-Sent Events parser shared by the clients.
- ``workload``  what a level sends and when: seeded prompts and lengths, Poisson arrival times.
- ``records``   RequestRecord: what one request looked like from the client's side (raw measurements).
- ``runner``    the load runners (closed-loop concurrency level, open-loop rate level) and the warmup.
- ``metrics``   percentiles and per-level metrics computed from records.
- ``report``    progress line, summary table, JSON results.
- ``plots``     PNG plots of one or several results files (matplotlib, imported only there).
- ``serve``     the ``serve`` command: client + warmup + sweep + metrics.
- ``shard_bench``, ``floor``, ``baseline``, ``router_bench``: the ``shard``, ``floor``, ``baseline`` and
                ``router`` commands (the last one needs a source checkout: it runs the test utilities' fake
                shard behind the real router).
- ``cli``       argument parsing and the console entry point.
"""

from benchmark._version import __version__

__all__ = ["__version__"]
