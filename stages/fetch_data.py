"""Stage fetch_data: put the verified dataset of `data.dataset` (mnist or fashion-mnist)
under data/dataset/<MNIST or FashionMNIST>/raw, torchvision's layout.

Sources, in order: the folder named by DDPM_DATA_MIRROR (skipped, with a note, when its
files are the other dataset's); for fashion-mnist, /usr/share/datasets/fashion-mnist
(Debian's dataset-fashion-mnist) when present; the torchvision download. Each file is
checked against the official MD5 of its uncompressed content; on any failure nothing is
left under data/.
"""

import argparse

import common
from ddpm_core.config import Params
from ddpm_core.data import DATASETS, fetch


def run(params: Params) -> None:
    dataset = params.data.dataset
    with common.stage_run("fetch_data", params) as run:
        raw, source = fetch(dataset, common.DATA, common.data_mirror())
        run.set_tags({"data.source": source})
    print(f"fetch_data: verified {DATASETS[dataset].title} in {raw} (from {source})")


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    common.main(run)
