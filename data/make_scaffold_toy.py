"""
The scaffold-fusion toy task (scaffold.py), written as small JSONL files. Seeded: the same files every run.

    python data/make_scaffold_toy.py   # -> data/scaffold_toy.jsonl (shipped), data/scaffold_toy_src/format_docs.jsonl

The task: the prompt is six random lowercase letters and "=", the completion is the same letters each moved one
place on in the alphabet (z wraps to a):  {"prompt": "qwerty=", "completion": "rxfsuz"}.
format_docs.jsonl teaches a base model the *format* only: the same kind of prompts followed by six letters drawn
at random, independent of the prompt ({"text": "qwerty=bkxmoa"}), one document each. Pretrained on these mixed
into real text (tinyshakespeare, so that letters keep distinct embeddings: random letters alone make them all
alike), a base knows that six letters and the end of the document follow the "=", but not which letters: the
mapping is what the scaffold has to bring. At best such a base scores ln(26) = 3.26 nats per completion letter.
format_docs.jsonl is regenerated, not shipped (data/*/ is ignored).
"""

import argparse
import json
import os
import random
import string

HERE = os.path.dirname(os.path.abspath(__file__))
LETTERS = string.ascii_lowercase


def shift(text, k=1):
    return "".join(LETTERS[(LETTERS.index(c) + k) % 26] for c in text)


def random_word(rng, n):
    return "".join(rng.choice(LETTERS) for _ in range(n))


def write_jsonl(records, path):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    os.replace(tmp, path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default=HERE)
    p.add_argument("--num_records", type=int, default=3000, help="records of the task (scaffold_toy.jsonl)")
    p.add_argument("--num_format_docs", type=int, default=20000, help="format-only documents for pretraining")
    p.add_argument("--length", type=int, default=6, help="letters per prompt")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    task = []
    for _ in range(args.num_records):
        word = random_word(rng, args.length)
        task.append({"prompt": word + "=", "completion": shift(word)})
    format_docs = [{"text": random_word(rng, args.length) + "=" + random_word(rng, args.length)}
                   for _ in range(args.num_format_docs)]
    os.makedirs(os.path.join(args.out_dir, "scaffold_toy_src"), exist_ok=True)
    for name, records in (("scaffold_toy.jsonl", task), (os.path.join("scaffold_toy_src", "format_docs.jsonl"), format_docs)):
        path = os.path.join(args.out_dir, name)
        write_jsonl(records, path)
        print(f"wrote {path}: {len(records)} records, {os.path.getsize(path):,} bytes")


if __name__ == "__main__":
    main()
