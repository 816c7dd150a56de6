"""Train the bundled demo network. Same as `vizcnn train-demo`; importable as
``vizcnn.train.train_demo``. To refresh the shipped weights (the final checkpoint and, for
``demo:N`` and Fig. 4, epochs 1, 2, 5 and 10 in float16):

    python scripts/train_demo.py --out runs/demo
    python scripts/train_demo.py --ship runs/demo
"""

import sys

from vizcnn.cli import main
from vizcnn.train import ship_demo_checkpoints

if __name__ == "__main__":
    if sys.argv[1:2] == ["--ship"] and len(sys.argv) == 3:
        for path in ship_demo_checkpoints(sys.argv[2]):
            print(f"wrote {path}")
        sys.exit(0)
    sys.exit(main(["train-demo", *sys.argv[1:]]))
