"""`python -m dashboard.serve [streamlit options]`: `streamlit run dashboard/app.py` with the heavy modules the pages
use imported first, in the server process.

Streamlit runs every page script inside its server process, so the first page a person opens after `rlcore
dashboard` used to pay for importing torch, altair, optuna, MLflow's client and pydantic (about 2 s here) on top of
its own work. Importing them before the server starts moves that cost to start-up, which happens once. Modules with
`st.cache_data` functions (`dashboard.common`) are left to the first run, inside Streamlit's runtime.
"""

from __future__ import annotations

import sys
from pathlib import Path

APP = Path(__file__).resolve().parent / "app.py"


def warm() -> None:
    import altair  # noqa: F401
    import mlflow.tracking  # noqa: F401
    import optuna  # noqa: F401
    import torch  # noqa: F401 - the Lessons page's live controls compute with rlcore's functions

    import dashboard.controls  # noqa: F401
    import dashboard.data  # noqa: F401
    import dashboard.findings  # noqa: F401
    import dashboard.launcher  # noqa: F401
    import rlcore.lessons  # noqa: F401
    import rlcore.loading  # noqa: F401
    import rlcore.sweep  # noqa: F401


if __name__ == "__main__":
    sys.path.insert(0, str(APP.parent.parent))
    warm()
    from streamlit.web.cli import main

    sys.argv = ["streamlit", "run", str(APP), *sys.argv[1:]]
    sys.exit(main())
