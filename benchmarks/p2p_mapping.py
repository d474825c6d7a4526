"""How often the release's replace mapping misplaces the tail of a prompt, on a sub-word tokenizer.

    python benchmarks/p2p_mapping.py PAIRS.csv --tokenizer SD15_BASE/tokenizer   # a real tokenizer (CLIP's)
    python benchmarks/p2p_mapping.py PAIRS.csv [--merges 400]                     # a BPE trained on the captions

PAIRS.csv has the prompt pairs in columns `old_caption` and `edited_caption` (the release's
`editing_pie_bench_140.csv` has that layout) or `source` and `target`. `--tokenizer` reads a local
tokenizer folder (SD1.5's `tokenizer/`, CLIP's). Without it a byte-pair tokenizer is trained on the
captions themselves with a small number of merges: frequent words become one token, rarer ones split
into pieces, as CLIP splits rare words.

For each pair P2P would replace (equal word counts), it compares icd's aligned tail with the
release's (which, after the last changed word, continues on the target's own positions): a tail
token is misplaced when the source token whose map it reads is not the same text. icd's rule misplaces
none by construction; the count says how much of the release's behaviour that choice changes.
"""

from __future__ import annotations

import argparse
import csv
import json

from icdcli.diffusion.p2p.tokens import prompt_words, replacement_mapper, word_token_positions


def train_tokenizer(texts: list[str], merges: int, max_length: int = 77):
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    from icdcli.training.tokenizer import BOS, EOS, PAD, UNK, clip_like

    backend = Tokenizer(BPE(unk_token=UNK, end_of_word_suffix="</w>"))
    backend.normalizer = normalizers.Lowercase()  # as clip_like sets it; training needs it first
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.BPEDecoder(suffix="</w>")
    alphabet = sorted({c for text in texts for c in text.lower() if not c.isspace()})
    trainer = BpeTrainer(
        vocab_size=4 + 2 * len(alphabet) + merges,
        special_tokens=[PAD, BOS, UNK, EOS],
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    return clip_like(backend, backend.get_vocab(), max_length=max_length)


def read_pairs(path: str) -> list[tuple[str, str]]:
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    source = "old_caption" if "old_caption" in rows[0] else "source"
    target = "edited_caption" if "edited_caption" in rows[0] else "target"
    return [(row[source], row[target]) for row in rows]


def misplaced(tokenizer, source: str, target: str) -> tuple[int, int]:
    """(tail tokens whose map comes from a token of other text under the release's rule, tail tokens)."""
    length = tokenizer.model_max_length
    ids_source = tokenizer(source, padding="max_length", max_length=length, truncation=True).input_ids
    ids_target = tokenizer(target, padding="max_length", max_length=length, truncation=True).input_ids
    args = (prompt_words(source), prompt_words(target))
    positions = (word_token_positions(tokenizer, source), word_token_positions(tokenizer, target))
    mapped = {"source_positions": positions[0], "target_positions": positions[1], "length": length}
    released = replacement_mapper(*args, **mapped, shift_tail=True)
    aligned = replacement_mapper(*args, **mapped)
    changed = [k for k, (a, b) in enumerate(zip(*args, strict=True)) if a != b]
    start = positions[1][changed[-1]][-1] + 1 if changed and positions[1][changed[-1]] else 1
    wrong = total = 0
    for j in range(start, length):
        if ids_target[j] == tokenizer.pad_token_id:
            break  # padding: every rule reads padding or end-of-text there
        total += 1
        read = released[:, j].nonzero().flatten().tolist()
        if not read or ids_source[read[0]] != ids_target[j]:
            wrong += 1
        own = aligned[:, j].nonzero().flatten().tolist()
        assert own and ids_source[own[0]] == ids_target[j], "the aligned tail reads the same token"
    return wrong, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("pairs")
    parser.add_argument("--merges", type=int, default=400, help="BPE merges beyond the alphabet")
    parser.add_argument("--tokenizer", default=None, help="a local tokenizer folder (CLIP's) instead of a BPE")
    args = parser.parse_args()
    pairs = read_pairs(args.pairs)
    if args.tokenizer is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer, local_files_only=True)
    else:
        tokenizer = train_tokenizer([text for pair in pairs for text in pair], args.merges)
    replace_pairs = [(s, t) for s, t in pairs if len(prompt_words(s)) == len(prompt_words(t))]
    shifted = wrong_tokens = tail_tokens = 0
    for source, target in replace_pairs:
        wrong, total = misplaced(tokenizer, source, target)
        shifted += wrong > 0
        wrong_tokens += wrong
        tail_tokens += total
    words = {w for pair in pairs for text in pair for w in prompt_words(text.lower())}
    split = sum(len(tokenizer.tokenize(w)) > 1 for w in words)
    print(
        json.dumps(
            {
                "pairs": len(pairs),
                "replace_pairs": len(replace_pairs),
                "words": len(words),
                "words_split_into_pieces": split,
                "pairs_with_a_misplaced_tail": shifted,
                "tail_tokens": tail_tokens,
                "tail_tokens_misplaced_by_the_release_rule": wrong_tokens,
                "tail_tokens_misplaced_by_icd": 0,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
