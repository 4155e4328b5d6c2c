"""Dash Pages: one module per page, layout only (callbacks live in :mod:`app.web.callbacks`)."""
