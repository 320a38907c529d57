"""End-to-end benchmark harness of issue 5 (``python -m bench``); see bench/README.md."""
