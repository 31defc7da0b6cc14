"""Model artifacts: where a configured model's files are, and building the demo models offline."""
