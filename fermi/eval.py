"""Perplexity and KL-divergence of an artifact on a text file, with llama.cpp's `llama-perplexity`
protocol so the numbers compare with its (tools/perplexity/perplexity.cpp, `perplexity` and
`kl_divergence`):

- the whole text is tokenized at once (special tokens added as the tokenizer adds them);
- it is cut into `len(tokens) // n_ctx` chunks of n_ctx tokens (512 by default); the tail is
  dropped. Each chunk starts from an empty KV cache, and when the vocabulary adds a BOS token the
  chunk's first token is replaced by BOS (llama.cpp does exactly this);
- only the second half of each chunk is scored: the logits at positions n_ctx/2 .. n_ctx-2
  predict tokens n_ctx/2+1 .. n_ctx-1 (n_ctx/2 - 1 tokens a chunk), so every scored token has at
  least n_ctx/2 tokens of context.

Perplexity is exp(mean negative log-likelihood). Against a reference (the fp32 artifact), each
scored position also gives KL(P_ref || P) over the whole vocabulary and whether both argmaxes
agree; the summary is llama.cpp's: mean KL with its standard error, median, 99th percentile
(linear interpolation, as its `percentile`), maximum, the perplexity ratio PPL/PPL_ref, top-1
agreement ("same top p") and RMS of p(token) - p_ref(token). llama.cpp stores the reference's
log-probabilities as 16-bit values and skips vocabulary entries with p_ref < e^-16; here the sums
are exact in float64 (the difference is far below the digits reported).

numpy and onnxruntime only: no torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from fermi.errors import InvalidRequest

N_CTX = 512  # llama-perplexity's default context for this protocol


@dataclass
class EvalResult:
    """One artifact's scores on one text. Perplexities are per token; KL in nats per token."""

    artifact: str
    text: str
    tokens: int  # the whole text, tokenized
    n_ctx: int
    chunks: int
    scored: int  # tokens scored: chunks * (n_ctx/2 - 1)
    ppl: float
    ppl_error: float  # one standard error, as llama-perplexity prints it
    reference: str | None = None
    ppl_ref: float | None = None
    ppl_ratio: float | None = None  # PPL / PPL_ref = exp(mean(nll - nll_ref))
    kl_mean: float | None = None
    kl_error: float | None = None
    kl_median: float | None = None
    kl_p99: float | None = None
    kl_max: float | None = None
    top1: float | None = None  # fraction of positions where both argmaxes agree
    rms_dp: float | None = None  # RMS of p(token) - p_ref(token)

    def to_dict(self) -> dict:
        return asdict(self)


def chunk_tokens(tokens: list[int], n_ctx: int, bos: int | None) -> list[list[int]]:
    """The text's tokens cut into whole chunks of n_ctx (the tail dropped), each chunk's first
    token replaced by `bos` when the vocabulary adds one (llama-perplexity's rule)."""
    chunks = []
    for start in range(0, len(tokens) - n_ctx + 1, n_ctx):
        chunk = list(tokens[start : start + n_ctx])
        if bos is not None:
            chunk[0] = bos
        chunks.append(chunk)
    return chunks


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """(..., V) logits -> (..., V) float64 log-probabilities."""
    x = logits.astype(np.float64)
    x -= x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def scored_positions(n_ctx: int) -> slice:
    """The positions whose logits are scored: n_ctx/2 .. n_ctx-2 (each predicts the next)."""
    return slice(n_ctx // 2, n_ctx - 1)


def chunk_nll(logprobs: np.ndarray, chunk: list[int]) -> np.ndarray:
    """Negative log-likelihood of each scored token: logprobs (n_ctx/2 - 1, V) are the
    log-softmax at the scored positions, and predict chunk[n_ctx/2 + 1:]."""
    targets = np.asarray(chunk[len(chunk) // 2 + 1 :])
    return -logprobs[np.arange(len(targets)), targets]


def kl_divergence(ref_logprobs: np.ndarray, logprobs: np.ndarray) -> np.ndarray:
    """KL(P_ref || P) per position: (S, V) log-probabilities each -> (S,) nats."""
    return (np.exp(ref_logprobs) * (ref_logprobs - logprobs)).sum(-1)


def text_tokens(tokenizer, text: str) -> tuple[list[int], int | None]:
    """The whole text tokenized with the tokenizer's special tokens (as llama.cpp's
    common_tokenize(..., add_special=true)), and the BOS id when the vocabulary adds one."""
    added = tokenizer.encode("", add_special_tokens=True).ids
    return tokenizer.encode(text, add_special_tokens=True).ids, (added[0] if added else None)


class _Scorer:
    """All-position logits of one artifact for a chunk, each chunk on a fresh KV cache."""

    def __init__(self, artifact: Path, threads: int):
        from fermi.engine import Engine

        self.engine = Engine(artifact, "cpu", threads=threads)

    def logprobs(self, chunk: list[int]) -> np.ndarray:
        logits = self.engine.forward(chunk, self.engine.new_cache(), last_only=False)  # (S, V)
        return log_softmax(logits[scored_positions(len(chunk))])


def evaluate(
    artifact: Path,
    text_file: Path,
    reference: Path | None = None,
    n_ctx: int = N_CTX,
    max_chunks: int | None = None,
    threads: int = 0,
) -> EvalResult:
    """Score `artifact` on the text in `text_file` (llama-perplexity's protocol, module doc),
    and against `reference` when given.

    Raises InvalidRequest for a missing or undecodable text file, an n_ctx that is odd, below 4
    or beyond the model's context, a text shorter than one chunk, or a reference whose
    vocabulary differs; ArtifactError when a directory is not a loadable artifact."""
    return evaluate_many([artifact], text_file, reference, n_ctx, max_chunks, threads)[0]


def evaluate_many(
    artifacts: list[Path],
    text_file: Path,
    reference: Path | None = None,
    n_ctx: int = N_CTX,
    max_chunks: int | None = None,
    threads: int = 0,
) -> list[EvalResult]:
    """`evaluate` for several artifacts of one model, the reference run once per chunk. The
    text is tokenized with the first artifact's tokenizer."""
    from tokenizers import Tokenizer

    text = _read_text(text_file)
    scorers = [_Scorer(Path(a), threads) for a in artifacts]
    _check_ctx(n_ctx, min(s.engine.manifest.context_length for s in scorers))
    tokenizer = Tokenizer.from_file(str(Path(artifacts[0]) / "tokenizer.json"))
    tokens, bos = text_tokens(tokenizer, text)
    chunks = chunk_tokens(tokens, n_ctx, bos)[:max_chunks]
    if not chunks:
        raise InvalidRequest(
            f"{text_file} has {len(tokens)} tokens, fewer than one chunk of {n_ctx}", param="text"
        )
    ref = _Scorer(Path(reference), threads) if reference is not None else None
    vocab = scorers[0].engine.manifest.vocab_size
    for other in scorers[1:] + ([ref] if ref else []):
        if other.engine.manifest.vocab_size != vocab:
            raise InvalidRequest(
                f"{other.engine.artifact} has a vocabulary of "
                f"{other.engine.manifest.vocab_size}, not {vocab}: it is not the same model",
                param="reference",
            )
    scores = [_Scores() for _ in scorers]
    for chunk in chunks:
        ref_logprobs = ref.logprobs(chunk) if ref is not None else None
        for scorer, score in zip(scorers, scores, strict=True):
            score.add(scorer.logprobs(chunk), chunk, ref_logprobs)
    return [
        score.result(
            EvalResult(
                artifact=str(a),
                text=str(text_file),
                tokens=len(tokens),
                n_ctx=n_ctx,
                chunks=len(chunks),
                scored=0,
                ppl=0.0,
                ppl_error=0.0,
            ),
            reference,
        )
        for a, score in zip(artifacts, scores, strict=True)
    ]


class _Scores:
    """Per-token values of one artifact, gathered chunk by chunk."""

    def __init__(self):
        self.nll, self.nll_ref, self.kl, self.same_top, self.dp = [], [], [], [], []

    def add(self, logprobs: np.ndarray, chunk: list[int], ref_logprobs: np.ndarray | None):
        self.nll.append(chunk_nll(logprobs, chunk))
        if ref_logprobs is not None:
            self.nll_ref.append(chunk_nll(ref_logprobs, chunk))
            self.kl.append(kl_divergence(ref_logprobs, logprobs))
            self.same_top.append(ref_logprobs.argmax(-1) == logprobs.argmax(-1))
            self.dp.append(np.exp(-self.nll[-1]) - np.exp(-self.nll_ref[-1]))

    def result(self, result: EvalResult, reference: Path | None) -> EvalResult:
        nll = np.concatenate(self.nll)
        result.scored = len(nll)
        result.ppl = float(np.exp(nll.mean()))
        result.ppl_error = result.ppl * float(nll.std() / np.sqrt(max(1, len(nll) - 1)))
        if reference is None:
            return result
        nll_ref, kl, dp = (np.concatenate(x) for x in (self.nll_ref, self.kl, self.dp))
        result.reference = str(reference)
        result.ppl_ref = float(np.exp(nll_ref.mean()))
        result.ppl_ratio = float(np.exp((nll - nll_ref).mean()))
        result.kl_mean = float(kl.mean())
        result.kl_error = float(kl.std() / np.sqrt(max(1, len(kl) - 1)))
        result.kl_median = float(np.median(kl))
        result.kl_p99 = float(np.quantile(kl, 0.99))
        result.kl_max = float(kl.max())
        result.top1 = float(np.concatenate(self.same_top).mean())
        result.rms_dp = float(np.sqrt((dp**2).mean()))
        return result


def _read_text(path: Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InvalidRequest(f"text file {path} does not exist", param="text") from None
    except (IsADirectoryError, UnicodeDecodeError) as e:
        raise InvalidRequest(f"text file {path} is not UTF-8 text: {e}", param="text") from None


def _check_ctx(n_ctx: int, context_length: int) -> None:
    if n_ctx < 4 or n_ctx % 2:
        raise InvalidRequest(f"n_ctx must be an even number >= 4, not {n_ctx}", param="ctx")
    if n_ctx > context_length:
        raise InvalidRequest(
            f"n_ctx {n_ctx} exceeds the model's context length {context_length}", param="ctx"
        )


def format_rows(result: EvalResult) -> list[tuple[str, str]]:
    """(label, value) rows for a readable table."""
    r = result
    rows = [
        ("artifact", r.artifact),
        ("text", f"{r.text}: {r.tokens} tokens, {r.chunks} chunks of {r.n_ctx}, {r.scored} scored"),
        ("perplexity", f"{r.ppl:.4f} ± {r.ppl_error:.4f}"),
    ]
    if r.reference is not None:
        rows += [
            ("reference", r.reference),
            ("reference perplexity", f"{r.ppl_ref:.4f}"),
            ("perplexity ratio", f"{r.ppl_ratio:.4f}"),
            ("KL mean", f"{r.kl_mean:.6f} ± {r.kl_error:.6f}"),
            ("KL median", f"{r.kl_median:.6f}"),
            ("KL 99%", f"{r.kl_p99:.6f}"),
            ("KL max", f"{r.kl_max:.6f}"),
            ("top-1 agreement", f"{100 * r.top1:.2f}%"),
            ("RMS Δp", f"{100 * r.rms_dp:.3f}%"),
        ]
    return rows
