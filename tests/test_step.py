"""One training step in one place: the trainer, the preflight's dry step and the benchmark all run
clamp3_lora.step.Step, and the step's guards and update behave as the trainer relies on."""
import importlib.util
import io
import math

import torch

from clamp3_lora import preflight, train
from clamp3_lora.cli import parse_config
from clamp3_lora.data import Collator, MusicTextDataset, scan_data_file
from clamp3_lora.faults import Faults
from clamp3_lora.model import load_model
from clamp3_lora.precision import grad_scaler
from clamp3_lora.step import Step
from trainer_fixtures import ROOT, make_workspace, trainer_args

CPU = torch.device("cpu")


def tiny(tokenizer):
    torch.manual_seed(0)
    model = load_model(None, preset="tiny", text_model=tokenizer)
    model.add_adapter()
    return model


def a_batch(model, data, size=4):
    scan = scan_data_file(data, max_patches=24)
    dataset = MusicTextDataset(scan.records, model.tokenizer, train=True, max_patches=24, max_text_tokens=24)
    return Collator(model.tokenizer.pad_token_id)([dataset[(i, i)] for i in range(size)])


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_train_step", ROOT / "bench" / "train_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_trainer_preflight_and_benchmark_run_the_same_step_object(tmp_path, monkeypatch):
    seen = []
    run = Step.run

    def counted(self, *args, **kwargs):
        seen.append(self)
        return run(self, *args, **kwargs)
    monkeypatch.setattr(Step, "run", counted)
    workspace = make_workspace(tmp_path)

    cfg = parse_config(trainer_args(workspace, tmp_path / "out", epochs=1, checkpoints_per_epoch=0))
    assert train.main(cfg, argv=[]) == 0
    trainer_batches = len(seen)
    assert trainer_batches == 4            # 16 records, batch 4, one epoch: every batch through Step.run

    model = tiny(workspace["tokenizer"])
    records = scan_data_file(workspace["abc_train"], max_patches=24).records
    report = preflight.Report(out=io.StringIO(), colour=False)
    preflight.dry_step(report, "dry step", cfg, model, records, CPU, 4, fallback=False)
    assert report.counts["ok"] == 1 and len(seen) == trainer_batches + 1

    bench = load_bench()
    step = bench.real_step(tiny(workspace["tokenizer"]), CPU, precision="fp32")
    loss = step(a_batch(model, workspace["abc_train"]))
    assert math.isfinite(loss) and len(seen) == trainer_batches + 2
    assert all(isinstance(s, Step) for s in seen)


def step_of(model, faults=None, window_scaler=None):
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    return Step(model, optimizer, None, window_scaler or grad_scaler(CPU, "fp32"), "fp32", 1.0, CPU,
                faults=faults)


def lora(model):
    return [p.detach().clone() for p in model.trainable_parameters()]


def test_step_updates_and_its_guards_skip(tmp_path):
    workspace = make_workspace(tmp_path)
    model = tiny(workspace["tokenizer"])
    batch = a_batch(model, workspace["abc_train"])
    model.train()

    before = lora(model)
    result = step_of(model).run(batch)
    assert result.updated and result.skip is None and math.isfinite(result.loss) and result.grad_norm > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, lora(model)))

    for kind, skip in (("nan", "nonfinite_loss"), ("oom", "oom"), ("oomback", "oom")):
        before = lora(model)
        result = step_of(model, Faults.parse(f"{kind}@7")).run(batch, fault_step=7)
        assert result.skip == skip and result.loss is None and not result.updated, kind
        assert all(torch.equal(a, b) for a, b in zip(before, lora(model))), kind
        assert all(p.grad is None for p in model.trainable_parameters()), kind

    before = lora(model)
    result = step_of(model, Faults.parse("nangrad@3")).run(batch, fault_step=3)
    assert result.skip is None and result.skip_window == "nonfinite_grad" and result.window_batches == 1
    assert not result.updated and all(torch.equal(a, b) for a, b in zip(before, lora(model)))


def test_accumulated_window_equals_one_big_batch_step(tmp_path):
    """Two half batches accumulated in one window of 2: one update, whose gradient (its norm, read
    before clipping) is the sum of the halves' gradients of loss / 2, each computed apart."""
    workspace = make_workspace(tmp_path)
    model = tiny(workspace["tokenizer"])
    model.eval()                                  # no dropout: both runs see the same function
    batch = a_batch(model, workspace["abc_train"], size=4)
    halves = [{k: v[i:i + 2] if k not in ("patch_index", "patch_cu", "text_index", "text_cu") else None
               for k, v in batch.items()} for i in (0, 2)]
    halves = [{k: v for k, v in half.items() if v is not None} for half in halves]
    start = lora(model)

    accumulated = step_of(model)
    first = accumulated.run(halves[0], window=2, last=False)
    second = accumulated.run(halves[1], window=2, last=True)
    assert not first.updated and second.updated and second.window_losses == [first.loss, second.loss]
    after_window = lora(model)

    with torch.no_grad():
        for param, value in zip(model.trainable_parameters(), start):
            param.copy_(value)
    separate = step_of(model)
    grads = []
    for half in halves:                           # each half's gradient of loss / 2, apart
        separate.run(half, window=2, last=False)
        grads.append([p.grad.clone() for p in model.trainable_parameters()])
        separate._drop_window()
    summed = [a + b for a, b in zip(*grads)]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in summed]))
    assert abs(norm.item() - second.grad_norm) < 1e-5 * max(1.0, norm.item())
    assert any(not torch.equal(a, b) for a, b in zip(start, after_window))
