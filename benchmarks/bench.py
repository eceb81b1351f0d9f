"""The script behind `babyllama bench` (same flags): python benchmarks/bench.py --shapes 15M --repeats 1"""

import sys

from babyllama.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
