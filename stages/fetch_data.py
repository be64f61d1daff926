"""Stage fetch_data: put verified MNIST under data/MNIST/raw (torchvision's layout).

Reads the four IDX .gz files from the folder named by DDPM_DATA_MIRROR when it is set,
otherwise downloads them through torchvision. Each file is checked against the official
MD5 of its uncompressed content; on any failure nothing is left under data/.
"""

import argparse
from pathlib import Path

import common
from ddpm_core.data import fetch_mnist


def run(params):
    mirror = common.data_mirror()
    with common.stage_run("fetch_data", params) as run:
        raw = fetch_mnist(Path("data"), mirror)
        run.set_tags({"data.source": mirror or "torchvision download"})
    print(f"fetch_data: verified MNIST in {raw} (from {mirror or 'torchvision download'})")


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    common.main(run)
