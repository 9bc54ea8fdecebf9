"""quantcheck: should I serve the quantized version of this LLM?

From Python: `quantcheck.compare(variants=[...])` runs what `quantcheck run` runs and returns a
`Comparison`; `quantcheck.load(run_dir)` reads a run folder back without torch (see `quantcheck.api`).
"""

from quantcheck.api import Comparison, compare, load, sensitivity
from quantcheck.schema.results import QUANTCHECK_VERSION as __version__

__all__ = ["Comparison", "__version__", "compare", "load", "sensitivity"]
