"""Peer tools measured beside the pipeline; each script runs in its own virtualenv under .bench/."""
