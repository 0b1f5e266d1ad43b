"""fermi: Qwen3 on onnxruntime, with a CLI, an OpenAI-compatible HTTP server and a gRPC server."""

__version__ = "0.1.0"
