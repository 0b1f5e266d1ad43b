"""OpenAI-compatible HTTP server (Sanic) over the shared runtime.

schemas.py parses and validates request bodies into the runtime's GenerationRequest,
formatters.py builds every response body, chunk and event, errors.py maps exceptions to HTTP
statuses, metrics.py holds the Prometheus metrics and server.py wires the routes."""
