"""Loading checkpoints in the format the PromCSE authors released (``BertForCL`` / ``RobertaForCL``).

Such a directory is a full Hugging Face model: ``config.json``, tokenizer files and one weights file
(``model.safetensors``, a sharded ``model.safetensors.index.json``, or ``pytorch_model.bin``) whose keys are

- ``bert.*`` or ``roberta.*``: the backbone (loaded by transformers, which strips that prefix);
- ``prefix_encoder.embedding.weight``: the prompt table, (P, L*2*H) in the reference layout, or (P, H)
  followed by ``prefix_encoder.trans.{0,2}.*`` when trained with ``--prefix_projection``;
- ``mlp.dense.*``: the MLP head (present when trained with ``--pooler_type cls``).

What the weights do not say is given by the user (arguments) or by a small JSON next to them
(:data:`SIDECAR`, e.g. ``{"pooler": "cls", "prompt_length": 16}``); ``pooler_type``/``prompt_length`` keys in
``config.json`` are read too. The reference's poolers map onto ours one to one; as in its ``tool.py``,
``cls`` applies the MLP at inference unless ``mlp_only_train`` is set. ``pytorch_model.bin`` is read with
``torch.load(weights_only=True)``, which refuses anything but tensors and plain containers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from promcse.encoder.backbone import load_backbone, resolve_device, shape_of
from promcse.errors import PromcseError
from promcse.encoder.model import EncoderSpec, SentenceEncoder, build_encoder
from promcse.encoder.pooling import POOLERS
from promcse.encoder.prompt import PromptSpec

SIDECAR = "promcse.json"
PREFIX_KEY = "prefix_encoder.embedding.weight"
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"


def weight_keys(directory: str | Path) -> set[str]:
    """Tensor names in a HF directory's weights (empty when there are none)."""
    root = Path(directory)
    if (root / SAFETENSORS_INDEX).is_file():
        return set(_read_json(root / SAFETENSORS_INDEX).get("weight_map", {}))
    if (root / SAFETENSORS).is_file():
        from safetensors import safe_open

        with safe_open(str(root / SAFETENSORS), framework="pt") as handle:
            return set(handle.keys())
    if (root / TORCH_BIN).is_file():
        return set(_load_bin(root / TORCH_BIN))
    return set()


def is_released(path: str | Path) -> bool:
    """True if ``path`` is a HF directory whose weights hold a PromCSE prefix encoder."""
    root = Path(path)
    if not (root / "config.json").is_file():
        return False
    try:
        return PREFIX_KEY in weight_keys(root)
    except (OSError, RuntimeError, ValueError, PromcseError):
        return False


def read_tensors(directory: str | Path, names: set[str]) -> dict[str, torch.Tensor]:
    """Read only the named tensors (prompt and head) from the directory's weights."""
    root = Path(directory)
    if (root / SAFETENSORS_INDEX).is_file():
        weight_map = _read_json(root / SAFETENSORS_INDEX).get("weight_map", {})
        files = {weight_map[n] for n in names if n in weight_map}
        out: dict[str, torch.Tensor] = {}
        for file in sorted(files):
            out.update(_read_safetensors(root / file, names))
        return out
    if (root / SAFETENSORS).is_file():
        return _read_safetensors(root / SAFETENSORS, names)
    if (root / TORCH_BIN).is_file():
        return {k: v for k, v in _load_bin(root / TORCH_BIN).items() if k in names}
    raise PromcseError(f"no weights found ({SAFETENSORS} or {TORCH_BIN})", path=root)


def _read_safetensors(path: Path, names: set[str]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys() if k in names}


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    """A torch state dict, through the tensors-only unpickler."""
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, ... for bad or unsafe files
        raise PromcseError(f"cannot read weights safely: {str(err).splitlines()[0]}", path=path) from None
    if not isinstance(state, dict):
        raise PromcseError("weights file does not hold a state dict", path=path)
    return state


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise PromcseError(f"cannot read JSON: {err}", path=path) from None
    if not isinstance(data, dict):
        raise PromcseError("expected a JSON object", path=path)
    return data


def released_options(directory: str | Path, pooler: str | None, prompt_length: int | None,
                     mlp_only_train: bool | None) -> tuple[str, int | None, bool]:
    """Resolve (pooler, prompt_length, mlp_only_train): arguments, then :data:`SIDECAR`, then ``config.json``."""
    root = Path(directory)
    sources = [_read_json(root / SIDECAR)] if (root / SIDECAR).is_file() else []
    sources.append(_read_json(root / "config.json"))

    def pick(value: Any, *keys: str) -> Any:
        for source in sources:
            for key in keys:
                if value is None and source.get(key) is not None:
                    value = source[key]
        return value

    pooler = pick(pooler, "pooler", "pooler_type")
    if pooler is None:
        raise PromcseError(f"the pooler is not recorded: pass pooler=... (one of {', '.join(POOLERS)}) or write "
                           f'{SIDECAR} with {{"pooler": "cls", "prompt_length": 16}}', path=root)
    if pooler not in POOLERS:
        raise PromcseError(f"unknown pooler '{pooler}'; choose one of {', '.join(POOLERS)}", path=root)
    length = pick(prompt_length, "prompt_length", "pre_seq_len")
    return str(pooler), None if length is None else int(length), bool(pick(mlp_only_train, "mlp_only_train"))


def prompt_spec_from(tensors: dict[str, torch.Tensor], shape: Any, prompt_length: int | None,
                     root: Path) -> PromptSpec:
    """Infer P and the projection from the prefix tensors; check them against the backbone and the user."""
    table = tensors[PREFIX_KEY]
    length = int(table.shape[0])
    if prompt_length is not None and prompt_length != length:
        raise PromcseError(f"prompt_length={prompt_length} given, but the prefix table has {length} rows", path=root)
    projection = "prefix_encoder.trans.0.weight" in tensors
    hidden = int(tensors["prefix_encoder.trans.0.weight"].shape[0]) if projection else 512
    spec = PromptSpec.for_backbone(shape, length, projection=projection, projection_hidden=hidden)
    width = spec.hidden_size if projection else spec.num_layers * 2 * spec.hidden_size
    if tuple(table.shape) != (length, width):
        raise PromcseError(f"prefix table has shape {tuple(table.shape)}, the backbone implies ({length}, {width})",
                           path=root)
    return spec


def alias_prompt_length(prompt_length: int | None, pre_seq_len: int | None) -> int | None:
    """``pre_seq_len`` (the reference code's name) is a documented alias of ``prompt_length``; both must agree."""
    if prompt_length is not None and pre_seq_len is not None and prompt_length != pre_seq_len:
        raise PromcseError(f"prompt_length={prompt_length} and its alias pre_seq_len={pre_seq_len} disagree",
                           key="pre_seq_len")
    return prompt_length if prompt_length is not None else pre_seq_len


def load_released(directory: str | Path, pooler: str | None = None, prompt_length: int | None = None,
                  mlp_only_train: bool | None = None, device: str = "auto", *,
                  pre_seq_len: int | None = None) -> SentenceEncoder:
    """Load a released PromCSE checkpoint as a :class:`SentenceEncoder`.

    Args:
        directory: The HF directory (see the module docstring).
        pooler: ``cls`` (MLP applied), ``cls_before_pooler``, ``avg``, ``avg_first_last`` or ``avg_top2``;
            default from :data:`SIDECAR` or ``config.json``.
        prompt_length: Prompt length P, checked against the weights (which define it).
        pre_seq_len: The reference code's name for ``prompt_length`` (an alias).
        mlp_only_train: Skip the MLP at inference for ``cls`` (the unsupervised recipe).
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``...

    Raises:
        PromcseError: Not a released checkpoint, unknown pooler, or shapes that disagree.
    """
    root = Path(directory)
    keys = weight_keys(root) if (root / "config.json").is_file() else set()
    if PREFIX_KEY not in keys:
        raise PromcseError(f"not a released PromCSE checkpoint: no '{PREFIX_KEY}' in its weights", path=root)
    prompt_length = alias_prompt_length(prompt_length, pre_seq_len)
    pooler, prompt_length, mlp_only_train = released_options(root, pooler, prompt_length, mlp_only_train)
    wanted = {k for k in keys if k.startswith(("prefix_encoder.", "mlp."))}
    tensors = read_tensors(root, wanted)
    backbone, tokenizer = load_backbone(str(root))
    shape = shape_of(backbone.config)
    has_mlp = "mlp.dense.weight" in tensors
    if pooler == "cls" and not has_mlp:
        raise PromcseError("pooler 'cls' needs the MLP head, but the weights have no 'mlp.dense.*'", path=root)
    head = "none" if pooler != "cls" else ("train_only" if mlp_only_train else "always")
    spec = EncoderSpec(backbone=str(root.resolve()), shape=shape, mode="prompt",
                       prompt=prompt_spec_from(tensors, shape, prompt_length, root), pooler=pooler, head=head,
                       extra={"source": "released", "reference_pooler": pooler})
    encoder = build_encoder(spec, backbone, tokenizer)
    prompt_state = {k.removeprefix("prefix_encoder."): v for k, v in tensors.items() if k.startswith("prefix_encoder.")}
    encoder.prompt.load_state_dict(prompt_state)  # type: ignore[union-attr]
    if encoder.head is not None:
        encoder.head.load_state_dict({k.removeprefix("mlp."): v for k, v in tensors.items() if k.startswith("mlp.")})
    return encoder.eval().to(resolve_device(device))
