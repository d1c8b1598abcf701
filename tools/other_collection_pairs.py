"""Pairs from a music21 collection that neither the demo nor its base uses, to check that the demo's
settings also beat the base elsewhere (Essen folk songs; written to OUT, never committed: the Essen
encodings are for non-commercial use only).

    pip install music21==10.5.1
    python tools/other_collection_pairs.py /tmp/essen      # OUT/{abc,mtf}_{train,eval}.jsonl, 175 / 75 each
    python train_clamp3_lora.py --demo --device cpu --abc-train /tmp/essen/abc_train.jsonl \
        --abc-eval /tmp/essen/abc_eval.jsonl --mtf-train /tmp/essen/mtf_train.jsonl --mtf-eval /tmp/essen/mtf_eval.jsonl

Texts come from each tune's metadata with the demo's own writers (tools/make_demo.py); 500 distinct
tunes, 250 kept as ABC and 250 rendered to MTF.
"""
import argparse
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import make_demo as md  # noqa: E402  (the demo's piece readers and text writers)

def essen_pieces(base):
    """Single-voice Essen tunes whose header gives a title, key and metre (the demo's own filter)."""
    pieces = []
    for path in sorted((base / "essenFolksong").glob("*.abc")):
        _, tunes = md.split_tunes(md.read_text(path))
        for n, tune in enumerate(tunes):
            fields = md.header_fields(tune)
            meta = md.abc_meta(fields)
            if md.usable_abc(tune, meta) and "V" not in fields:
                pieces.append(md.Piece(f"essen-{path.stem}-{n:04d}", "essen", f"essenFolksong/{path.name}", meta, tune))
    return pieces


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", help="folder for the data files and the music")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md.COLLECTIONS["essen"] = "the Essen folk song collection"
    base = md.corpus_dir()
    rng = random.Random(11)
    chosen = md.pick(essen_pieces(base), 560, rng)
    abc, mtf_candidates = chosen[:250], chosen[250:]
    md.write_abc_pieces(abc, out)
    mtf = md.write_mtf_pieces(mtf_candidates, 250, base, out, rng)
    for kind, group in (("abc", abc), ("mtf", mtf)):
        records = [md.clamp3_record(piece, rng) for piece in group]
        for name, part in (("train", records[:175]), ("eval", records[175:])):
            (out / f"{kind}_{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part),
                                                     encoding="utf-8")
        print(f"{kind}: {len(group)} pieces -> {out}/{kind}_train.jsonl, {kind}_eval.jsonl")


if __name__ == "__main__":
    main()
