"""quantcheck: should I serve the quantized version of this LLM?"""

__version__ = "0.1.0"
