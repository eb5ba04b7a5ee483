"""sentence-transformers-shaped calls: one string encodes to one vector, and ``similarity`` takes embeddings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from conftest import make_prompt_checkpoint, make_sentences
from promcse.models.loading import load

TEXTS = make_sentences(6, seed=11)


def test_one_string_is_one_vector(tiny_bert: Path, tmp_path: Path) -> None:
    model = load(str(make_prompt_checkpoint(tiny_bert, tmp_path / "c")), device="cpu")
    one = model.encode(TEXTS[0])
    assert one.shape == (model.dim,)
    assert np.allclose(one, model.encode(TEXTS[:1])[0], atol=1e-6)
    assert np.allclose(model.encode_query(TEXTS[1]), model.encode([TEXTS[1]])[0], atol=1e-6)


def test_similarity_takes_embeddings_or_texts(tiny_bert: Path) -> None:
    model = load(str(tiny_bert), device="cpu")
    from_texts = model.similarity(TEXTS[:2], TEXTS[2:])
    a, b = model.encode(TEXTS[:2], normalize=False), model.encode(TEXTS[2:])
    assert np.allclose(model.similarity(a, b), from_texts, atol=1e-5)
    assert np.allclose(model.similarity(torch.from_numpy(a), torch.from_numpy(b)), from_texts, atol=1e-5)
    assert model.similarity(model.encode(TEXTS[0]), b).shape == (1, 4)
