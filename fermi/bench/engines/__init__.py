"""One adapter per engine family. Each module provides:

    versions() -> dict[str, str]               engine package versions
    imports() -> None                          import the engine's libraries (timed apart)
    prepare(spec) -> dict                      build the engine's model files (cached; untimed)
    load(spec) -> model                        the timed load

and the loaded model provides `label`, `weight_bytes_per_token()` and
`stream(token_ids, count)`: a generator of greedily chosen token ids for a fresh sequence,
ignoring end-of-sequence, that the caller may close early. `extra(spec)` is optional. A native
engine measured by its own tool (llama.cpp's llama-bench) provides `measure()` (ttft_s and
decode_tok_s lists, as the worker's own loop would give) and `cold()` (with `cold_start_s`)
instead of `stream`.

`spec` is the worker's JSON spec: engine {family, variant}, config, checkpoint, artifact (fermi),
cache (a directory for derived files) and prompts (token id lists by name)."""
