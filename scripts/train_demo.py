"""Train the bundled demo network. Same as `vizcnn train-demo`; importable as
``vizcnn.train.train_demo``. To refresh the shipped weights:

    python scripts/train_demo.py --out runs/demo
    cp runs/demo/final.pt vizcnn/assets/zfnet_mini.pt
"""

import sys

from vizcnn.cli import main

if __name__ == "__main__":
    sys.exit(main(["train-demo", *sys.argv[1:]]))
