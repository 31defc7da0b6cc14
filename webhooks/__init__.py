"""Completion webhooks below the HTTP layer (moved out of api/ and tasks/; see the next commits)."""
