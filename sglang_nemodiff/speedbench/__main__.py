import sys

from sglang_nemodiff.speedbench.cli import main

sys.exit(main())
