"""MDL-SAEs and bilinear MLPs on a small language model trained on real English text.

The entry point for ``python demos/lm_study.py [--quick] ...`` and ``tl-mdl demo lm``; the
study itself is the package ``demos/lm_study/`` (its ``__init__`` lists the stages and
modules). Python imports the package, not this file, for ``import lm_study``: a folder with
an ``__init__.py`` comes before a module of the same name.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lm_study.study import main  # noqa: E402

if __name__ == "__main__":
    main()
