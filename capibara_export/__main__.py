import sys

from .cli import main

if __name__ == "__main__":  # a spawned build worker imports this module without running the CLI
    sys.exit(main())
