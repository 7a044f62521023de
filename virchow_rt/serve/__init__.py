"""Serving: the KServe v2 HTTP server (Ray Serve), its standard-library client, and Triton model
repositories."""
