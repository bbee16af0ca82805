"""The OpenAI-compatible REST gateway: OpenAI requests in, ``loraplex.v1`` gRPC calls out.

``loraplex.gateway.app.create_app`` builds the ASGI app; ``loraplex.gateway.cli`` is the
``loraplex gateway`` command. Nothing here imports torch, transformers or the server.
"""
