"""Root pytest configuration: smoke profile, offline hubs, a temporary run directory (the
notebooks read these variables too, so one opened by hand runs in smoke)."""
import os
import tempfile

os.environ.setdefault("RABLE_PROFILE", "smoke")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("RABLE_RUN_DIR", tempfile.mkdtemp(prefix="rable-tests-"))
