"""Training learns: LoRA steps make retrieval better, and leave the base model untouched.

The rest of the suite checks that every step computes what it should; these tests check that the
steps add up to a better adapter. Each names the breakage it catches; each was checked by making
that breakage once (the test then failed).
"""
import json
import random

import pytest
import torch

from clamp3_lora import load_model
from clamp3_lora.data import Collator, MusicTextDataset, SequentialKeys, make_loader, scan_data_file
from clamp3_lora.metrics import chance_metrics, retrieval_metrics
from clamp3_lora.precision import grad_scaler
from clamp3_lora.step import Step
from trainer_fixtures import ROOT, abc_tune, caption, make_tokenizer, read_history, run_trainer

DEMO = ROOT / "demo"
DEMO_BASE = DEMO / "base" / "clamp3_demo_base.pth"
PAIRS = 16


def small_set(folder):
    """PAIRS synthetic ABC tunes, each with one text field, so the training text of a pair is its
    evaluation text (nothing random between what is learned and what is scored)."""
    rng = random.Random(5)
    lines = []
    for i in range(PAIRS):
        (folder / f"{i}.abc").write_text(abc_tune(rng, i))
        lines.append(json.dumps({"filepaths": [f"{i}.abc"], "analysis": caption(rng)}))
    data = folder / "pairs.jsonl"
    data.write_text("\n".join(lines) + "\n")
    return data


def features(model, dataset):
    """(text, music) features of every pair of `dataset`, in order."""
    model.eval()
    loader = make_loader(dataset, SequentialKeys(len(dataset)), PAIRS, pin_memory=False)
    with torch.no_grad():
        batch = next(iter(loader))
        return (model.text_features(batch["text_ids"], batch["text_mask"]),
                model.music_features(batch["patches"], batch["patch_mask"]))


def test_lora_steps_take_train_pairs_from_chance_to_near_perfect(tmp_path):
    """150 LoRA-only steps of the trainer's Step (lr 1e-2, clipping at 1.0 as the trainer's default)
    on 16 fixed pairs, from a random tiny model: text->music MRR from about chance (0.21 for 16
    pairs) to >= 0.8 on those pairs; every base weight unchanged bit for bit. Measured with seeds
    0-5: 1.0, 1.0, 0.97, 0.83, 1.0, 0.94 (seed 0 is the test's); lr 3e-2 without clipping, this
    test's earlier setting, swung between 0.3 and 0.76 with the seed, so it depended on the RNG.

    Catches: gradients that do not reach the LoRA weights (e.g. the music features detached, or
    LoRA weights left frozen), a Step whose optimizer never steps, a loss that does not pull pairs
    together (e.g. wrong targets in clip_loss), and any update leaking into the frozen base.
    Checked once each by breaking it: Step._update without optimizer.step, and clip_loss with
    its targets reversed, both fail here."""
    torch.manual_seed(0)
    model = load_model(None, preset="tiny", text_model=make_tokenizer(tmp_path / "tokenizer"))
    scan = scan_data_file(small_set(tmp_path), max_patches=32)
    train_set = MusicTextDataset(scan.records, model.tokenizer, train=True, max_patches=32, max_text_tokens=32,
                                 instrument_removal_prob=0.0)
    eval_set = MusicTextDataset(scan.records, model.tokenizer, train=False, max_patches=32, max_text_tokens=32)
    before = retrieval_metrics(*features(model, eval_set))["t2m_mrr"]
    base = {name: value.clone() for name, value in model.state_dict().items()}

    model.add_adapter(r=4, alpha=8, dropout=0.0)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    step = Step(model, optimizer, None, grad_scaler("cpu", "fp32"), "fp32", 1.0, "cpu")   # the trainer's step
    collate = Collator(model.tokenizer.pad_token_id)
    for n in range(150):
        model.train()
        result = step.run(collate([train_set[(i, n * PAIRS + i)] for i in range(PAIRS)]))
        assert result.updated
    after = retrieval_metrics(*features(model, eval_set))["t2m_mrr"]

    chance = chance_metrics(PAIRS)["t2m_mrr"]
    assert before < 2 * chance, f"the random model already retrieves (MRR {before:.3f}, chance {chance:.3f})"
    assert after >= 0.8, f"text->music MRR {after:.3f} after 150 LoRA steps (before {before:.3f})"
    adapted = model.symbolic_model.base.get_base_model().state_dict()
    for name, value in base.items():
        if name.startswith("symbolic_model.base."):
            inner = name[len("symbolic_model.base."):]
            key = inner if inner in adapted else inner.replace(".weight", ".base_layer.weight").replace(
                ".bias", ".base_layer.bias")
            assert torch.equal(adapted[key], value), f"base weight {name} changed"
        else:
            assert torch.equal(model.state_dict()[name], value), f"base weight {name} changed"


@pytest.mark.skipif(not DEMO_BASE.is_file(), reason="demo/base/ not present")
def test_demo_training_beats_the_demo_base_on_held_out_pairs(tmp_path):
    """The real trainer, the pretrained demo base and the demo's ABC data, 8 epochs at a fixed seed:
    the best adapter's text->music MRR on the held-out eval pairs is above the base's (epoch 0 of
    the history) by a clear margin.

    Catches: texts paired with the wrong pieces in training (nothing then generalises to the
    held-out pairs), an optimizer or schedule that never steps (lr 0), gradients that never reach
    the adapter, and a best adapter chosen from the wrong epoch. Measured (2 CPU cores, 78 held-out
    pairs): base 0.195, best 0.275 (1.41x); checked once each by breaking it: each training text
    taken from the next record gives 0.217 (1.11x), Step._update without optimizer.step the base's
    0.195 (1.0x); both fail here."""
    result = run_trainer(["--demo", "--device", "cpu", "--stages", "abc", "--epochs", "8",
                          "--checkpoints-per-epoch", "0", "--best-metric", "t2m_mrr",
                          "--output-dir", tmp_path / "out"], timeout=240)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    history = read_history(tmp_path / "out")
    base, trained = history[0], history[1:]
    assert base["epoch"] == 0 and base["train_loss"] is None
    best = max(entry["metrics"]["t2m_mrr"] for entry in trained)
    assert best >= 1.3 * base["metrics"]["t2m_mrr"], (base["metrics"]["t2m_mrr"], best)
    assert f"ABC adapter: text→music MRR {best:.2f} (base {base['metrics']['t2m_mrr']:.2f}" in result.stdout
    record = json.loads((tmp_path / "out" / "adapters" / "lora_abc_adapter" / "training_record.json").read_text())
    assert record["metrics"]["t2m_mrr"] == best


@pytest.mark.skipif(not DEMO_BASE.is_file(), reason="demo/base/ not present")
def test_a_missing_or_truncated_demo_base_is_a_clear_error(tmp_path):
    """The demo base goes through the official-checkpoint path: a truncated file gets that path's
    clear error (exit 1, no traceback), a missing one a message that says how to get it back."""
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(DEMO_BASE.read_bytes()[:100_000])
    for weights, expected in ((truncated, f"cannot read checkpoint {truncated}"),
                              (tmp_path / "gone.pth", "the demo's base checkpoint is missing")):
        result = run_trainer(["--demo", "--device", "cpu", "--weights", weights, "--output-dir", tmp_path / "out"],
                             timeout=120)
        assert result.returncode == 1, result.stdout[-1000:] + result.stderr[-1000:]
        assert expected in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]
