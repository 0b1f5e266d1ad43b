"""How far a quantized artifact's next-token distributions are from the fp32 graph's, over a
fixed token set (seeded random ids, every position of each sequence):

    python -m export.quality REFERENCE_ARTIFACT ARTIFACT [ARTIFACT ...] [--sequences 2 --length 128]

Prints, per artifact: top-1 agreement (argmax equal), mean and 95th-percentile KL(P_ref || P),
and the reference's own mean entropy (near log V means near-uniform outputs, where top-1
agreement says little: random-weight checkpoints with a small init are like that).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from fermi.engine import Engine


def token_set(vocab: int, sequences: int, length: int, seed: int = 1234) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, length).tolist() for _ in range(sequences)]


def all_logits(artifact: Path, tokens: list[list[int]]) -> np.ndarray:
    engine = Engine(artifact, "cpu")
    return np.concatenate(
        [engine.forward(ids, engine.new_cache(), last_only=False) for ids in tokens]
    )  # (positions, V)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def compare(reference: np.ndarray, other: np.ndarray) -> dict:
    p, q = log_softmax(reference), log_softmax(other)
    kl = (np.exp(p) * (p - q)).sum(-1)
    return {
        "top1": float((reference.argmax(-1) == other.argmax(-1)).mean()),
        "kl_mean": float(kl.mean()),
        "kl_p95": float(np.quantile(kl, 0.95)),
        "ref_entropy": float(-(np.exp(p) * p).sum(-1).mean()),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m export.quality", description=__doc__.split("\n")[0]
    )
    parser.add_argument("reference", type=Path)
    parser.add_argument("artifacts", type=Path, nargs="+")
    parser.add_argument("--sequences", type=int, default=2)
    parser.add_argument("--length", type=int, default=128)
    args = parser.parse_args(argv)
    vocab = Engine(args.reference, "cpu").manifest.vocab_size
    tokens = token_set(min(vocab, 150_000), args.sequences, args.length)
    reference = all_logits(args.reference, tokens)
    print(
        f"reference {args.reference}: {len(reference)} positions, vocab {vocab} "
        f"(uniform entropy {np.log(vocab):.2f})"
    )
    for artifact in args.artifacts:
        r = compare(reference, all_logits(artifact, tokens))
        print(
            f"{artifact}: top-1 {r['top1']:.3f}  KL mean {r['kl_mean']:.5f}  "
            f"p95 {r['kl_p95']:.5f}  (reference entropy {r['ref_entropy']:.2f})"
        )


if __name__ == "__main__":
    main()
