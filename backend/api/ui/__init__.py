"""The dashboard: a read-only web UI under ``/ui`` on the same Flask app (docs/dashboard.md).

Server-side Jinja templates with inline SVG charts, a few lines of vanilla JavaScript for live
updates and confirmations, no CDN and no build step: it works on a hospital network with no
internet. Routes: :mod:`.views`; charts: :mod:`.charts`; CSRF: :mod:`.csrf`; background
computations: :mod:`.background`; page data: :mod:`backend.services.dashboard`.
"""

from backend.api.ui.views import bp

__all__ = ["bp"]
