"""Export Hugging Face Qwen3/Qwen2 checkpoints to a fermi artifact: an ONNX graph built directly
from the safetensors (no torch), its external weights, tokenizer files and the manifest.

Entry point: `export.exporter.export_model`. Nothing in this package imports torch or
transformers; only the tests do, to compare against them."""
