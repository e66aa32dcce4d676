"""The distillation trainer on tiny models: it learns from the teacher, keeps it frozen, resumes exactly,
runs every task, and accepts students that are not transformers models."""

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import TrainerCallback

import tiny
from compress.config import DistillConfig, StudentConfig
from compress.distill.data import classification_data, embedding_data, lm_data
from compress.distill.students import derive_student
from compress.distill.trainer import distill, load_student_state
from compress.errors import CompressError
from compress.models import load

WORDS = ["quick fox", "model folder", "weights scale", "tokenizer merges", "calibration data", "integer codes"]


@pytest.fixture(scope="module")
def labeled(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.csv"
    rows = ["text,label"] + [f"{WORDS[i % 6]} {WORDS[(i * 5) % 6]} number {i},{['neg', 'neu', 'pos'][i % 3]}"
                             for i in range(96)]
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, labeled):
    """A tiny BERT classifier trained on the labels for a few steps, so its outputs are confident and vary."""
    root = tmp_path_factory.mktemp("t")
    folder = tiny.build("bert", root / "random", "classifier", layers=2)
    model = load(folder)
    cfg = _cfg(alpha=0.0, steps=40, learning_rate=3e-3)
    result = distill(None, model.model.train(), _data(model, labeled), cfg, output_dir=root / "ck", device="cpu",
                     progress=False, tokenizer=model.tokenizer)
    result.save(root / "teacher")
    return root / "teacher"


def _data(teacher, labeled, max_length=24):
    return classification_data(teacher.tokenizer, str(labeled), teacher.config.label2id, teacher.config.num_labels, max_length)


def _cfg(task="classify", **kwargs):
    """A DistillConfig for tests: small batches, no per-epoch evaluation, few logs and checkpoints."""
    return DistillConfig(task=task, **{**dict(batch_size=8, logging_steps=100, save_steps=1000, evaluate=False), **kwargs})


@torch.no_grad()
def _kl_to_teacher(teacher, student, data):
    batch = data.collator([data.train[i] for i in range(len(data.train))])
    feed = {k: v for k, v in batch.items() if k != "labels"}
    t = torch.log_softmax(teacher(**feed).logits, -1)
    student.eval()
    s = torch.log_softmax(student(**feed).logits, -1)
    student.train()
    return float((t.exp() * (t - s)).sum(-1).mean())


def test_student_learns_the_teachers_distribution_and_the_teacher_stays_frozen(teacher_dir, labeled, tmp_path):
    teacher = load(teacher_dir)
    before = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    data = _data(teacher, labeled)
    derived = derive_student(teacher.model, StudentConfig(layers=1))
    start = _kl_to_teacher(teacher.model, derived.model, data)
    cfg = _cfg(alpha=1.0, temperature=2.0, steps=30, learning_rate=1e-3, warmup_ratio=0.0, logging_steps=10)
    result = distill(teacher, derived, data, cfg, output_dir=tmp_path / "ck", device="cpu", progress=False)
    end = _kl_to_teacher(teacher.model, result.student, data)
    assert end < 0.5 * start, (start, end)
    assert not teacher.model.training and not any(p.requires_grad for p in teacher.model.parameters())
    assert all(torch.equal(v, teacher.model.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in teacher.model.parameters())
    logged = [e for e in result.trainer.state.log_history if "loss_soft" in e]
    assert logged and "loss_hard" not in logged[0]  # alpha 1: the soft term alone


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def test_resume_continues_exactly_where_an_interrupted_run_stopped(teacher_dir, labeled, tmp_path):
    teacher = load(teacher_dir)
    data = _data(teacher, labeled)
    spec = StudentConfig(layers=1, hidden_size=32, intermediate_size=40)  # narrow: projections are trained and saved
    cfg = _cfg(steps=6, save_steps=3, hidden_weight=1.0, learning_rate=1e-3)
    whole = distill(teacher, derive_student(teacher.model, spec), data, cfg, output_dir=tmp_path / "a", device="cpu",
                    progress=False)
    distill(teacher, derive_student(teacher.model, spec), data, cfg, output_dir=tmp_path / "b", device="cpu",
            progress=False, callbacks=[StopAt(3)])
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["checkpoint-3"]
    assert (tmp_path / "b" / "checkpoint-3" / "distill_heads.safetensors").is_file()
    resumed = distill(teacher, derive_student(teacher.model, spec), data, cfg, output_dir=tmp_path / "b", device="cpu",
                      progress=False, resume=True)
    assert resumed.trainer.state.global_step == 6
    a, b = whole.student.state_dict(), resumed.student.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    heads_a = whole.trainer.model.heads.state_dict()
    heads_b = resumed.trainer.model.heads.state_dict()
    assert heads_a and all(torch.allclose(heads_a[k], heads_b[k], atol=1e-6) for k in heads_a)
    # a fresh student that had not resumed would differ: the comparison above is not vacuous
    fresh = derive_student(teacher.model, spec).model.state_dict()
    assert not all(torch.allclose(a[k], fresh[k], atol=1e-6) for k in a)
    # the checkpoint's student is a model folder of its own
    loaded = load(tmp_path / "b" / "checkpoint-6")
    assert loaded.kind == "classifier" and loaded.config.hidden_size == 32


def test_resume_without_a_checkpoint_is_a_clear_error(teacher_dir, labeled, tmp_path):
    teacher = load(teacher_dir)
    cfg = _cfg(steps=1)
    with pytest.raises(CompressError, match="no checkpoint to resume"):
        distill(teacher, derive_student(teacher.model, StudentConfig(layers=1)), _data(teacher, labeled), cfg,
                output_dir=tmp_path / "none", resume=True, device="cpu", progress=False)


@pytest.mark.parametrize("arch,kind,task", [("bert", "masked", "mlm"), ("llama", None, "causal"),
                                            ("gpt2", None, "causal"), ("bert", "embedding", "embed")])
def test_every_task_trains_and_saves_a_loadable_student(tmp_path, arch, kind, task):
    folder = tiny.build(arch, tmp_path / "teacher", kind, layers=2)
    teacher = load(folder)
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(tiny._TEXT[:40]))
    data = (embedding_data(teacher.tokenizer, str(text), 32) if task == "embed"
            else lm_data(task, teacher.tokenizer, str(text), 32))
    attn = 1.0 if arch == "bert" else 0.0
    cfg = _cfg(task, steps=3, hidden_weight=1.0, attn_weight=attn, cosine_weight=1.0, batch_size=4, logging_steps=1)
    derived = derive_student(teacher.model, StudentConfig(layers=1, hidden_size=32, intermediate_size=40))
    result = distill(teacher, derived, data, cfg, output_dir=tmp_path / "ck", device="cpu", progress=False)
    terms = {k for e in result.trainer.state.log_history for k in e if k.startswith("loss_")}
    assert {"loss_soft", "loss_hard", "loss_hidden", "loss_cos"} <= terms
    assert ("loss_attn" in terms) == bool(attn)
    assert result.trainer.state.log_history[-1]["train_loss"] == pytest.approx(result.metrics["train_loss"])
    assert getattr(result.student.config, "_attn_implementation", "sdpa") != "eager" or arch == "gpt2"
    result.save(tmp_path / "out")
    reloaded = load(tmp_path / "out", kind=teacher.kind)
    assert reloaded.config.num_hidden_layers == 1 and reloaded.config.hidden_size == 32


class BagOfWords(nn.Module):
    """A student that is not a transformers model: mean of token embeddings, then a linear layer."""

    def __init__(self, vocab, width, classes):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.out = nn.Linear(width, classes)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, output_hidden_states=False):
        mask = attention_mask.unsqueeze(-1).float() if attention_mask is not None else torch.ones(*input_ids.shape, 1)
        h = self.embed(input_ids)
        pooled = (h * mask).sum(1) / mask.sum(1).clamp(min=1)
        return SimpleNamespace(logits=self.out(pooled), hidden_states=(h,) if output_hidden_states else None)


def test_any_module_can_be_the_student(teacher_dir, labeled, tmp_path):
    teacher = load(teacher_dir)
    data = _data(teacher, labeled)
    torch.manual_seed(0)
    student = BagOfWords(teacher.config.vocab_size, 16, teacher.config.num_labels)
    start = _kl_to_teacher(teacher.model, student, data)
    cfg = _cfg(alpha=0.7, steps=20, learning_rate=1e-2, save_steps=10)
    result = distill(teacher, student, data, cfg, output_dir=tmp_path / "ck", device="cpu", progress=False)
    assert _kl_to_teacher(teacher.model, result.student, data) < start
    assert (tmp_path / "ck" / "checkpoint-20" / "student.safetensors").is_file()
    copy = BagOfWords(teacher.config.vocab_size, 16, teacher.config.num_labels)
    load_student_state(copy, tmp_path / "ck" / "checkpoint-20")
    assert all(torch.equal(p, q) for p, q in zip(copy.state_dict().values(), result.student.state_dict().values()))


def test_hard_labels_alone_need_no_teacher(teacher_dir, labeled, tmp_path):
    teacher = load(teacher_dir)
    data = _data(teacher, labeled)
    cfg = _cfg(alpha=0.0, steps=2)
    assert not cfg.needs_teacher
    result = distill(None, derive_student(teacher.model, StudentConfig(layers=1)), data, cfg, output_dir=tmp_path / "ck",
                     device="cpu", progress=False, tokenizer=teacher.tokenizer)
    assert result.trainer.teacher is None
    with pytest.raises(CompressError, match="needs a teacher"):
        distill(None, derive_student(teacher.model, StudentConfig(layers=1)), data, dataclasses.replace(cfg, alpha=0.5),
                output_dir=tmp_path / "ck2", device="cpu", progress=False)


def test_layer_map_out_of_range_is_refused(teacher_dir, labeled, tmp_path):
    teacher = load(teacher_dir)
    cfg = _cfg(steps=1, hidden_weight=1.0, layer_map=[[0, 0], [5, 1]])
    with pytest.raises(CompressError, match=r"layer map pair \[5, 1\] is out of range"):
        distill(teacher, derive_student(teacher.model, StudentConfig(layers=1)), _data(teacher, labeled), cfg,
                output_dir=tmp_path / "ck", device="cpu", progress=False)


def test_objective_is_the_documented_sum(teacher_dir, labeled):
    """alpha * soft + (1 - alpha) * hard + hidden_weight * hidden, with unlabeled rows in the soft term only."""
    from compress.distill import losses
    from compress.distill.objective import DistillationModel, Widths

    teacher = load(teacher_dir)
    data = _data(teacher, labeled)
    batch = data.collator([data.train[i] for i in range(4)])
    batch["labels"][1] = -100  # an unlabeled (transfer) example
    student = derive_student(teacher.model, StudentConfig(layers=1)).model.eval()
    cfg = _cfg(alpha=0.3, temperature=3.0, hidden_weight=0.5)
    widths = Widths([64, 64], [64, 64, 64], 3, 3)
    model = DistillationModel(student, cfg, widths, layer_map=[[0, 0], [1, 2]])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        t_out = teacher.model(**inputs, output_hidden_states=True)
        out = model(**batch, teacher={"logits": t_out.logits, "hidden_states": t_out.hidden_states})
        s_out = student(**inputs, output_hidden_states=True)
    soft = losses.soft_target_loss(s_out.logits, t_out.logits, 3.0)
    kept = batch["labels"] != -100
    hard = torch.nn.functional.cross_entropy(s_out.logits[kept], batch["labels"][kept])
    hidden = losses.hidden_state_loss(s_out.hidden_states, t_out.hidden_states, [[0, 0], [1, 2]], inputs["attention_mask"])
    assert torch.allclose(out["loss"], 0.3 * soft + 0.7 * hard + 0.5 * hidden, atol=1e-5)
    assert set(model.last_parts) == {"soft", "hard", "hidden"}
