"""The interactive Dash app (L3): see every head, drill into patterns, ablate or reinforce heads.

Start it with ``workbench app`` or :func:`app.web.server.serve`; build it with
:func:`app.web.factory.create_app`.
"""
