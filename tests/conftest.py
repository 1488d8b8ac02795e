import os
import sys

# Test helpers (oracles, model builders) live beside the tests.
sys.path.insert(0, os.path.dirname(__file__))
# Marks for tests that start engines, share them or need every core, and
# how the suite is spread over the cores: the root conftest.py.
