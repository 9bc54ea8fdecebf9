"""The transformers backend: `backend` (the engine seam, its recipes and the cost primitives) and `generation`
(latency inputs and fixed-length generation through transformers' generate)."""

from quantcheck.backends.hf.backend import BACKEND, HFBackend, answer_position_logprobs

__all__ = ["BACKEND", "HFBackend", "answer_position_logprobs"]
