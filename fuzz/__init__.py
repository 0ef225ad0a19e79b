"""Coverage-guided fuzz targets (atheris) and their seed corpora; see fuzz/harness.py."""
