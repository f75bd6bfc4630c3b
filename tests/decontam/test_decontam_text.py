"""Decontamination text rules: normalisation, tokens, choice blocks, whole-text keys."""

from __future__ import annotations

import numpy as np

from octomed_data.decontam import strip_choices, tokens
from octomed_data.decontam.text import NGRAM, exact_key, exact_keys, token_hash


def test_normalisation():
    assert tokens("Don’t  “STOP” — the 67-year-old's\tX-ray!") == tokens(
        'don\'t "stop" - the 67 year old s x ray'
    )
    assert tokens("Ｆｕｌｌｗｉｄｔｈ ﬁne") == ["fullwidth", "fine"]
    assert tokens("这张图片 is CT") == ["这", "张", "图", "片", "is", "ct"]
    assert tokens("snake_case") == ["snake", "case"]
    q = "Which is it?\nAnswer Choices: (A) one (B) two"
    assert strip_choices(q) == "Which is it?"
    assert strip_choices("What is shown? A)X-ray, B)MRI, C)CT") == "What is shown?"
    assert strip_choices("Vitamin A) deficiency causes what?") == "Vitamin A) deficiency causes what?"


def test_vectorised_exact_keys_equal_exact_key():
    texts = ["Is there a fracture?", "What modality is used to take this image?", "x", "one two three four"]
    values = [[token_hash(t) for t in tokens(text)] for text in texts]
    width = NGRAM - 1
    length = np.array([len(v) for v in values])
    valid = np.arange(width)[None, :] < length[:, None]
    matrix = np.zeros((len(values), width), dtype=np.uint64)
    for i, v in enumerate(values):
        matrix[i, : len(v)] = v
    assert exact_keys(matrix, valid, length).tolist() == [exact_key(v) for v in values]
