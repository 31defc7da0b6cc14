"""The OpenAI Files and Batch product below the HTTP layer (moved out of api/; see the next commits)."""
