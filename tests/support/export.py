"""Reading exports back with ``datasets``."""

from __future__ import annotations


def load_config(folder, config: str, split: str):
    """``load_dataset(<trl folder>, config)`` with a cache of its own: datasets 5.2 caches a local
    folder's card configurations by folder name, so two exports both named ``trl`` would collide."""
    import datasets

    return datasets.load_dataset(str(folder), config, split=split, cache_dir=str(folder) + ".hf-cache")
