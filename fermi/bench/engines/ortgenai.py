"""onnxruntime-genai: its model builder's graph of the same checkpoint (fp32, or int4 with
MatMulNBits) and its own generator loop, on the CPU provider."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from fermi.bench.weights import directory_bytes, onnx_bytes_per_token

MODEL_FILE = "model.onnx"


def versions() -> dict[str, str]:
    names = ("onnxruntime-genai", "onnxruntime", "transformers", "torch")
    return {name: metadata.version(name) for name in names}


def imports() -> None:
    import onnxruntime_genai  # noqa: F401


def model_dir(spec: dict) -> Path:
    return Path(spec["cache"]) / spec["engine"]["variant"]


def prepare(spec: dict) -> dict:
    """`python -m onnxruntime_genai.models.builder` on the checkpoint, once per precision."""
    output = model_dir(spec)
    if not (output / "genai_config.json").is_file():
        command = [
            sys.executable,
            "-m",
            "onnxruntime_genai.models.builder",
            "-i",
            spec["checkpoint"],
            "-o",
            str(output),
            "-p",
            spec["engine"]["variant"],
            "-e",
            "cpu",
            "-c",
            str(Path(spec["cache"]) / "builder-cache"),
        ]
        subprocess.run(command, check=True)
    return {
        "model_path": str(output),
        "model_bytes": directory_bytes(output, (".onnx", ".onnx.data", ".data")),
    }


def load(spec: dict) -> GenaiModel:
    import onnxruntime_genai as og

    config = og.Config(str(model_dir(spec)))
    config.clear_providers()  # the CPU provider
    options = {
        "intra_op_num_threads": spec["config"]["threads"],
        "session.intra_op.allow_spinning": str(int(spec["config"]["spin"])),
    }
    config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
    return GenaiModel(og, og.Model(config), model_dir(spec), spec)


class GenaiModel:
    def __init__(self, og, model, directory: Path, spec: dict):
        self.og = og
        self.model = model
        self.directory = directory
        self.label = f"onnxruntime-genai {spec['engine']['variant']} (model builder, CPU)"

    def weight_bytes_per_token(self) -> int:
        genai = json.loads((self.directory / "genai_config.json").read_text())
        return onnx_bytes_per_token(self.directory / genai["model"]["decoder"]["filename"])

    def stream(self, ids: list[int], count: int):
        """A fresh generator: append the prompt (prefill), then one token per step. min_length
        masks end-of-sequence until `count` tokens are out, so eos never ends a run early."""
        params = self.og.GeneratorParams(self.model)
        total = len(ids) + count
        params.set_search_options(do_sample=False, max_length=total, min_length=total)
        generator = self.og.Generator(self.model, params)
        generator.append_tokens(ids)
        for _ in range(count):
            generator.generate_next_token()
            yield int(generator.get_next_tokens()[0])
