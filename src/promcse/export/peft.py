"""``promcse export --format peft``: a prompt as a PEFT prefix-tuning adapter (:func:`export_peft`).

The directory holds what ``PeftModel.save_pretrained`` writes for ``PrefixTuningConfig(task_type=
"FEATURE_EXTRACTION")``: ``adapter_config.json`` (written through PEFT's own config class, so its fields are
the installed PEFT's) and ``adapter_model.safetensors`` with the (P, L*2*H) prefix table as
``prompt_embeddings``. ``PeftModel.from_pretrained(AutoModel.from_pretrained(base), DIR)``, mean-pooled over
the real tokens, then gives promcse's vectors. A prompt with the projection MLP is exported as the table the
MLP computes (``prefix_projection`` false): PEFT computes the same prefix, and further training in PEFT trains
the table.

Only what PEFT computes can be exported. PEFT passes the prefix as a key/value cache, so the real tokens'
positions start at P (promcse's ``shift_positions``; PEFT shifts any ``position_ids`` it is given as well), its
prefix joins one softmax with the tokens' keys, it carries no head and no pooler, and the base model stays
as it is. :func:`peft_refusal` names the checkpoint field that breaks one of these. The reverse direction,
a PEFT adapter loaded by ``promcse.load``, is :mod:`promcse.models.peft_adapter`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from promcse.errors import PromcseError

if TYPE_CHECKING:  # torch, transformers and peft load lazily, so that `promcse --help` stays fast
    from promcse.encoder.model import EncoderSpec, SentenceEncoder

FORMAT = "peft"


def peft_refusal(spec: EncoderSpec) -> tuple[str, str] | None:
    """``(field, why)`` when an encoder of ``spec`` cannot be a PEFT prefix-tuning adapter; None when it can.

    The field is the checkpoint's ``config.json`` key.
    """
    prompt = spec.prompt
    if spec.mode == "full":
        return "encoder.mode", ("mode 'full' fine-tunes the backbone's own weights; a PEFT prefix adapter is a "
                                "prefix over the unchanged base model")
    if prompt is None:
        return "encoder.prompt", "there is no prompt to export (a bare or frozen encoder is its base model alone)"
    if prompt.gate:
        return "encoder.prompt.gate", ("a gated prompt attends to its prefix through its own softmax scaled per "
                                       "layer and head; PEFT's prefix joins the tokens' keys in one softmax")
    if not prompt.shift_positions:
        return "encoder.prompt.shift_positions", (
            "the prompt was trained with the backbone's own positions (shift_positions false); PEFT passes the "
            "prefix as a key/value cache, so transformers starts the real tokens' positions at the prefix length "
            "(and PEFT shifts any position ids it is given), and its vectors would differ. Export it with the "
            "sentence-transformers or ONNX format, which keep the positions")
    if spec.head == "always":
        return "encoder.head", ("the MLP head applies at inference (head 'always'); a PEFT adapter carries no "
                                "head. Export with the sentence-transformers format, which carries it")
    if spec.pooler != "avg":
        return "encoder.pooler", (f"pooler '{spec.pooler}': a PEFT adapter records no pooling and its users take "
                                  "the mean over the real tokens; export with the sentence-transformers format, "
                                  "which carries the pooler")
    return None


def base_model_name(backbone: str) -> str:
    """``base_model_name_or_path`` for a promcse backbone reference: a local directory's absolute path (the bundled
    one for ``minilm``), else the hub name as given."""
    from promcse.encoder.backbone import resolve_backbone

    resolved = resolve_backbone(backbone)
    path = Path(resolved)
    return str(path.resolve()) if path.is_dir() else resolved


def _peft() -> Any:
    """The ``peft`` module, or a PromcseError saying how to install it."""
    try:
        import peft
    except ImportError:
        raise PromcseError("writing a PEFT adapter needs the peft package: pip install \"promcse[peft]\"",
                           key="format") from None
    return peft


def adapter_config(encoder: SentenceEncoder, base_model: str) -> dict[str, Any]:
    """``adapter_config.json`` as PEFT writes it for a saved ``FEATURE_EXTRACTION`` prefix of this encoder."""
    peft = _peft()
    prompt, shape = encoder.prompt.spec, encoder.spec.shape  # type: ignore[union-attr]
    config = peft.PrefixTuningConfig(
        task_type="FEATURE_EXTRACTION", num_virtual_tokens=prompt.length, token_dim=shape.hidden_size,
        num_layers=shape.num_layers, num_attention_heads=shape.num_heads, num_transformer_submodules=1,
        encoder_hidden_size=shape.hidden_size, prefix_projection=False, inference_mode=True,
        base_model_name_or_path=base_model)
    return {key: sorted(value) if isinstance(value, set) else value for key, value in config.to_dict().items()}


def _check_model(spec: EncoderSpec, path: str) -> None:
    """Raise the refusal of :func:`peft_refusal` for ``spec``, naming ``path`` and the field."""
    refusal = peft_refusal(spec)
    if refusal is not None:
        key, why = refusal
        raise PromcseError(f"cannot be a PEFT prefix-tuning adapter: {why}", path=path, key=key)


def export_peft(model: str | Path, output: str | Path, base_model: str | None = None) -> Path:
    """Write ``model``'s prompt as a PEFT prefix-tuning adapter directory (see the module docstring).

    Args:
        model: A promcse checkpoint directory (or what :func:`promcse.load` accepts that has a prompt).
        output: The directory to write (created; an earlier PEFT adapter there is replaced, anything else refused).
        base_model: ``base_model_name_or_path`` to record (default :func:`base_model_name` of the backbone), e.g.
            a hub name such as ``sentence-transformers/all-MiniLM-L6-v2`` for an adapter to share.

    Returns:
        The output directory.

    Raises:
        PromcseError: A model that cannot map onto PEFT (naming the field, see :func:`peft_refusal`), a bad
            output directory, or no peft installed.
    """
    import safetensors.torch
    import torch

    from promcse.io.files import atomic_write, atomic_write_text, check_output_dir
    from promcse.models.checkpoint import CONFIG_FILE, is_checkpoint, read_spec
    from promcse.models.loading import load
    from promcse.models.peft_adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, WEIGHT_KEY
    from promcse.models.roles import is_role_pair

    source, out = str(model), Path(output)
    _peft()  # before any slow load
    ours = {ADAPTER_CONFIG, ADAPTER_WEIGHTS, "README.md"}  # README.md: PEFT's save_pretrained writes one
    check_output_dir(out, ours=lambda name: name in ours, inputs=[source], what="PEFT adapter", label="output")
    where = str(Path(source) / CONFIG_FILE) if is_checkpoint(source) else source
    if is_checkpoint(source):
        _check_model(read_spec(source), where)  # before the backbone loads
    if is_role_pair(source):
        raise PromcseError("a role pair holds two prompts: export each role's checkpoint on its own", path=source)
    encoder = load(source, device="cpu")
    _check_model(encoder.spec, where)  # type: ignore[union-attr]
    config = adapter_config(encoder, base_model or base_model_name(encoder.spec.backbone))
    with torch.no_grad():
        table = encoder.prompt.table().detach().float().cpu().contiguous()  # type: ignore[union-attr]
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / ADAPTER_WEIGHTS, lambda tmp: safetensors.torch.save_file({WEIGHT_KEY: table}, str(tmp),
                                                                               metadata={"format": "pt"}))
    atomic_write_text(out / ADAPTER_CONFIG, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out
