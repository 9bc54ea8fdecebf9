"""quantcheck: should I serve the quantized version of this LLM?

From Python: `quantcheck.compare(variants=[...])` runs what `quantcheck run` runs and returns a
`Comparison`; `quantcheck.load(run_dir)` reads a run folder back without torch (see `quantcheck.api`).
"""

__version__ = "0.1.0"

# After __version__: the modules below import it.
from quantcheck.api import Comparison, compare, load  # noqa: E402

__all__ = ["Comparison", "__version__", "compare", "load"]
