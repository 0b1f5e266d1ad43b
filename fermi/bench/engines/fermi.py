"""fermi itself: its artifacts (fp32, and int8/int4 of the cpu target) on onnxruntime through
the shared runtime."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from fermi.bench.weights import directory_bytes, onnx_bytes_per_token


def versions() -> dict[str, str]:
    import onnxruntime

    from fermi import __version__

    return {"fermi": __version__, "onnxruntime": onnxruntime.__version__}


def imports() -> None:
    import fermi.runtime  # noqa: F401  (onnxruntime, tokenizers, the runtime)


def artifact_path(spec: dict) -> Path:
    """fp32: the run's artifact; int8/int4: the cpu target at that precision, in the cache."""
    variant = spec["engine"]["variant"]
    return Path(spec["artifact"]) if variant == "fp32" else Path(spec["cache"]) / f"{variant}-cpu"


def prepare(spec: dict) -> dict:
    artifact = artifact_path(spec)
    if artifact != Path(spec["artifact"]):
        from export.exporter import export_model
        from fermi.artifact import load_manifest

        source = spec["checkpoint"] or load_manifest(Path(spec["artifact"])).source
        export_model(source, precision=spec["engine"]["variant"], output=artifact, target="cpu")
    return {
        "model_path": str(artifact),
        "model_bytes": directory_bytes(artifact, (".onnx", ".onnx.data")),
    }


def load(spec: dict) -> FermiModel:
    from fermi.runtime import Runtime
    from fermi.settings import Settings

    config = spec["config"]
    settings = Settings(
        model=str(artifact_path(spec)), device="cpu", threads=config["threads"], spin=config["spin"]
    )
    return FermiModel(Runtime.load(settings))


class FermiModel:
    def __init__(self, runtime):
        self.runtime = runtime
        manifest = runtime.manifest
        self.label = f"fermi {manifest.precision}, {manifest.target} graph (onnxruntime, CPU)"

    def weight_bytes_per_token(self) -> int:
        from fermi.artifact import MODEL_FILE

        return onnx_bytes_per_token(self.runtime.engine.artifact / MODEL_FILE)

    def stream(self, ids: list[int], count: int):
        """The runtime's own token loop (chunked prefill, then one step per token)."""
        from fermi.generate import generate_tokens
        from fermi.requests import SamplingParams
        from fermi.sampling import Sampler, resolve_sampling

        engine = self.runtime.engine
        sampler = Sampler(resolve_sampling(SamplingParams(temperature=0.0), {}, False), 0)
        steps = generate_tokens(
            engine, engine.new_cache(), ids, ids, sampler, count, set(), threading.Event()
        )
        yield from (token.id for token in steps)

    def extra(self, spec: dict) -> dict:
        """Decode through `Runtime.submit` (template, detokenizer, text pipeline included), on
        the prompt the server benchmark sends: the time of an N-token request less that of a
        1-token request is the decode of N-1 tokens, whether or not the tokens carry text.
        Also: how many tokens the first text delta holds (1 when text starts with the first
        token; more when the model's first tokens decode to nothing, and then a client cannot
        see the first token's time)."""
        count = spec["config"]["new_tokens"]
        words = " ".join(["benchmark"] * spec["config"]["server_prompt_words"])
        rates, first_text_tokens = [], None
        for _ in range(spec["config"]["reps"]):
            one, _ = self._request(words, 1)
            full, events = self._request(words, count)
            rates.append((count - 1) / (full - one))
            deltas = [e for e in events if hasattr(e, "token_ids")]
            first_text_tokens = len(deltas[0].token_ids) if deltas else None
        return {"runtime_decode_tok_s": rates, "server_prompt_first_text_tokens": first_text_tokens}

    def _request(self, text: str, count: int) -> tuple[float, list]:
        from fermi.requests import GenerationRequest, Message, SamplingParams

        request = GenerationRequest(
            messages=[Message("user", text)],
            max_new_tokens=count,
            sampling=SamplingParams(temperature=0.0, seed=0),
            ignore_eos=True,
            thinking="off",
        )
        started = time.perf_counter()
        events = list(self.runtime.submit(request))
        return time.perf_counter() - started, events
