"""``python -m pesc_serve.ray --model camelidae --num-replicas 2``: see pesc_serve/ray/cli.py."""

import sys

from pesc_serve.ray.cli import main

if __name__ == "__main__":
    sys.exit(main())
