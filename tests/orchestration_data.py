"""Re-export for ``benchmarks/check_llamafactory.py``; tests import ``tests.support.orchestration``."""

from tests.support.orchestration import real_mcqs, write_inputs

__all__ = ["real_mcqs", "write_inputs"]
