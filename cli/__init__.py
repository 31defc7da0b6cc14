"""The `manage.py` command line, one module per verb group (the layout of celery/bin/).

Process verbs (up, api, worker, flower) run here; admin verbs talk to the API over HTTP (AETHERCORE_URL), so
they work the same against a local or a remote deployment.
"""

from cli.app import app

__all__ = ["app"]
