"""Generated stubs of ``loraplex.v1`` (``python -m loraplex.clients.codegen`` rewrites them; do not edit)."""
