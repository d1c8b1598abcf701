"""Regenerate the bundled demo assets in demo/ from the corpus that ships inside music21.

    python tools/make_demo.py            # writes demo/ next to this file's parent
    python tools/make_demo.py --out DIR  # writes somewhere else

Offline and deterministic (fixed seed). music21 is a dev-only tool here, not a runtime dependency.

What it builds (see demo/PROVENANCE.md, written by this script, for sources and licences):
  * demo/abc/*.abc   one tune per file, cut out of the ABC collections (each tune keeps its own header)
  * demo/mtf/*.mtf   MTF text made by clamp3_lora.mtf.midi_to_mtf from MIDI written by music21
  * demo/midi/*.mid  a few of those MIDI files themselves, so the on-the-fly MIDI path is exercised
  * demo/{abc,mtf}_{train,eval}.jsonl   English text from each piece's real metadata only
  * demo/tokenizer/  a small BPE text tokenizer with XLM-R's special tokens (vocab <= 1000)
"""
import argparse
import hashlib
import json
import random
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SEED = 3
EVAL_SHARE = 0.3
# How many pieces each collection contributes.
N_RYANS = 170
N_ONEILLS = 90
N_BACH = 140
N_AIRD = 110
N_MIDI = 5              # of the MTF pieces, bundled as .mid (MidiCaps schema, train split)
N_MIDICAPS_MTF = 3      # of the MTF eval pieces, written in the MidiCaps schema too
MAX_ABC_CHARS = 2500    # keeps the demo small and every tune well under 512 patches
MAX_PATCHES = 512       # every piece fits whole in one model input (no truncation)
VOCAB_SIZE = 1000       # the tiny model's text vocabulary
SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]  # ids 0..3 as in XLM-R; <mask> comes last

COLLECTIONS = {
    "ryans": "Ryan's Mammoth Collection",
    "oneills": "O'Neill's 1850 collection",
    "aird": "Aird's Airs",
    "bach": "the chorales of Johann Sebastian Bach",
}


@dataclass
class Piece:
    """One demo piece: where it came from, its metadata and (for ABC tunes) its ABC text."""
    id: str
    collection: str                # key of COLLECTIONS
    source_file: str               # path inside the music21 corpus
    meta: dict = field(default_factory=dict)
    abc: str = ""                  # the ABC text (for ABC pieces, and for folk tunes rendered to MIDI)
    music_path: str = ""           # path relative to demo/, set when written
    midi: bytes = b""              # the MIDI rendering (MTF pieces only)


# --------------------------------------------------------------------------------------------
# Reading ABC
# --------------------------------------------------------------------------------------------

def corpus_dir() -> Path:
    """Folder of the corpus bundled with music21."""
    import music21.corpus
    return Path(music21.corpus.__file__).resolve().parent


def read_text(path: Path) -> str:
    """A corpus text file as str (UTF-8, falling back to Latin-1), with Unix line ends."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def split_tunes(text: str) -> tuple[str, list[str]]:
    """Split a multi-tune ABC file into (file header before the first X:, [one tune per item]).

    A tune runs from its X: line to the next X: line; trailing blank and comment lines are dropped.
    """
    lines = text.split("\n")
    starts = [i for i, line in enumerate(lines) if re.match(r"X:", line)]
    header = "\n".join(lines[:starts[0]]) if starts else text
    tunes = []
    for n, start in enumerate(starts):
        end = starts[n + 1] if n + 1 < len(starts) else len(lines)
        body = lines[start:end]
        while body and (not body[-1].strip() or body[-1].lstrip().startswith("%")):
            body.pop()
        tunes.append("\n".join(line.rstrip() for line in body) + "\n")
    return header, tunes


def header_fields(tune: str) -> dict[str, list[str]]:
    """Header fields of one tune (the lines up to and including K:), e.g. {"T": [...], "K": [...]}."""
    fields: dict[str, list[str]] = {}
    for line in tune.split("\n"):
        m = re.match(r"([A-Za-z]):(.*)", line)
        if not m:
            continue
        value = re.sub(r"\s%.*$", "", m.group(2)).strip()   # drop trailing comments
        fields.setdefault(m.group(1), []).append(value)
        if m.group(1) == "K":
            break
    return fields


def abc_body(tune: str) -> str:
    """The music after the K: line (empty if there is none)."""
    parts = re.split(r"^K:.*$", tune, maxsplit=1, flags=re.M)
    return parts[1].strip() if len(parts) == 2 else ""


# --------------------------------------------------------------------------------------------
# Turning header values into plain English
# --------------------------------------------------------------------------------------------

MODES = {"": "major", "maj": "major", "major": "major", "ion": "major", "ionian": "major",
         "m": "minor", "min": "minor", "minor": "minor", "aeo": "minor", "aeolian": "minor",
         "dor": "dorian", "dorian": "dorian", "phr": "phrygian", "phrygian": "phrygian",
         "lyd": "lydian", "lydian": "lydian", "mix": "mixolydian", "mixolydian": "mixolydian",
         "loc": "locrian", "locrian": "locrian"}
ACCIDENTALS = {"": "", "#": " sharp", "b": " flat"}


def describe_key(k: str) -> str | None:
    """'Gm' -> 'G minor', 'Ador' -> 'A dorian', 'F#m' -> 'F sharp minor'; None if not a plain key."""
    m = re.match(r"([A-G])([#b]?)\s*([A-Za-z]*)", k.strip())
    if not m:
        return None
    mode = m.group(3)
    if mode not in ("m", "M") and mode.lower() not in MODES:
        return None
    mode = MODES["m" if mode == "m" else mode.lower()] if mode != "M" else None
    if mode is None:
        return None
    return f"{m.group(1)}{ACCIDENTALS[m.group(2)]} {mode}"


def describe_metre(m: str) -> str | None:
    """'C' -> '4/4 (common time)', 'C|' -> '2/2 (cut time)', '6/8' -> '6/8'; None if absent/free."""
    m = m.strip()
    if m == "C":
        return "4/4 (common time)"
    if m == "C|":
        return "2/2 (cut time)"
    return m if re.fullmatch(r"\d+/\d+", m) else None


def describe_tempo(q: str) -> str | None:
    """'1/4=104' -> '104 quarter notes per minute' (from an ABC Q: field)."""
    names = {"1/2": "half notes", "1/4": "quarter notes", "3/8": "dotted quarter notes",
             "1/8": "eighth notes", "3/4": "dotted half notes"}
    m = re.fullmatch(r"(\d+/\d+)\s*=\s*(\d+)", q.strip())
    if m and m.group(1) in names:
        return f"{m.group(2)} {names[m.group(1)]} per minute"
    return None


def clean_person(text: str) -> str:
    """Drop e-mail addresses, web addresses and quotes from a name field; keep names and dates."""
    text = re.sub(r"<[^>]*>", " ", text)
    words = [w for w in re.split(r"[\s*]+", text.replace('"', " "))
             if w and "@" not in w and not re.search(r"\w:\w|www\.|https?:|\.(com|uk|nl|net|ca)\b", w)]
    return " ".join(words).strip(" ,;")


def transcription_credit(values: list[str]) -> tuple[str | None, str | None]:
    """(transcriber, collector) from Z: fields: the first one that names a person, cleaned.

    Software tags ('abc 1.6'), bare 'Transcribed by' left after removing an e-mail address and dates
    are dropped; a Z: that says 'collected by' names the collector instead.
    """
    transcriber = collector = None
    for value in values:
        text = re.sub(r"\b\d+/\d+/\d+\b", " ", clean_person(value))
        text = re.sub(r"\s+", " ", text).strip(" ,;")
        m = re.match(r"(?i)collected (?:from|by)\s+(.*)", text)
        if m and not collector:
            collector = m.group(1)
        elif (not m and not transcriber and not re.match(r"(?i)abc", text)
              and re.search(r"\b[A-Z][a-z]+", re.sub(r"(?i)^(transcribed|contributed)\b", "", text))):
            transcriber = text
    return transcriber, collector


def tidy_title(title: str) -> str:
    """Strip quotes and a trailing full stop; title-case titles written all in capitals."""
    title = title.strip().strip('"').strip()
    title = re.sub(r"\s+", " ", title).rstrip(".,;").strip()
    letters = [c for c in title if c.isalpha()]
    mostly_caps = letters and sum(c.isupper() for c in letters) > 0.8 * len(letters)
    return recase(title) if mostly_caps else title


def recase(text: str) -> str:
    """'MISS O'NEILL'S JIG' -> "Miss O'Neill's Jig", 'G.L.TRACY' -> 'G.L.Tracy' (for all-capital fields)."""
    text = re.sub(r"(^|[\s.\-(])([a-z])", lambda m: m.group(1) + m.group(2).upper(), text.lower())
    return re.sub(r"\b(O'|Mc)([a-z])", lambda m: m.group(1) + m.group(2).upper(), text)


NATIONALITIES = {"irish", "scotch", "scottish", "english", "welsh", "american", "german",
                 "french", "west india", "manx", "italian", "spanish"}


def classify_credit(value: str) -> tuple[str, str] | None:
    """A C: value as ('composer', name), ('origin', place) or ('collector', name)."""
    value = value.strip().strip("()").strip()
    bare = value.strip('"').rstrip(".").strip()
    if not bare:
        return None
    m = re.match(r"(?i)collected (?:from|by)\s+(.*)", bare)
    if m:
        return "collector", m.group(1).strip()
    if bare.lower() in NATIONALITIES:
        return "origin", bare.title()
    bare = re.sub(r"(?i)^by\s+", "", bare)
    return "composer", recase(bare) if bare.isupper() else bare


# --------------------------------------------------------------------------------------------
# The collections
# --------------------------------------------------------------------------------------------

def abc_meta(fields: dict[str, list[str]]) -> dict:
    """The metadata shared by every ABC collection, from the tune's header fields."""
    titles = [tidy_title(t) for t in fields.get("T", []) if t.strip() and "(" not in t]
    meta: dict = {"title": titles[0] if titles else "", "other_titles": titles[1:3],
                  "key": describe_key(fields.get("K", [""])[0]),
                  "metre": describe_metre(fields.get("M", [""])[0]),
                  "tempo": describe_tempo(fields["Q"][0]) if fields.get("Q") else None,
                  "form": None, "composer": None, "origin": None,
                  "notes": [], "marking": None}
    meta["transcriber"], meta["collector"] = transcription_credit(fields.get("Z", []))
    if fields.get("R") and fields["R"][0].strip():
        meta["form"] = fields["R"][0].strip(" .").lower().replace("slipjig", "slip jig")
    for value in fields.get("C", []):
        kind = classify_credit(value)
        if kind and not meta[kind[0]]:
            meta[kind[0]] = kind[1]
    if fields.get("O") and fields["O"][0].strip():
        origin = fields["O"][0].strip().rstrip(".")
        if origin.lower() in NATIONALITIES:
            meta["origin"] = origin.title()
    for name in ("composer", "origin", "collector", "transcriber"):
        if meta[name] and ":" in meta[name]:
            meta[name] = None   # mangled by e-mail obfuscation in the source ('Colbat:h'): leave out
    return meta


def usable_abc(tune: str, meta: dict) -> bool:
    """Keep tunes with a clean title, a plain key, a metre, some music and a modest size."""
    return (bool(meta["title"]) and ":" not in meta["title"] and meta["key"] is not None
            and meta["metre"] is not None and len(abc_body(tune)) > 40
            and len(tune) <= MAX_ABC_CHARS and tune.startswith("X:") and fits(tune))


def ryans_pieces(base: Path) -> list[Piece]:
    """Ryan's Mammoth Collection: one tune per file; the title carries ' -- Type'."""
    pieces = []
    for path in sorted((base / "ryansMammoth").glob("*.abc")):
        _, tunes = split_tunes(read_text(path))
        if len(tunes) != 1:
            continue
        tune = tunes[0]
        fields = header_fields(tune)
        if fields.get("T"):
            title, _, kind = fields["T"][0].partition(" -- ")
            fields["T"][0] = title
            if kind.strip() and not (fields.get("R") and fields["R"][0].strip()):
                fields["R"] = [kind.strip()]
        meta = abc_meta(fields)
        notes = [n for n in fields.get("N", []) if n and not re.fullmatch(r"[\d\s.]+", n)
                 and not re.search(r"contributed|\w:\w", n, re.I)]
        if notes:
            meta["notes"] = [" ".join(notes)] if len(" ".join(notes)) <= 200 else []
        if fields.get("B"):
            meta["book"] = fields["B"][0].strip()
        if usable_abc(tune, meta):
            pieces.append(Piece(f"ryans-{slug(path.stem)}", "ryans",
                                f"ryansMammoth/{path.name}", meta, tune))
    return pieces


def oneills_pieces(base: Path) -> list[Piece]:
    """O'Neill's 1850: many tunes per file; N: holds quoted performance marks and collectors."""
    pieces, seen = [], set()
    for path in sorted((base / "oneills1850").glob("*.abc")):
        _, tunes = split_tunes(read_text(path))
        for tune in tunes:
            fields = header_fields(tune)
            meta = abc_meta(fields)
            number = re.search(r"(\d+)", fields.get("B", [""])[0] or "")
            if not number or number.group(1) in seen:
                continue
            meta["number"] = number.group(1)
            for note in fields.get("N", []):
                for phrase in re.findall(r'"([^"]+)"', note):
                    phrase = phrase.strip().rstrip(".")
                    m = re.match(r"(?i)collected (?:from|by)\s+(.*)", phrase)
                    if m and not meta["collector"]:
                        meta["collector"] = m.group(1).strip()
                    elif (not m and not meta["marking"] and not phrase.startswith("(")
                          and re.search(r"[A-Za-z]{3}", phrase)):
                        meta["marking"] = phrase
            if usable_abc(tune, meta):
                seen.add(number.group(1))
                pieces.append(Piece(f"oneills-{int(number.group(1)):04d}", "oneills",
                                    f"oneills1850/{path.name}", meta, tune))
    return pieces


def aird_pieces(base: Path) -> list[Piece]:
    """Aird's Airs, books 1-6: many tunes per file; some books open with a title-page comment."""
    pieces = []
    for path in sorted((base / "airdsAirs").glob("book*.abc")):
        header, tunes = split_tunes(read_text(path))
        book = re.sub(r"\D", "", path.stem)
        title_page = " / ".join(line.lstrip("% ").strip() for line in header.split("\n")
                               if line.startswith("%") and line.lstrip("% ").strip())
        for tune in tunes:
            fields = header_fields(tune)
            meta = abc_meta(fields)
            meta["book"] = book
            meta["title_page"] = title_page
            number = re.sub(r"\D", "", fields.get("X", [""])[0])
            if "V" in fields or not number or len(fields.get("P", [])) > 1:
                continue   # keep single-voice tunes without part labels: simple to render
            if usable_abc(tune, meta):
                pieces.append(Piece(f"aird-b{book}-{int(number):04d}", "aird",
                                    f"airdsAirs/{path.name}", meta, tune))
    return pieces


def bach_pieces(base: Path) -> list[Piece]:
    """Bach chorales (MusicXML) whose BWV number is in music21's chorale list (titles from it)."""
    from music21.corpus.chorales import ChoraleListRKBWV
    by_bwv = ChoraleListRKBWV().byBWV
    pieces = []
    for path in sorted((base / "bach").glob("bwv*.mxl")):
        m = re.fullmatch(r"bwv([\d.]+)", path.stem)
        if not m or m.group(1) not in by_bwv:
            continue   # variants (-a, -sc, ...) and works missing from the list are left out
        info = by_bwv[m.group(1)]
        meta = {"title": info["title"], "bwv": m.group(1),
                "riemenschneider": info.get("riemenschneider"), "composer": "Johann Sebastian Bach",
                "form": "chorale"}
        pieces.append(Piece(f"bach-bwv{m.group(1).replace('.', '_')}", "bach",
                            f"bach/{path.name}", meta))
    return pieces


def slug(text: str) -> str:
    """A short, file-name-safe lowercase id part."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60]


# --------------------------------------------------------------------------------------------
# MIDI and MTF
# --------------------------------------------------------------------------------------------

def load_score(piece: Piece, base: Path):
    """The music21 score of a piece (parsed from its ABC text or its corpus file)."""
    from music21 import converter
    if piece.abc:
        return converter.parse(piece.abc, format="abc")
    return converter.parse(str(base / piece.source_file))


def add_score_meta(piece: Piece, score) -> None:
    """Key, metre and part names read from a MusicXML score into the piece's metadata."""
    from music21 import key, meter
    keys = list(score.recurse().getElementsByClass(key.Key))
    times = list(score.recurse().getElementsByClass(meter.TimeSignature))
    if keys:
        tonic = keys[0].tonic.name.replace("-", " flat").replace("#", " sharp")
        piece.meta["key"] = f"{tonic} {keys[0].mode}"
    if times:
        piece.meta["metre"] = times[0].ratioString
    piece.meta["parts"] = [p.partName for p in score.parts if p.partName]


def write_midi(score, path: Path) -> None:
    """Write a score as a standard MIDI file with music21."""
    score.write("midi", fp=str(path))


def to_mtf(midi_path: Path) -> str:
    """MTF text of a MIDI file, with the project's own converter (SPEC §5)."""
    from clamp3_lora.mtf import midi_to_mtf
    return midi_to_mtf(str(midi_path))


# --------------------------------------------------------------------------------------------
# Text from metadata
# --------------------------------------------------------------------------------------------

def a_or_an(word: str) -> str:
    """The indefinite article for a word."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def collection_phrase(piece: Piece) -> str:
    """Where a piece comes from, in words."""
    m = piece.meta
    if piece.collection == "ryans":
        return COLLECTIONS["ryans"]
    if piece.collection == "oneills":
        return f"O'Neill's 1850 collection (tune {m['number']})"
    if piece.collection == "aird":
        return f"Aird's Airs, book {m['book']}"
    return COLLECTIONS[piece.collection]


def analysis_text(piece: Piece, rng: random.Random) -> str:
    """One sentence: form, key, metre, origin, composer, title and source (varied word order)."""
    m = piece.meta
    if piece.collection == "bach":
        kind = "four-part chorale harmonisation" if len(m.get("parts", [])) == 4 else "chorale harmonisation"
    else:
        kind = m.get("form") or "tune"
    words = [f"{a_or_an(kind)} {kind}"]
    key_metre = [f"in {m[k]}" for k in ("key", "metre") if m.get(k)]
    if rng.random() < 0.5:
        key_metre.reverse()
    words += key_metre
    if m.get("origin") in ("Scotch", "Irish"):
        words.append("from " + {"Scotch": "Scotland", "Irish": "Ireland"}[m["origin"]])
    elif m.get("origin"):
        words.append(f"of {m['origin']} origin")
    if m.get("composer"):
        words.append(f"by {m['composer']}")
    body = " ".join(words)
    source = f"BWV {m['bwv']}" if piece.collection == "bach" else f"from {collection_phrase(piece)}"
    if rng.random() < 0.5:
        return f'"{m["title"]}": {body}, {source}.'
    return f'{body[0].upper()}{body[1:]} titled "{m["title"]}", {source}.'


def description_text(piece: Piece, rng: random.Random) -> str:
    """A sentence or two naming the piece, its alternative titles, tempo and performance mark."""
    m = piece.meta
    name = f'"{m["title"]}"'
    if m.get("other_titles"):
        name += " (also called " + " and ".join(f'"{t}"' for t in m["other_titles"]) + ")"
    kind = m.get("form") or ("tune" if piece.collection != "bach" else "chorale")
    subject = f"{name} is {a_or_an(kind)} {kind}"
    if m.get("composer"):
        subject += f" by {m['composer']}"
    if piece.collection == "bach":
        subject += f", BWV {m['bwv']}"
        if m.get("riemenschneider"):
            subject += f" (Riemenschneider no. {m['riemenschneider']})"
    extras = []
    if m.get("marking"):
        extras.append(f'The source marks it "{m["marking"]}".')
    if m.get("tempo"):
        extras.append(f"The tempo is given as {m['tempo']}.")
    if m.get("parts"):
        extras.append("Parts: " + ", ".join(m["parts"]) + ".")
    if m.get("key") and rng.random() < 0.5:
        extras.append(f"It is written in {m['key']}.")
    return " ".join([subject + "."] + extras)


def background_text(piece: Piece) -> str:
    """Provenance facts from the file: book, collector, transcriber, notes (one per line)."""
    m = piece.meta
    lines = []
    if piece.collection == "aird" and m.get("title_page"):
        lines.append(f"From book {m['book']} of Aird's Airs: {m['title_page']}.")
    elif piece.collection != "bach":
        lines.append(f"From {collection_phrase(piece)}.")
        if m.get("book") and piece.collection == "ryans" and m["book"] != COLLECTIONS["ryans"]:
            lines.append(f"Book: {m['book']}.")
    else:
        lines.append("From the Bach chorales in the music21 corpus.")
    if m.get("collector"):
        lines.append(f"Collected by {m['collector']}.")
    if m.get("transcriber"):
        lines.append(f"ABC transcription: {m['transcriber']}.")
    for note in m.get("notes", []):
        lines.append(f"Note: {note.rstrip('.')}.")
    return "\n".join(lines)


def clamp3_record(piece: Piece, rng: random.Random) -> dict:
    """The CLaMP 3 schema record of a piece."""
    m = piece.meta
    tags = [t for t in (m.get("form"), m.get("key"), m.get("metre"), m.get("origin")) if t]
    return {"id": piece.id, "filepaths": [piece.music_path], "title": m["title"],
            "artists": [m["composer"]] if m.get("composer") else [],
            "genres": [m["form"].capitalize()] if m.get("form") else [],
            "tags": tags, "description": description_text(piece, rng),
            "analysis": analysis_text(piece, rng), "background": background_text(piece)}


def midicaps_record(piece: Piece, rng: random.Random) -> dict:
    """The MidiCaps schema record of a piece (location + caption)."""
    return {"location": piece.music_path,
            "caption": analysis_text(piece, rng) + " " + description_text(piece, rng)}


# --------------------------------------------------------------------------------------------
# Building the demo
# --------------------------------------------------------------------------------------------

def pick(pieces: list[Piece], n: int, rng: random.Random) -> list[Piece]:
    """n pieces drawn with the seeded rng, with distinct music (by content hash)."""
    pieces = sorted(pieces, key=lambda p: p.id)
    rng.shuffle(pieces)
    chosen, hashes = [], set()
    for p in pieces:
        h = hashlib.sha1(abc_body(p.abc).encode()).hexdigest() if p.abc else p.id
        if h not in hashes:
            hashes.add(h)
            chosen.append(p)
        if len(chosen) == n:
            break
    return chosen


def write_abc_pieces(pieces: list[Piece], out: Path) -> None:
    """One .abc file per tune under out/abc/."""
    (out / "abc").mkdir(parents=True, exist_ok=True)
    for p in pieces:
        p.music_path = f"abc/{p.id}.abc"
        (out / p.music_path).write_text(p.abc, encoding="utf-8")


def write_mtf_pieces(candidates: list[Piece], n: int, base: Path, out: Path,
                     rng: random.Random) -> list[Piece]:
    """Render candidates to MIDI with music21 and to MTF with the project's converter until n are done.

    Pieces that music21 cannot render or whose MTF is over MAX_PATCHES patches are skipped.
    """
    (out / "mtf").mkdir(parents=True, exist_ok=True)
    done = []
    with tempfile.TemporaryDirectory() as tmp:
        for p in pick(candidates, len(candidates), rng):
            midi = Path(tmp) / f"{p.id}.mid"
            try:
                score = load_score(p, base)
                if p.collection == "bach":
                    add_score_meta(p, score)
                write_midi(score, midi)
                mtf = to_mtf(midi)
            except Exception as exc:  # music21 cannot render some corpus files; skip them
                print(f"  skipped {p.id}: {type(exc).__name__}: {exc}"[:160])
                continue
            if not fits(mtf):
                continue
            p.midi = midi.read_bytes()
            p.music_path = f"mtf/{p.id}.mtf"
            (out / p.music_path).write_text(mtf, encoding="utf-8")
            done.append(p)
            if len(done) == n:
                break
    return done


def fits(music: str) -> bool:
    """True when ABC/MTF text becomes 1..MAX_PATCHES patches with the project's patchify."""
    from clamp3_lora.errors import MusicFormatError
    from clamp3_lora.patches import patchify
    try:
        return len(patchify(music, truncate=None)) <= MAX_PATCHES
    except MusicFormatError:
        return False


def bundle_midi(pieces: list[Piece], out: Path) -> None:
    """Replace the .mtf of these pieces with the .mid file itself, under out/midi/."""
    (out / "midi").mkdir(parents=True, exist_ok=True)
    for p in pieces:
        (out / p.music_path).unlink()
        p.music_path = f"midi/{p.id}.mid"
        (out / p.music_path).write_bytes(p.midi)


def split(pieces: list[Piece], rng: random.Random) -> tuple[list[Piece], list[Piece]]:
    """Seeded split per collection: about EVAL_SHARE of each collection goes to evaluation."""
    train, evaluation = [], []
    for name in sorted({p.collection for p in pieces}):
        group = sorted((p for p in pieces if p.collection == name), key=lambda p: p.id)
        rng.shuffle(group)
        n_eval = round(len(group) * EVAL_SHARE)
        evaluation += group[:n_eval]
        train += group[n_eval:]
    return sorted(train, key=lambda p: p.id), sorted(evaluation, key=lambda p: p.id)


def write_jsonl(path: Path, records: list[dict]) -> None:
    """UTF-8 JSON Lines, one object per line."""
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def all_texts(records: list[dict]) -> list[str]:
    """Every text string in the records (the tokenizer's training material)."""
    texts = []
    for r in records:
        for k, v in r.items():
            if k in ("id", "filepaths", "location"):
                continue
            texts += v if isinstance(v, list) else [v]
    return [t for t in texts if t]


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------

def build_tokenizer(texts: list[str], folder: Path) -> None:
    """Train a lowercase BPE tokenizer with XLM-R's special tokens and save it for AutoTokenizer.

    Ids: <s>=0, <pad>=1, </s>=2, <unk>=3, learned pieces, then <mask> (the last id, VOCAB_SIZE-1).
    Single sequences are wrapped as <s> ... </s>; pairs as <s> A </s></s> B </s> (as XLM-R).
    """
    from tokenizers import (Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers,
                            processors, trainers)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase(),
                                           normalizers.Replace(Regex(r"\s+"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    # BPE training is deterministic (integer counts, ties broken by the pair itself).
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE - 1, special_tokens=SPECIAL_TOKENS,
                                  min_frequency=2, show_progress=False)
    tok.train_from_iterator(sorted(set(texts)), trainer=trainer)
    tok.add_special_tokens(["<mask>"])
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", ids["<s>"]), ("</s>", ids["</s>"])])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    special = {"bos_token": "<s>", "eos_token": "</s>", "sep_token": "</s>", "cls_token": "<s>",
               "unk_token": "<unk>", "pad_token": "<pad>", "mask_token": "<mask>"}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 512,
              "padding_side": "right", "clean_up_tokenization_spaces": False, **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


# --------------------------------------------------------------------------------------------
# Provenance
# --------------------------------------------------------------------------------------------

def write_provenance(out: Path, counts: dict, totals: dict, music21_version: str) -> None:
    """demo/PROVENANCE.md: collections, sources, licences, conversion and counts."""
    text = PROVENANCE.format(music21=music21_version, **counts, **totals)
    (out / "PROVENANCE.md").write_text(text, encoding="utf-8")


PROVENANCE = """\
# Demo data: provenance and licence

Everything in this folder is generated by `python tools/make_demo.py` (fixed seed {seed}, offline)
from the corpus that ships inside the **music21** package (version {music21}). Do not edit by hand.

## Collections used

| Collection (music21 corpus folder) | Original publication | Used as | Pieces |
|---|---|---|---|
| Ryan's Mammoth Collection (`ryansMammoth/`) | Ryan's Mammoth Collection of fiddle tunes, Boston, 1883 (some tunes via its reprint, Cole's 1000 Fiddle Tunes) | ABC | {ryans} |
| O'Neill's 1850 (`oneills1850/`) | Francis O'Neill, O'Neill's Music of Ireland (1850 melodies), Chicago, 1903 | ABC | {oneills} |
| Bach chorales (`bach/`, MusicXML) | J. S. Bach (1685-1750), four-part chorale harmonisations | MTF (+ MIDI) | {bach} |
| Aird's Airs (`airdsAirs/`) | James Aird, A Selection of Scotch, English, Irish and Foreign Airs, Glasgow, six volumes from 1778 (the date in book 1's header, "often cited as 1782") | MTF (+ MIDI) | {aird} |

Totals: {n_abc} ABC tunes ({abc_train} train / {abc_eval} eval) and {n_mtf} MTF pieces
({mtf_train} train / {mtf_eval} eval), of which {n_midi} are bundled as MIDI files.

## Licence

- The music itself is old enough to be in the public domain (Bach died in 1750; the tune books were
  printed between the late 18th century and 1903).
- The encodings are taken from the music21 corpus. music21's `corpus/license.txt` says the corpus is
  "distributed with the permission of the encoders (and, where needed, the composers or arrangers) and
  where permitted under United States copyright law", that to the best of the music21 authors'
  knowledge each piece "is either out of copyright in the United States or is licensed for use", and
  that "some encodings included in the corpus may not be used for commercial uses or have other
  restrictions". None of the four collections used here carries a licence file or a licence notice
  of its own in the corpus (only `essenFolksong/` does: it allows non-commercial use only, so the Essen
  collection is **not** used). music21 itself is BSD-3-Clause.
- The ABC transcribers named in the files are credited in each tune's `Z:` field and in the text
  (`background`): e.g. Ray Davies, Bob Puckette and John Walsh (Ryan's), Norbert Paap (O'Neill's),
  Jack Campin (Aird's). The Bach chorale encodings and their titles come from the music21 corpus
  (titles and numbers from music21's chorale list, compiled by Margaret Greentree).
- Treat this folder as demo/test material for research use, under the same terms as the music21
  corpus; check those terms before any commercial use.

## How it was converted

- **ABC** (`abc/*.abc`): multi-tune files are split at `X:` lines, one tune per file, each keeping its
  own header (X:, T:, M:, L:, K:, ...); trailing blank/comment lines dropped, file-level comments not
  kept. Tunes are kept only with a title, a plain key, a metre, at most {max_abc} characters; exact
  duplicate melodies are dropped.
- **MTF** (`mtf/*.mtf`): each score is parsed by music21 (the chorale's MusicXML, or the Aird tune's
  ABC) and written to MIDI with `score.write('midi', ...)`, then turned into MTF text by the project's
  own `clamp3_lora.mtf.midi_to_mtf` (SPEC §5). Pieces music21 cannot render, or whose MTF is more
  than {max_patches} patches (`clamp3_lora.patches.patchify`), are skipped.
- **MIDI** (`midi/*.mid`): {n_midi} of those MIDI files are kept as they are, referenced from
  `mtf_train.jsonl` in the MidiCaps schema so the on-the-fly MIDI conversion is exercised.
- **Text**: English, built only from each piece's own metadata: ABC `T:` (title), `C:` (composer or
  origin), `O:` (origin), `R:` (form), `K:` (key), `M:` (metre), `Q:` (tempo), `N:` (notes and
  O'Neill's performance marks and collectors), `Z:` (transcriber, e-mail and web addresses removed),
  `B:` (book); for the chorales the title, BWV and Riemenschneider numbers from music21's chorale list
  and the key, metre and part names read from the MusicXML. Records use the CLaMP 3 schema
  (`id`, `filepaths`, `title`, `artists`, `genres`, `tags`, `description`, `analysis`, `background`);
  the {n_midi} MIDI records and {n_midicaps_mtf} MTF eval records use the MidiCaps schema
  (`location`, `caption`). Paths are relative to this folder.
- **Split**: seeded, per collection, about {eval_pct}% to evaluation; no piece is in both.
- **Tokenizer** (`tokenizer/`): a lowercase BPE tokenizer trained with the `tokenizers` library on
  the texts of all records, {vocab} tokens, XLM-R's special tokens (`<s>`=0, `<pad>`=1, `</s>`=2,
  `<unk>`=3, `<mask>`={mask_id}); single texts are wrapped as `<s> ... </s>`. Loads with
  `transformers.AutoTokenizer.from_pretrained("demo/tokenizer")`, offline.
"""


def main(argv=None) -> None:
    """Build every demo asset into --out (default: demo/ in the repository)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "demo"), help="output folder (replaced)")
    args = ap.parse_args(argv)
    import music21
    out = Path(args.out)
    for sub in ("abc", "mtf", "midi", "tokenizer"):
        shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    base = corpus_dir()
    rng = random.Random(SEED)

    print("reading ABC collections ...")
    abc = pick(ryans_pieces(base), N_RYANS, rng) + pick(oneills_pieces(base), N_ONEILLS, rng)
    write_abc_pieces(abc, out)

    print("rendering MIDI and MTF ...")
    bach = write_mtf_pieces(bach_pieces(base), N_BACH, base, out, rng)
    aird = write_mtf_pieces(aird_pieces(base), N_AIRD, base, out, rng)
    mtf = bach + aird

    abc_train, abc_eval = split(abc, rng)
    mtf_train, mtf_eval = split(mtf, rng)
    midi = sorted(rng.sample(sorted(mtf_train, key=lambda p: p.id), N_MIDI), key=lambda p: p.id)
    bundle_midi(midi, out)
    midicaps = {p.id for p in midi} | {p.id for p in rng.sample(mtf_eval, N_MIDICAPS_MTF)}

    records = {}
    for name, group in (("abc_train", abc_train), ("abc_eval", abc_eval),
                        ("mtf_train", mtf_train), ("mtf_eval", mtf_eval)):
        records[name] = [midicaps_record(p, rng) if p.id in midicaps
                         else clamp3_record(p, rng) for p in group]
        write_jsonl(out / f"{name}.jsonl", records[name])

    print("training the tokenizer ...")
    build_tokenizer(all_texts([r for rs in records.values() for r in rs]), out / "tokenizer")
    vocab = json.loads((out / "tokenizer" / "tokenizer.json").read_text())
    n_vocab = len(vocab["model"]["vocab"]) + sum(1 for t in vocab["added_tokens"]
                                                 if t["content"] == "<mask>")
    mask_id = [t["id"] for t in vocab["added_tokens"] if t["content"] == "<mask>"][0]

    counts = {"ryans": sum(p.collection == "ryans" for p in abc),
              "oneills": sum(p.collection == "oneills" for p in abc),
              "bach": len(bach), "aird": len(aird)}
    totals = {"seed": SEED, "n_abc": len(abc), "n_mtf": len(mtf), "n_midi": len(midi),
              "abc_train": len(abc_train), "abc_eval": len(abc_eval),
              "mtf_train": len(mtf_train), "mtf_eval": len(mtf_eval),
              "n_midicaps_mtf": N_MIDICAPS_MTF, "eval_pct": round(EVAL_SHARE * 100),
              "max_abc": MAX_ABC_CHARS, "max_patches": MAX_PATCHES, "vocab": n_vocab, "mask_id": mask_id}
    write_provenance(out, counts, totals, music21.__version__)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"done: {counts}, {totals['n_abc']} ABC + {totals['n_mtf']} MTF, vocab {n_vocab}, "
          f"{size / 1e6:.2f} MB in {out}")


if __name__ == "__main__":
    main()
