"""transformers on torch, eager mode (no compile), fp32 on the CPU: the reference stack."""

from __future__ import annotations

import inspect
from importlib import metadata
from pathlib import Path


def versions() -> dict[str, str]:
    return {name: metadata.version(name) for name in ("transformers", "torch")}


def imports() -> None:
    import torch  # noqa: F401
    import transformers  # noqa: F401


def prepare(spec: dict) -> dict:
    checkpoint = Path(spec["checkpoint"])
    size = sum(p.stat().st_size for p in checkpoint.glob("*.safetensors"))
    return {"model_path": str(checkpoint), "model_bytes": size}


def load(spec: dict) -> TransformersModel:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(spec["config"]["threads"])
    model = AutoModelForCausalLM.from_pretrained(spec["checkpoint"], dtype=torch.float32)
    return TransformersModel(model.eval())


class TransformersModel:
    def __init__(self, model):
        self.model = model
        attention = getattr(model.config, "_attn_implementation", "default")
        self.label = f"transformers fp32 (torch eager mode, {attention} attention)"
        # transformers 5.x renamed past_key_values to cache (argument and output field).
        parameters = inspect.signature(model.forward).parameters
        self.cache_arg = "cache" if "cache" in parameters else "past_key_values"

    def weight_bytes_per_token(self) -> int:
        """Every parameter once (tied weights are one parameter), less an untied input
        embedding, of which a step reads one row."""
        total = sum(p.numel() * p.element_size() for p in self.model.parameters())
        if not self.model.config.tie_word_embeddings:
            embedding = self.model.get_input_embeddings().weight
            total -= embedding.numel() * embedding.element_size()
        return total

    def stream(self, ids: list[int], count: int):
        """Prefill, then one forward per token on the returned cache; argmax every step."""
        import torch

        with torch.inference_mode():
            output = self.model(input_ids=torch.tensor([ids]), use_cache=True, logits_to_keep=1)
            for step in range(count):
                token = int(output.logits[0, -1].argmax())
                yield token
                if step + 1 == count:
                    return
                cache = {self.cache_arg: getattr(output, self.cache_arg)}
                output = self.model(
                    input_ids=torch.tensor([[token]]), use_cache=True, logits_to_keep=1, **cache
                )
