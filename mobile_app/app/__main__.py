"""`python -m lfm_edge.mobile_app.app [BUNDLE]`, the same as `lfm-app`."""

import sys

from .main import main

sys.exit(main())
