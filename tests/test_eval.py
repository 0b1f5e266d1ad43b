"""`fermi eval`: llama-perplexity's protocol (chunks, BOS, second half scored), perplexity and
KL on hand-made cases, a model against itself, and the command through a pty."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pexpect
import pytest

from fermi.engine import Engine
from fermi.errors import ArtifactError, InvalidRequest
from fermi.eval import (
    chunk_nll,
    chunk_tokens,
    evaluate,
    kl_divergence,
    log_softmax,
    scored_positions,
)

GPL3 = Path(__file__).parent / "data" / "gpl-3.0.txt"


def test_chunks_drop_the_tail_and_take_bos_like_llama_perplexity():
    tokens = list(range(10))
    assert chunk_tokens(tokens, 4, None) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert chunk_tokens(tokens, 4, 99) == [[99, 1, 2, 3], [99, 5, 6, 7]]
    assert chunk_tokens(tokens[:3], 4, None) == []


def test_second_half_is_scored():
    # n_ctx 8: logits at positions 4, 5, 6 predict tokens 5, 6, 7
    assert scored_positions(8) == slice(4, 7)
    logprobs = np.log(np.full((3, 10), 0.1))
    logprobs[np.arange(3), [5, 6, 7]] = 0.0  # certain of the right tokens
    assert chunk_nll(logprobs, list(range(8))) == pytest.approx([0.0, 0.0, 0.0])


def test_uniform_logits_have_perplexity_vocab():
    vocab = 37
    logprobs = log_softmax(np.zeros((5, vocab), np.float32))
    nll = chunk_nll(logprobs, [3] * 12)
    assert np.exp(nll.mean()) == pytest.approx(vocab)


def test_kl_divergence_by_hand():
    p = np.log(np.array([[0.5, 0.5], [0.9, 0.1]]))
    q = np.log(np.array([[0.25, 0.75], [0.9, 0.1]]))
    expected = 0.5 * np.log(0.5 / 0.25) + 0.5 * np.log(0.5 / 0.75)
    assert kl_divergence(p, q) == pytest.approx([expected, 0.0])
    assert kl_divergence(p, p) == pytest.approx([0.0, 0.0])


def test_a_model_against_itself(tiny_artifact):
    r = evaluate(tiny_artifact, GPL3, reference=tiny_artifact, n_ctx=64, max_chunks=3)
    assert (r.chunks, r.scored) == (3, 3 * 31)
    assert r.kl_mean == pytest.approx(0.0, abs=1e-9) and r.kl_max == pytest.approx(0, abs=1e-9)
    assert r.ppl_ratio == pytest.approx(1.0) and r.ppl_ref == pytest.approx(r.ppl)
    assert r.top1 == 1.0 and r.rms_dp == pytest.approx(0.0, abs=1e-9)


def test_perplexity_matches_token_by_token_decoding(tiny_artifact):
    """The same number from an independent route: decode each chunk one token at a time and
    score the second half's next-token probabilities."""
    from tokenizers import Tokenizer

    n_ctx = 32
    r = evaluate(tiny_artifact, GPL3, n_ctx=n_ctx, max_chunks=2)
    tokenizer = Tokenizer.from_file(str(tiny_artifact / "tokenizer.json"))
    tokens = tokenizer.encode(GPL3.read_text(), add_special_tokens=True).ids
    engine = Engine(tiny_artifact, "cpu")
    nll = []
    for start in (0, n_ctx):
        chunk, cache = tokens[start : start + n_ctx], engine.new_cache()
        for i, token in enumerate(chunk[:-1]):
            logits = engine.forward([token], cache).astype(np.float64)
            if i >= n_ctx // 2:
                logits -= logits.max()
                nll.append(np.log(np.exp(logits).sum()) - logits[chunk[i + 1]])
    assert r.scored == len(nll)
    assert r.ppl == pytest.approx(np.exp(np.mean(nll)), rel=1e-4)


def test_errors(tiny_artifact, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("a few words only")
    with pytest.raises(InvalidRequest, match="fewer than one chunk"):
        evaluate(tiny_artifact, short)
    with pytest.raises(InvalidRequest, match="does not exist"):
        evaluate(tiny_artifact, tmp_path / "missing.txt")
    with pytest.raises(InvalidRequest, match="even number"):
        evaluate(tiny_artifact, GPL3, n_ctx=63)
    with pytest.raises(ArtifactError, match="not a fermi artifact"):
        evaluate(tmp_path, GPL3)


def run_cli(*args: str) -> tuple[int, str]:
    child = pexpect.spawn(
        sys.executable, ["-m", "fermi.cli", "eval", *args], encoding="utf-8", timeout=120
    )
    child.expect(pexpect.EOF)
    child.close()
    return child.exitstatus, child.before


def test_cli_table_and_json(tiny_artifact):
    code, out = run_cli(
        str(tiny_artifact), "--text", str(GPL3), "--reference", str(tiny_artifact),
        "--ctx", "64", "--chunks", "2",
    )  # fmt: skip
    assert code == 0, out
    for label in ("perplexity", "KL mean", "KL 99%", "top-1 agreement", "100.00%"):
        assert label in out
    code, out = run_cli(
        str(tiny_artifact), "--text", str(GPL3), "--ctx", "64", "--chunks", "1", "--json"
    )
    assert code == 0, out
    result = json.loads(out)
    assert result["chunks"] == 1 and result["scored"] == 31 and result["kl_mean"] is None


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing-text", "does not exist"),
        ("not-artifact", "is not a fermi artifact"),
        ("short-text", "fewer than one chunk"),
    ],
)
def test_cli_errors_are_one_line_exit_2(tiny_artifact, tmp_path, case, message):
    short = tmp_path / "short.txt"
    short.write_text("too short")
    args = {
        "missing-text": [str(tiny_artifact), "--text", str(tmp_path / "none.txt")],
        "not-artifact": [str(tmp_path), "--text", str(GPL3)],
        "short-text": [str(tiny_artifact), "--text", str(short)],
    }[case]
    code, out = run_cli(*args)
    assert code == 2
    lines = out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]


def test_eval_imports_neither_torch_nor_transformers(tiny_artifact):
    """numpy and onnxruntime only, as on the serving path."""
    import subprocess

    check = (
        "import sys; from fermi.eval import evaluate; "
        f"evaluate({str(tiny_artifact)!r}, {str(GPL3)!r}, {str(tiny_artifact)!r}, n_ctx=64, "
        "max_chunks=1); "
        "print(','.join(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
