"""Integration tests share tests/conftest.py's fixtures (the local Ray cluster `ray_cluster`)."""
