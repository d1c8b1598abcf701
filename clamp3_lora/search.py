"""Find music by text (or by another piece) with the base model or an adapter.

    python -m clamp3_lora.search "a slow air in D minor" music/ --adapter code/adapters/lora_abc_adapter
    python -m clamp3_lora.search "a jig" data/abc_test.jsonl --top 5 --json
    python -m clamp3_lora.search music/tune.abc music/                 # music -> music
    python -m clamp3_lora.search "a reel" demo/abc --demo --device cpu

MUSIC is a folder (ABC, MTF and MIDI files, searched recursively) or a data file (each record's first
music file; its `title` shown). Every piece is encoded whole, as evaluate does (512-patch segments
averaged). The features of the pieces are kept in a cache file (--cache) keyed by each file's content
hash and by the model (base weights, adapter, segment length), so a second query over the same
pieces encodes nothing new. Files that cannot be read are skipped and listed, never a crash.
"""
import argparse
import json
import os
import re
import sys
from pathlib import Path

import torch

from .data import scan_data_file
from .errors import Clamp3LoraError
from .evaluate import (add_model_flags, apply_defaults, build_model, check_segment_lengths, encode_sequences,
                       read_pieces, resolve_device, text_token_ids, with_adapter)
from .logs import atomic_torch_save, file_sha256
from .model import base_checkpoint_identity
from .mtf import MIDI_SUFFIXES
from .precision import default_for
from .prepare import find_files

MUSIC_SUFFIXES = (".abc", ".mtf") + MIDI_SUFFIXES
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "clamp3_lora" / "search_features.pt"


def music_files(source, music_roots=()):
    """[(path, title or "")] of a folder (recursively) or a data file; Clamp3LoraError when none."""
    source = Path(source)
    if source.is_dir():
        found = [(source / rel, abc_title(source / rel)) for rel in find_files(source, MUSIC_SUFFIXES)]
    elif source.is_file():
        scan = scan_data_file(source, limit=1.0, check_music=False, music_roots=music_roots)
        if scan.bad:
            print(scan.summary(), file=sys.stderr)
        found = [(Path(record.paths[0]), record.texts.get("title", "")) for record in scan.records]
    else:
        raise Clamp3LoraError(f"music to search not found: {source} (a folder or a data file)")
    if not found:
        raise Clamp3LoraError(f"no music to search in {source} (files ending in {', '.join(MUSIC_SUFFIXES)})")
    return found


def abc_title(path):
    """The first T: field of an ABC file ("" for other files or when it cannot be read)."""
    if path.suffix.lower() != ".abc":
        return ""
    try:
        match = re.search(r"^T:(.*)$", path.read_text(encoding="utf-8", errors="replace"), re.M)
    except OSError:
        return ""
    return match.group(1).strip() if match else ""


def model_key(args, weights):
    """What the features depend on besides the file's content: the base weights (the project's cheap
    checkpoint identity, not a hash of gigabytes on every query), the adapter, the segment length."""
    base = (base_checkpoint_identity(weights)["sha256_head_tail"] if weights
            else f"preset:{args.preset}:{args.seed}")
    parts = [f"weights={base}", f"patches={args.max_patches}"]
    if args.adapter:
        parts.append(f"adapter={file_sha256(Path(args.adapter) / 'adapter_model.safetensors')}")
    return ";".join(parts)


def load_cache(path):
    if not path.is_file():
        return {}
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a damaged cache is only a cache: say so and start a new one
        print(f"⚠ search cache {path} is unreadable ({type(error).__name__}); encoding again", file=sys.stderr)
        return {}


def music_features(model, files, args, device, precision):
    """({path: feature}, [errors], encoded count) of the files, from the cache where it has them."""
    cache_path = Path(args.cache)
    cache = load_cache(cache_path)
    known = cache.setdefault(model_key(args, model.base_checkpoint.get("path")), {})
    hashes, errors = {}, []
    for path in files:
        try:
            hashes[path] = file_sha256(path)
        except OSError as error:
            errors.append(f"{path}: {error.strerror or error}")
    missing = [path for path, digest in hashes.items() if digest not in known]
    pieces = read_pieces(missing, progress=not args.quiet) if missing else {}
    errors += [outcome for outcome in pieces.values() if isinstance(outcome, str)]
    good = {path: piece for path, piece in pieces.items() if not isinstance(piece, str)}
    if good:
        encoded = encode_sequences(model.music_features, list(good.values()), args.max_patches, args.batch_size, 0,
                                   device, precision, "music", not args.quiet)
        known.update({hashes[path]: feature for path, feature in zip(good, encoded)})
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(cache_path, cache)
    features = {path: known[digest] for path, digest in hashes.items() if digest in known}
    return features, errors, len(good)


def query_feature(model, query, args, device, precision):
    """The query's feature: a music file through the music encoder, anything else as text."""
    if Path(query).is_file() and Path(query).suffix.lower() in MUSIC_SUFFIXES:
        piece = read_pieces([Path(query)], progress=False)[Path(query)]
        if isinstance(piece, str):
            raise Clamp3LoraError(f"the query file cannot be read: {piece}")
        return encode_sequences(model.music_features, [piece], args.max_patches, 1, 0, device, precision,
                                "query", False)[0], "music"
    if not query.strip():
        raise Clamp3LoraError("the query is empty: give a text (\"a slow air in D minor\") or a music file")
    ids = text_token_ids(model.tokenizer, [query.strip()])
    return encode_sequences(model.text_features, ids, args.max_text_tokens, 1, model.tokenizer.pad_token_id,
                            device, precision, "query", False)[0], "text"


def search(args):
    device = resolve_device(args.device)
    precision = args.precision or default_for(device)
    files = music_files(args.music, args.music_root)
    model = build_model(args, device)
    check_segment_lengths(model, args.max_patches, args.max_text_tokens)
    if args.adapter:
        model = with_adapter(model, args.adapter)
    query, kind = query_feature(model, args.query, args, device, precision)
    titles = dict(files)
    features, errors, encoded = music_features(model, [path for path, _ in files], args, device, precision)
    if not features:
        raise Clamp3LoraError(f"none of the {len(files)} music files could be read (first: {errors[0]})")
    paths = list(features)
    scores = torch.nn.functional.cosine_similarity(torch.stack([features[p] for p in paths]), query[None], dim=-1)
    ranked = sorted(zip(scores.tolist(), paths), key=lambda pair: -pair[0])[:args.top]
    rows = [{"rank": n, "score": round(score, 4), "file": str(path), "title": titles.get(path, "")}
            for n, (score, path) in enumerate(ranked, start=1)]
    return rows, errors, kind, encoded, len(features)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m clamp3_lora.search", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:6]))
    parser.add_argument("query", help="a text, or a music file (.abc, .mtf, .mid) to find music like it")
    parser.add_argument("music", help="a folder of music files (searched recursively) or a data file (.jsonl)")
    parser.add_argument("--adapter", help="adapter directory (peft format); default: the base model")
    parser.add_argument("--top", type=int, default=10, help="how many results (default 10)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--cache", default=str(DEFAULT_CACHE), help=f"feature cache file (default {DEFAULT_CACHE})")
    parser.add_argument("--music-root", action="append", default=[], metavar="DIR",
                        help="for a data file: a folder music may lie in besides the data file's own (repeatable)")
    add_model_flags(parser)
    args = parser.parse_args(argv)
    apply_defaults(args)
    try:
        rows, errors, kind, encoded, total = search(args)
    except Clamp3LoraError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for line in errors:
        print(f"⚠ skipped {line}", file=sys.stderr)
    print(f"{total} pieces ({encoded} encoded now, {total - encoded} from the cache {args.cache}); "
          f"{kind} query{', adapter ' + args.adapter if args.adapter else ', base model'}", file=sys.stderr)
    if args.json:
        print(json.dumps({"query": args.query, "kind": kind, "results": rows, "skipped": errors}, indent=2))
    else:
        print(f"{'rank':>4}  {'score':>7}  file  (title)")
        for row in rows:
            title = f"  ({row['title']})" if row["title"] else ""
            print(f"{row['rank']:>4}  {row['score']:>7.4f}  {row['file']}{title}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
