#!/usr/bin/env python
"""SPEED-Bench harness: python launch/speedbench.py --help (library: sglang_nemodiff/speedbench/)."""

import os
import sys

if __name__ == "__main__":
    try:
        from sglang_nemodiff.speedbench import main
    except ImportError:  # running from a checkout without `pip install -e .`
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from sglang_nemodiff.speedbench import main
    sys.exit(main())
