"""``python -m e2m_plugins.cli``: the same as the ``e2m`` console script."""

from . import main

raise SystemExit(main())
