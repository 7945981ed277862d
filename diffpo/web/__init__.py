"""Local web pages: ``diffpo label`` (build preference pairs by clicking) and ``diffpo view``
(browse an evaluation). One small ASGI app per tool, one static HTML page each with plain
JavaScript (no build step), served by uvicorn on 127.0.0.1. Needs the ``web`` extra.
"""
