"""Entry point python-for-android and kivy-ios run: the app lives in lfm_edge.mobile_app.app."""

import sys

from lfm_edge.mobile_app.app.main import main

if __name__ == "__main__":
    sys.exit(main())
