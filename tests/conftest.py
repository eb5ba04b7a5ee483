"""Shared fixtures: a tiny randomly initialised BERT (and RoBERTa) built from a config, no network."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizerFast, RobertaConfig, RobertaModel

WORDS = (
    "a an the man woman dog cat child children people group is are was were playing plays play running runs "
    "eating eats guitar piano ball park street beach water food outside inside sitting standing walking "
    "two three young old red blue green big small on in at with of and to near by riding bike horse car "
    "soccer music sleeping talking reading book table kitchen men women boy girl sun rain snow"
).split()
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def word_tokenizer(vocab: list[str]) -> BertTokenizerFast:
    """A WordPiece tokenizer over ``vocab``. Built from the dict: transformers 5 ignores ``vocab_file=`` here
    (every word would become [UNK])."""
    return BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)


def write_tiny_bert(directory: Path, layers: int = 2, hidden: int = 32, heads: int = 4, seed: int = 0) -> Path:
    """Save a tiny random BERT + word-level WordPiece tokenizer to ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab = SPECIALS + WORDS + [".", ",", "'", "!", "?"]
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tokenizer = word_tokenizer(vocab)
    tokenizer.save_pretrained(str(directory))
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=hidden * 2, max_position_embeddings=64, pad_token_id=0,
    )
    BertModel(config, add_pooling_layer=False).save_pretrained(str(directory))
    return directory


def write_tiny_roberta(directory: Path, bert_dir: Path) -> Path:
    """A tiny random RoBERTa sharing the BERT tokenizer files (enough for shape/position tests)."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(1)
    config = RobertaConfig(
        vocab_size=80, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=66, pad_token_id=1, type_vocab_size=1,
    )
    RobertaModel(config, add_pooling_layer=False).save_pretrained(str(directory))
    vocab = (bert_dir / "vocab.txt").read_text(encoding="utf-8").split()
    word_tokenizer(vocab).save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory of a tiny random BERT."""
    return write_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def tiny_roberta(tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path) -> Path:
    """Directory of a tiny random RoBERTa."""
    return write_tiny_roberta(tmp_path_factory.mktemp("tiny_roberta"), tiny_bert)


def make_prompt_checkpoint(
    backbone_dir: str | Path,
    out: Path,
    *,
    pooler: str = "avg",
    head: str = "none",
    length: int = 4,
    projection: bool = False,
    projection_hidden: int = 16,
    shift_positions: bool = True,
    mode: str = "prompt",
    std: float = 1.0,
    seed: int = 1,
    extra: dict | None = None,
) -> Path:
    """Save a checkpoint over ``backbone_dir`` with a large random prompt and head; return its directory.

    Every prompt and head tensor is redrawn (seeded by ``seed``), so that a test comparing two code paths
    sees all of them: the prefix table ``embedding.weight`` ~ N(0, std); each ``nn.Linear`` of the prompt's
    projection MLP ~ N(0, std / sqrt(fan_in)) (weights and bias, so the prefix stays of order ``std``);
    the MLP head's weights and bias ~ N(0, 1 / sqrt(hidden)) (an order-one, non-saturated tanh input).
    ``length=0`` builds no prompt (e.g. with ``mode="full"``). The backbone is recorded as the path
    string given (not resolved). ``extra`` is merged into the checkpoint's ``config.json``.
    """
    from promcse.encoder.backbone import load_backbone, shape_of
    from promcse.models.checkpoint import save_checkpoint
    from promcse.encoder.model import EncoderSpec, build_encoder
    from promcse.encoder.prompt import PromptSpec

    backbone, tokenizer = load_backbone(str(backbone_dir))
    shape = shape_of(backbone.config)
    prompt = None
    if length > 0:
        prompt = PromptSpec.for_backbone(shape, length, projection=projection, projection_hidden=projection_hidden,
                                         shift_positions=shift_positions)
    spec = EncoderSpec(str(backbone_dir), shape, mode=mode, prompt=prompt, pooler=pooler, head=head)
    torch.manual_seed(seed)
    encoder = build_encoder(spec, backbone, tokenizer)
    with torch.no_grad():
        if encoder.prompt is not None:
            encoder.prompt.embedding.weight.normal_(0.0, std)
            for module in encoder.prompt.modules():
                if isinstance(module, torch.nn.Linear):
                    scale = std / module.in_features ** 0.5
                    module.weight.normal_(0.0, scale)
                    module.bias.normal_(0.0, scale)
        if encoder.head is not None:
            for tensor in encoder.head.parameters():
                tensor.normal_(0.0, 1.0 / shape.hidden_size ** 0.5)
    return save_checkpoint(encoder, out, extra)


def make_sentences(n: int, seed: int = 0) -> list[str]:
    """Distinct-ish random sentences from the tiny vocabulary."""
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) for _ in range(n)]


@pytest.fixture
def tiny_data(tmp_path: Path) -> dict[str, Path]:
    """Tiny training files (txt, csv triplets) and an eval dir with STS-B dev/test."""
    sents = make_sentences(60)
    txt = tmp_path / "train.txt"
    txt.write_text("\n".join(sents) + "\n", encoding="utf-8")
    csv = tmp_path / "triplets.csv"
    rows = ["sent0,sent1,hard_neg"] + [f"{sents[i]},{sents[i][::-1] if False else sents[(i + 1) % 60]},{sents[(i + 7) % 60]}" for i in range(60)]
    csv.write_text("\n".join(rows) + "\n", encoding="utf-8")
    data_dir = tmp_path / "eval"
    stsb = data_dir / "tsv" / "original" / "STSBenchmark"
    stsb.mkdir(parents=True)
    import random

    rng = random.Random(3)
    for split in ("dev", "test"):
        lines = ["sentence1\tsentence2\tscore"]
        lines += [f"{sents[i]}\t{sents[(i * 7 + 3) % 60]}\t{rng.uniform(0, 5):.2f}" for i in range(40)]
        (stsb / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"txt": txt, "csv": csv, "data_dir": data_dir}


# Tiny random encoders of every family in promcse.encoder.backbone.FAMILIES (model_type -> config factory).
def _family_configs() -> dict[str, object]:
    from transformers import (CamembertConfig, DistilBertConfig, ElectraConfig, MPNetConfig, XLMRobertaConfig)

    common = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}
    roberta_like = {**common, "max_position_embeddings": 66, "pad_token_id": 1, "type_vocab_size": 1}
    return {
        "bert": lambda v: BertConfig(vocab_size=v, max_position_embeddings=64, pad_token_id=0, **common),
        "electra": lambda v: ElectraConfig(vocab_size=v, embedding_size=32, max_position_embeddings=64,
                                           pad_token_id=0, **common),
        "roberta": lambda v: RobertaConfig(vocab_size=v, **roberta_like),
        "xlm-roberta": lambda v: XLMRobertaConfig(vocab_size=v, **roberta_like),
        "camembert": lambda v: CamembertConfig(vocab_size=v, **roberta_like),
        "mpnet": lambda v: MPNetConfig(vocab_size=v, **{k: w for k, w in roberta_like.items() if k != "type_vocab_size"}),
        "distilbert": lambda v: DistilBertConfig(vocab_size=v, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                                 max_position_embeddings=64, pad_token_id=0),
    }


def write_tiny_family(directory: Path, model_type: str, seed: int = 0) -> Path:
    """Save a tiny random encoder of ``model_type`` with a word-level tokenizer whose pad id matches the config."""
    from transformers import AutoModel

    config = _family_configs()[model_type]
    directory.mkdir(parents=True, exist_ok=True)
    specials = list(SPECIALS)
    probe = config(10)
    if int(getattr(probe, "pad_token_id", 0) or 0) == 1:
        specials[0], specials[1] = specials[1], specials[0]  # [UNK] at 0, [PAD] at 1 (RoBERTa-style pad id)
    vocab = specials + WORDS + [".", ",", "'", "!", "?"]
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    word_tokenizer(vocab).save_pretrained(str(directory))
    torch.manual_seed(seed)
    AutoModel.from_config(config(len(vocab))).save_pretrained(str(directory))
    return directory


FAMILY_TYPES: tuple[str, ...] = ("bert", "electra", "roberta", "xlm-roberta", "camembert", "mpnet", "distilbert")


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory: pytest.TempPathFactory) -> object:
    """``tiny_family(model_type) -> Path``: a tiny random encoder of that family, built once per session."""
    built: dict[str, Path] = {}

    def get(model_type: str) -> Path:
        if model_type not in built:
            built[model_type] = write_tiny_family(tmp_path_factory.mktemp(f"tiny_{model_type}"), model_type)
        return built[model_type]

    return get


# ---- fuzzing budget: `python -m pytest --fuzz-long` runs the fuzz suite (tests/fuzz) much deeper ----------
FUZZ = {"examples": 40}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--fuzz-long", action="store_true", help="run the fuzz suite with 25x more examples")


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--fuzz-long", default=False):
        FUZZ["examples"] = 1000


def fuzz_examples() -> int:
    """Hypothesis examples per fuzz property (40 by default, 1000 with --fuzz-long)."""
    return FUZZ["examples"]


# ---- Ray (the optional [ray] extra): one local instance for every Ray test of the session ---------------
@pytest.fixture(scope="session")
def ray_local() -> object:
    """``ray``, initialised once per session as a local 2-CPU instance (no dashboard); shut down at the end.

    Tests that use it skip when ray is not installed. Ray's worker processes inherit this environment
    (``HF_HUB_OFFLINE``, ``OMP_NUM_THREADS``) and import promcse from the same virtualenv.
    """
    ray = pytest.importorskip("ray", reason="the [ray] extra is not installed: pip install -e '.[ray]'")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=200 * 2**20)
    yield ray
    ray.shutdown()
