"""Long synthetic MIDI / MTF pieces for the data-pipeline benchmark (the demo's pieces are short).

    write_long_pieces(folder, count, seed) -> (mtf_jsonl, midi_jsonl)

Each piece is a seeded random multi-track MIDI file (program changes, tempo, several thousand
note on/off events), written both as .mid (converted to MTF on the fly by the data pipeline, as
SPEC §5 allows) and as its .mtf text (clamp3_lora.midi_to_mtf), with a CLaMP 3 schema JSONL file
for each. Pieces give thousands of patches, so training takes a random 512-patch window.
"""
import json
import os
import random
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import mido

from clamp3_lora.mtf import midi_to_mtf


def long_midi(path, rng, tracks=4, notes_per_track=1500):
    """A type-1 MIDI file of `tracks` tracks with `notes_per_track` notes each."""
    song = mido.MidiFile(type=1, ticks_per_beat=480)
    meta = mido.MidiTrack()
    meta.append(mido.MetaMessage("set_tempo", tempo=rng.choice([400000, 500000, 600000]), time=0))
    meta.append(mido.MetaMessage("time_signature", numerator=rng.choice([3, 4]), denominator=4, time=0))
    song.tracks.append(meta)
    for channel in range(tracks):
        track = mido.MidiTrack()
        track.append(mido.Message("program_change", channel=channel, program=rng.randrange(128), time=0))
        for _ in range(notes_per_track):
            note = rng.randrange(36, 96)
            track.append(mido.Message("note_on", channel=channel, note=note, velocity=rng.randrange(40, 120),
                                      time=rng.choice([0, 0, 120, 240])))
            track.append(mido.Message("note_off", channel=channel, note=note, velocity=0,
                                      time=rng.choice([60, 120, 240, 480])))
        song.tracks.append(track)
    song.save(str(path))


def _write_piece(args):
    folder, i, seed, notes_per_track = args
    mid = folder / "mid" / f"long_{i:03d}.mid"
    long_midi(mid, random.Random(seed * 100003 + i), notes_per_track=notes_per_track)
    mtf = folder / "mtf" / f"long_{i:03d}.mtf"
    mtf.write_text(midi_to_mtf(mid), encoding="utf-8")
    return mid.name, mtf.name


def write_long_pieces(folder, count=24, seed=0, notes_per_track=1500, workers=None):
    """Write `count` long pieces into folder (in a process pool); returns (path of the .mtf JSONL,
    path of the .mid JSONL)."""
    folder = Path(folder)
    (folder / "mid").mkdir(parents=True, exist_ok=True)
    (folder / "mtf").mkdir(parents=True, exist_ok=True)
    jobs = [(folder, i, seed, notes_per_track) for i in range(count)]
    with ProcessPoolExecutor(max_workers=workers or min(16, os.cpu_count() or 1)) as pool:
        names = list(pool.map(_write_piece, jobs))
    mtf_records, midi_records = [], []
    for i, (mid, mtf) in enumerate(names):
        text = {"title": f"Synthetic piece {i}", "description": f"A long random piece number {i} "
                f"with {4 * notes_per_track} notes on four instruments.", "tags": ["synthetic", "long"]}
        mtf_records.append({"filepaths": [f"mtf/{mtf}"], **text})
        midi_records.append({"filepaths": [f"mid/{mid}"], **text})
    mtf_jsonl, midi_jsonl = folder / "long_mtf.jsonl", folder / "long_midi.jsonl"
    for path, records in ((mtf_jsonl, mtf_records), (midi_jsonl, midi_records)):
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return mtf_jsonl, midi_jsonl
