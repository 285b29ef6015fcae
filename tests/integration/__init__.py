"""End-to-end tests through nnU-Net's real commands (marked ``integration``); helpers in ``helpers.py``,
fixtures in ``tests/conftest.py``."""
