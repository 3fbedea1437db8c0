"""The GPU worker: an HTTP server for a SageMaker asynchronous endpoint (see server.py)."""
