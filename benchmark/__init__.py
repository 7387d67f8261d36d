"""Serving benchmark tool: ``text-generation-benchmark`` (also ``python -m benchmark``).

Layout (one responsibility per module):

- ``config``    ServeConfig and GenerationParams: the run's settings, built once from the CLI.
- ``clients/``  one small streaming client per API (``tgi``: TGI-native ``/generate_stream``), all speaking
                the StreamingClient protocol and yielding StreamEvents.
- ``sse``       incremental Server-Sent Events parser shared by the clients.
- ``records``   RequestRecord: what one request looked like from the client's side (raw measurements).
- ``runner``    the closed-loop load runner (one concurrency level) and the warmup.
- ``metrics``   percentiles and per-level metrics computed from records.
- ``report``    progress line, summary table, JSON results.
- ``serve``     the ``serve`` command: client + warmup + sweep + metrics.
- ``cli``       argument parsing and the console entry point.
"""

from benchmark._version import __version__

__all__ = ["__version__"]
