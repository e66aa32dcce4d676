"""Students derived from their teachers: layer choice, weight copying, slicing, config round trip, vocabularies."""

import json

import pytest
import torch
import transformers

import tiny
from compress.config import StudentConfig
from compress.distill.students import (check_vocabularies, derive_student, evenly_spaced, read_token_map,
                                       uniform_layer_map)
from compress.errors import CompressError
from compress.models import find_blocks, load


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """deep(arch, kind) -> a 4-layer tiny model folder."""
    root = tmp_path_factory.mktemp("deep")
    made = {}

    def make(arch, kind=None):
        if (arch, kind) not in made:
            made[arch, kind] = tiny.build(arch, root / f"{arch}-{kind}", kind, layers=4)
        return made[arch, kind]

    return make


def test_evenly_spaced_matches_distilbert():
    assert evenly_spaced(12, 6) == [0, 2, 4, 7, 9, 11]  # DistilBERT's initialisation
    assert evenly_spaced(6, 3) == [0, 3, 5]
    assert evenly_spaced(6, 6) == list(range(6))
    assert evenly_spaced(4, 1) == [0]
    with pytest.raises(CompressError, match="cannot keep 7 of 6"):
        evenly_spaced(6, 7)
    assert uniform_layer_map(3, 6) == [[0, 0], [1, 2], [2, 4], [3, 6]]


@pytest.mark.parametrize("arch,kind", [("bert", "classifier"), ("llama", None), ("gpt2", None)])
def test_kept_blocks_are_copied_from_the_teacher(deep, arch, kind):
    teacher = load(deep(arch, kind)).model
    derived = derive_student(teacher, StudentConfig(layer_indices=[1, 3]))
    student = derived.model
    assert derived.kept == [1, 3] and derived.layer_map == [[0, 0], [1, 2], [2, 4]]
    assert student.config.num_hidden_layers == 2 and type(student) is type(teacher)
    t_blocks, s_blocks = find_blocks(teacher)[1], find_blocks(student)[1]
    for i, k in enumerate(derived.kept):
        for (name, p), (_, q) in zip(s_blocks[i].named_parameters(), t_blocks[k].named_parameters()):
            assert torch.equal(p, q), name
    t_state = teacher.state_dict()
    block_prefix = find_blocks(teacher)[0] + "."
    for name, tensor in student.state_dict().items():
        if not name.startswith(block_prefix):
            assert torch.equal(tensor, t_state[name]), name  # embeddings, final norm, heads
    assert student.training


def test_keeping_every_layer_reproduces_the_teacher(deep):
    loaded = load(deep("llama"))
    student = derive_student(loaded.model, StudentConfig(layers=4)).model.eval()
    ids = torch.randint(3, 100, (2, 9))
    with torch.no_grad():
        assert torch.allclose(student(input_ids=ids).logits, loaded.model(input_ids=ids).logits, atol=1e-5)


@pytest.mark.parametrize("arch,kind,hidden,inter", [("bert", "masked", 32, 40), ("llama", None, 32, 48),
                                                    ("gpt2", None, 48, 40), ("qwen2", None, 32, 40)])
def test_narrow_student_round_trips_with_stock_transformers(deep, tmp_path, arch, kind, hidden, inter):
    teacher = load(deep(arch, kind)).model
    derived = derive_student(teacher, StudentConfig(layers=2, hidden_size=hidden, intermediate_size=inter))
    student = derived.model.eval()
    cfg = student.config
    assert cfg.hidden_size == hidden and cfg.num_hidden_layers == 2
    head_dim = teacher.config.hidden_size // teacher.config.num_attention_heads
    assert cfg.num_attention_heads == hidden // head_dim  # whole heads are kept
    # narrowed tensors are the leading slices of the teacher's (the first heads, the first units)
    t_state = teacher.state_dict()
    block_prefix = find_blocks(teacher)[0]
    for name, tensor in student.state_dict().items():
        source = name.replace(f"{block_prefix}.1.", f"{block_prefix}.3.") if f"{block_prefix}.1." in name else name
        if source in t_state:
            expected = t_state[source][tuple(slice(0, s) for s in tensor.shape)]
            assert torch.equal(tensor, expected), name
    student.save_pretrained(tmp_path / "s")
    auto = transformers.AutoModelForMaskedLM if kind == "masked" else transformers.AutoModelForCausalLM
    reloaded, info = auto.from_pretrained(str(tmp_path / "s"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids = torch.randint(5, 100, (2, 7))
    with torch.no_grad():
        assert torch.allclose(reloaded.eval()(input_ids=ids).logits, student(input_ids=ids).logits, atol=1e-5)
    saved = json.loads((tmp_path / "s" / "config.json").read_text())
    assert saved["architectures"] == [type(teacher).__name__]


def test_per_layer_config_lists_follow_the_kept_layers(deep):
    teacher = load(deep("qwen2")).model
    teacher.config.layer_types = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    try:
        student = derive_student(teacher, StudentConfig(layer_indices=[0, 1])).model
        assert student.config.layer_types == ["full_attention", "sliding_attention"]
    finally:
        teacher.config.layer_types = ["full_attention"] * 4


@pytest.mark.parametrize("spec,match", [
    (StudentConfig(layer_indices=[0, 4]), "out of range"),
    (StudentConfig(layers=9), "cannot keep 9 of 4"),
    (StudentConfig(layers=2, hidden_size=128), "wider than its teacher"),
    (StudentConfig(layers=2, hidden_size=40), "multiple of the teacher's head size 16"),
    (StudentConfig(layers=2, intermediate_size=200), "wider than its teacher"),
])
def test_impossible_students_are_refused(deep, spec, match):
    with pytest.raises(CompressError, match=match):
        derive_student(load(deep("bert", "masked")).model, spec)


@pytest.mark.parametrize("kwargs,match", [
    (dict(layers=2, layer_indices=[0, 1]), "either"),
    (dict(layer_indices=[2, 1]), "strictly increasing"),
    (dict(layers=0), "at least 1"),
])
def test_student_config_validation(kwargs, match):
    with pytest.raises(CompressError, match=match):
        StudentConfig(**kwargs)


def test_quantized_teacher_is_refused(tiny_model, tmp_path):
    from compress import RTNConfig, quantize

    quantize(tiny_model("llama"), tmp_path / "q", RTNConfig(bits=4, group_size=32), progress=False)
    with pytest.raises(CompressError, match="quantized teacher"):
        derive_student(load(tmp_path / "q").model, StudentConfig(layers=1))


def _other_tokenizer(path):
    """A WordPiece tokenizer trained on the same text with a smaller vocabulary: different ids."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[UNK]", "[PAD]", "[MASK]", "[CLS]", "[SEP]"]
    tok.train_from_iterator(tiny._TEXT, trainers.WordPieceTrainer(vocab_size=150, special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 3), ("[SEP]", 4)])
    tok.decoder = decoders.WordPiece()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")
    fast.save_pretrained(str(path))
    return fast


def test_different_vocabularies_need_a_map(tiny_model, tmp_path):
    teacher_tok = load(tiny_model("bert")).tokenizer
    assert check_vocabularies(teacher_tok, teacher_tok, None, "mlm") is None
    student_tok = _other_tokenizer(tmp_path / "tok")
    with pytest.raises(CompressError, match="vocabulary .* differs .* --vocab-map"):
        check_vocabularies(student_tok, teacher_tok, None, "mlm")
    shared = sorted(set(student_tok.get_vocab()) & set(teacher_tok.get_vocab()))
    (tmp_path / "map.json").write_text(json.dumps({t: t for t in shared}))
    tmap = check_vocabularies(student_tok, teacher_tok, str(tmp_path / "map.json"), "mlm")
    sv, tv = student_tok.get_vocab(), teacher_tok.get_vocab()
    assert len(tmap.student_ids) == len(shared)
    for token in ("[MASK]", "[CLS]", "the"):
        assert int(tmap.lookup[sv[token]]) == tv[token]
    (tmp_path / "bad.json").write_text(json.dumps({"no-such-token": "the"}))
    with pytest.raises(CompressError, match="not a student token"):
        read_token_map(tmp_path / "bad.json", student_tok, teacher_tok)
