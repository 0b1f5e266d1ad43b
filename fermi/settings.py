"""One typed settings object, read once: command-line flags override environment variables,
which override `fermi.toml` (FERMI_CONFIG, default ./fermi.toml when present), which overrides
the defaults here. The CLI applies its flags with `Settings.replace` and checks the result with
`check_settings`."""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from fermi.errors import InvalidRequest

PRECISIONS = ("fp32", "fp16", "int8", "int4")
TRUE = {"1", "true", "yes", "on"}
FALSE = {"0", "false", "no", "off"}


@dataclass(frozen=True)
class Settings:
    model: str = "Qwen/Qwen3-1.7B"
    device: str = "auto"  # auto | cpu | cuda | coreml
    precision: str | None = None  # fp32 | fp16 | int8 | int4 to load; None = export default
    offline: bool = False
    artifacts: str = "artifacts"
    default_thinking: str | None = None  # on | off | auto; None = off
    supports_thinking: bool | None = None  # None = the manifest says
    disable_think: bool = False
    engine_pool: int = 16  # sequences decoded together (the batch limit; n > 1 counts each)
    max_queue: int = 64  # requests waiting beyond those running
    session_ttl_s: float = 1800.0
    session_max: int = 256
    kv_cache_mb: int = 4096  # KV memory of cached prefixes (idle sessions included)
    timeout_ms: int = 0  # per-generation wall clock limit; 0 = none
    # Cap on what a request without a limit generates: 0 or -1 = none, it runs to the end of
    # the context (as vLLM, llama-server, Ollama and OpenAI run it); N > 0: at most N tokens.
    max_new_tokens: int = 0
    session_unclaimed_ttl_s: float = 300.0  # server-minted ids never sent back expire sooner
    openai_addr: str = "127.0.0.1:8000"
    grpc_addr: str = "127.0.0.1:50051"
    api_key: str | None = None  # one key or several, comma-separated (fermi/security.py)
    api_keys_file: str | None = None  # one key per line, optionally followed by a tenant name
    grpc_tls_cert: str | None = None  # PEM certificate chain; with grpc_tls_key: TLS for gRPC
    grpc_tls_key: str | None = None  # PEM private key
    request_timeout_s: float = 60.0  # HTTP: most seconds to receive a request's headers + body
    drain_s: float = 30.0  # SIGTERM: most seconds in-flight generations may run on (both servers)
    keep_alive_timeout_s: float = 30.0  # HTTP: idle keep-alive connections close after this
    max_connections: int = 1024  # HTTP: open connections beyond this are refused with 503
    cors_origins: str = ""  # comma-separated; "*" allows any
    max_body_bytes: int = 4 * 1024 * 1024
    threads: int = 0  # onnxruntime intra-op threads; 0 = one per physical core
    spin: bool = False  # intra-op threads spin between kernels: for a machine fermi has to itself
    huge_pages: bool = True  # CPU: back onnxruntime's weight buffers with huge pages (Linux)
    served_model_name: str = ""  # comma-separated names the model answers to; first = reported
    chat_template: str | None = None  # a Jinja file replacing the artifact's chat template
    ctx_size: int = 0  # tokens; caps the model's context (0 = the model's own)
    log_format: str = "plain"  # plain | json (logs and the access log)

    def replace(self, **changes) -> Settings:
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    @property
    def served_names(self) -> list[str]:
        """--served-model-name / FERMI_SERVED_MODEL_NAME split on commas, blanks dropped."""
        return [n.strip() for n in self.served_model_name.split(",") if n.strip()]


# Environment variable -> field; FERMI_OFFLINE and HF_HUB_OFFLINE both mean offline.
ENV = {
    "FERMI_MODEL": "model",
    "FERMI_DEVICE": "device",
    "FERMI_PRECISION": "precision",
    "FERMI_OFFLINE": "offline",
    "HF_HUB_OFFLINE": "offline",
    "FERMI_ARTIFACTS": "artifacts",
    "FERMI_DEFAULT_THINKING": "default_thinking",
    "FERMI_SUPPORTS_THINKING": "supports_thinking",
    "FERMI_DISABLE_THINK": "disable_think",
    "FERMI_ENGINE_POOL": "engine_pool",
    "FERMI_MAX_QUEUE": "max_queue",
    "FERMI_SESSION_TTL_S": "session_ttl_s",
    "FERMI_SESSION_MAX": "session_max",
    "FERMI_KV_CACHE_MB": "kv_cache_mb",
    "FERMI_TIMEOUT_MS": "timeout_ms",
    "FERMI_MAX_NEW_TOKENS": "max_new_tokens",
    "FERMI_OPENAI_ADDR": "openai_addr",
    "FERMI_GRPC_ADDR": "grpc_addr",
    "FERMI_SESSION_UNCLAIMED_TTL_S": "session_unclaimed_ttl_s",
    "FERMI_API_KEY": "api_key",
    "FERMI_API_KEYS_FILE": "api_keys_file",
    "FERMI_GRPC_TLS_CERT": "grpc_tls_cert",
    "FERMI_GRPC_TLS_KEY": "grpc_tls_key",
    "FERMI_REQUEST_TIMEOUT_S": "request_timeout_s",
    "FERMI_DRAIN_S": "drain_s",
    "FERMI_KEEP_ALIVE_TIMEOUT_S": "keep_alive_timeout_s",
    "FERMI_MAX_CONNECTIONS": "max_connections",
    "FERMI_CORS_ORIGINS": "cors_origins",
    "FERMI_MAX_BODY_BYTES": "max_body_bytes",
    "FERMI_THREADS": "threads",
    "FERMI_SPIN": "spin",
    "FERMI_HUGE_PAGES": "huge_pages",
    "FERMI_SERVED_MODEL_NAME": "served_model_name",
    "FERMI_CHAT_TEMPLATE": "chat_template",
    "FERMI_CTX_SIZE": "ctx_size",
    "FERMI_LOG_FORMAT": "log_format",
}


def _convert(name: str, raw: object) -> object:
    field = next(f for f in dataclasses.fields(Settings) if f.name == name)
    kind = str(field.type)
    if isinstance(raw, str):
        raw = raw.strip()
    try:
        if "bool" in kind:
            if isinstance(raw, bool):
                return raw
            value = str(raw).lower()
            if value in TRUE:
                return True
            if value in FALSE:
                return False
            raise ValueError(f"expected one of {sorted(TRUE | FALSE)}")
        if kind.startswith("int"):
            return int(raw)
        if kind.startswith("float"):
            return float(raw)
    except ValueError as e:
        raise InvalidRequest(f"setting {name}={raw!r} is invalid: {e}", param=name) from None
    return raw if raw != "" or "None" not in kind else None


def load_settings(environ: dict[str, str] | None = None) -> Settings:
    environ = dict(os.environ if environ is None else environ)
    values: dict[str, object] = {}
    config = environ.get("FERMI_CONFIG") or ("fermi.toml" if Path("fermi.toml").is_file() else "")
    if config:
        path = Path(config)
        if not path.is_file():
            raise InvalidRequest(f"FERMI_CONFIG points at {path}, which does not exist")
        try:
            table = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise InvalidRequest(f"{path} is not valid TOML: {e}") from None
        known = {f.name for f in dataclasses.fields(Settings)}
        for key, raw in table.items():
            if key not in known:
                raise InvalidRequest(f"{path}: unknown setting {key!r}", param=key)
            values[key] = _convert(key, raw)
    for var, name in ENV.items():
        if var in environ and environ[var] != "":
            values[name] = _convert(name, environ[var])
    return check_settings(Settings(**values))


def check_settings(settings: Settings) -> Settings:
    """Reject values no component could use, naming the setting; returns `settings`.

    Raises InvalidRequest (the CLI prints it as one line and exits 2)."""
    s = settings
    if s.default_thinking not in (None, "on", "off", "auto"):
        raise InvalidRequest("FERMI_DEFAULT_THINKING must be on, off or auto")
    if s.device not in ("auto", "cpu", "cuda", "coreml"):
        raise InvalidRequest(
            f"--device/FERMI_DEVICE must be auto, cpu, cuda or coreml, got {s.device!r}",
            param="device",
        )
    if s.precision not in (None, *PRECISIONS):
        raise InvalidRequest(
            f"--precision/FERMI_PRECISION must be fp32, fp16, int8 or int4, got {s.precision!r}",
            param="precision",
        )
    if s.log_format not in ("plain", "json"):
        raise InvalidRequest("log format (FERMI_LOG_FORMAT) must be plain or json")
    for name in ("ctx_size", "threads", "max_queue", "drain_s"):
        if getattr(s, name) < 0:
            raise InvalidRequest(f"{name} must be 0 or more, got {getattr(s, name)}", param=name)
    if s.max_new_tokens < -1:
        raise InvalidRequest(
            "--max-new-tokens/FERMI_MAX_NEW_TOKENS must be a number of tokens, or 0 or -1 for "
            f"no cap (to the end of the context), got {s.max_new_tokens}",
            param="max_new_tokens",
        )
    if s.engine_pool < 1:
        raise InvalidRequest(f"engine_pool must be 1 or more, got {s.engine_pool}", param="pool")
    if s.chat_template and not Path(s.chat_template).is_file():
        raise InvalidRequest(f"chat template file {s.chat_template} does not exist")
    return s
