"""Serving: the Ray Serve app (ingress, verifier replicas, draft workers) and its config."""
