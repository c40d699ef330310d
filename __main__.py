"""``python -m sdxl_controlnet_img2img``: the command line (see pipeline/cli.py)."""

import sys

from .pipeline.cli import main

sys.exit(main())
