"""Write a tiny, seeded, randomly initialised text encoder and its tokenizer: no download needed.

python -m data_tools.make_text_encoder OUT [--kind t5|clip] [--seed 0]

For the text demo and the tests; it encodes nothing meaningful, but it has the shapes, the
tokenizer and the loading path of the real ones (diffusion_dist.text.TextEncoder.load(OUT)):

- t5: T5EncoderModel (d_model 64, 2 layers, 4 heads) with ByT5's byte tokenizer, which needs no
  vocabulary file (one token per UTF-8 byte, 384 ids).
- clip: CLIPTextModelWithProjection (hidden 64, 2 layers, 4 heads, projection 32, 77 positions) with a
  CLIP byte-level BPE tokenizer (CLIPTokenizer) whose vocabulary is written here: the 256 byte symbols,
  the same with CLIP's end-of-word marker `</w>`, BPE_MERGES merges learned from a fixed caption-like
  text, and <|startoftext|> <|endoftext|> last, as in CLIP's own vocabulary. No CLIP vocabulary ships
  with the installed packages, and OpenAI's 49408-token one would dwarf a 64-wide model.
The same seed gives the same weights and files.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch

KINDS = ("t5", "clip")
BPE_MERGES = 64
# Words the tiny CLIP tokenizer learns its merges from: the demo's captions and their neighbours.
MERGE_TEXT = (
    "a photo of the digit zero one two three four five six seven eight nine a handwritten number "
    "a picture of a small white digit on a black background a blurry photo of a digit drawn by hand"
)
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's (and CLIP's) map from the 256 byte values to printable characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes, extra = {b: b for b in printable}, 0
    for b in range(256):
        if b not in codes:
            codes[b] = 256 + extra
            extra += 1
    return {b: chr(c) for b, c in codes.items()}


def learn_merges(text: str, count: int) -> list[tuple[str, str]]:
    """Byte-pair merges learned from `text` (Sennrich et al. 2016), CLIP-style: words end in `</w>`;
    ties go to the smallest pair, so the result never depends on hashing order."""
    words = Counter(tuple(w[:-1]) + (w[-1] + "</w>",) for w in text.lower().split())
    merges: list[tuple[str, str]] = []
    while len(merges) < count:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, n in words.items():
            for pair in zip(word, word[1:], strict=False):
                pairs[pair] += n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged: Counter[tuple[str, ...]] = Counter()
        for word, n in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += n
        words = merged
    return merges


def write_clip_tokenizer(out: Path) -> dict[str, int]:
    """vocab.json, merges.txt and tokenizer_config.json of a small CLIPTokenizer; returns the vocabulary."""
    symbols = list(bytes_to_unicode().values())
    merges = learn_merges(MERGE_TEXT, BPE_MERGES)
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {token: i for i, token in enumerate(tokens)}
    assert len(vocab) == len(tokens), "a merged token repeats a symbol"
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, sort_keys=True) + "\n")
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1, sort_keys=True) + "\n")
    return vocab


def build_text_encoder(out: str | Path, kind: str = "t5", seed: int = 0) -> Path:
    """Write the tiny encoder of this kind to `out` (created); the global RNG is left as it was."""
    from transformers import ByT5Tokenizer, CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    if kind not in KINDS:
        raise ValueError(f"--kind {kind!r}: choose one of {', '.join(KINDS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if kind == "t5":
        tokenizer = ByT5Tokenizer()
        tokenizer.save_pretrained(out)
        config = T5Config(
            vocab_size=len(tokenizer),
            d_model=64,
            d_kv=16,
            d_ff=128,
            num_layers=2,
            num_heads=4,
            dropout_rate=0.0,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        model_class = T5EncoderModel
    else:
        vocab = write_clip_tokenizer(out)
        config = CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=64,
            intermediate_size=128,
            projection_dim=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=vocab[BOS],
            eos_token_id=vocab[EOS],
            pad_token_id=vocab[EOS],
        )
        model_class = CLIPTextModelWithProjection
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config).eval()
    model.save_pretrained(out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_tools.make_text_encoder", description=__doc__.splitlines()[0])
    parser.add_argument("out", help="folder to write (config.json, model.safetensors, tokenizer files)")
    parser.add_argument("--kind", choices=KINDS, default="t5", help="t5: T5 encoder + ByT5 bytes; clip: CLIP text")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random initialisation")
    args = parser.parse_args(argv)
    build_text_encoder(args.out, args.kind, args.seed)
    print(f"wrote a tiny {args.kind} text encoder to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
