"""Root pytest configuration: smoke profile, offline hubs, a temporary run directory.

It applies to the unit tests and to the notebooks collected by nbval (which cannot
inject parameters: the notebooks read these variables instead).
"""
import os
import tempfile

os.environ.setdefault("RABLE_PROFILE", "smoke")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("RABLE_RUN_DIR", tempfile.mkdtemp(prefix="rable-nbval-"))
