"""chunk_and_tokenize against the tokenizer's raw batch encoding, on the embedded corpus.

python benchmarks/tokenization.py [--num_proc 1] [--ctx_len 2048]
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import append_row  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num_proc", type=int, default=1)
    ap.add_argument("--ctx_len", type=int, default=2048)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from sae_core.data import chunk_and_tokenize
    from sae_core.embedded import embedded_corpus, embedded_model_path

    tok = AutoTokenizer.from_pretrained(str(embedded_model_path()))
    corpus = embedded_corpus()
    texts = corpus["text"]

    def raw(batch):
        return {"ids": tok(batch["text"], add_special_tokens=False)["input_ids"]}

    t = time.perf_counter()
    enc = corpus.map(
        raw,
        batched=True,
        batch_size=2048,
        num_proc=args.num_proc if args.num_proc > 1 else None,
        remove_columns=["text"],
        load_from_cache_file=False,
    )
    t_raw = time.perf_counter() - t
    n_tokens = sum(len(x) for x in enc["ids"])

    t = time.perf_counter()
    out = chunk_and_tokenize(
        corpus, tok, max_seq_len=args.ctx_len, num_proc=args.num_proc, load_from_cache_file=False
    )
    t_chunk = time.perf_counter() - t
    ratio = t_raw / t_chunk
    print(f"tokenize: {len(texts):,} docs, {n_tokens:,} tokens -> {len(out):,} chunks of {args.ctx_len}")
    print(
        f"raw {n_tokens / t_raw:,.0f} tok/s, "
        f"chunk_and_tokenize {n_tokens / t_chunk:,.0f} tok/s, ratio {ratio:.2f}"
    )
    if not args.no_record:
        append_row(
            "tokenize",
            f"chunk_and_tokenize {n_tokens / t_chunk:,.0f} tok/s vs raw {n_tokens / t_raw:,.0f} "
            f"tok/s = {ratio:.2f} [num_proc={args.num_proc}, {n_tokens:,} tokens]",
        )


if __name__ == "__main__":
    main()
