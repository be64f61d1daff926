"""Stage check_params: validate the whole of params.yaml against ddpm_core/config.py.

Every stage validates params.yaml when it starts, but a key that no stage reads, such
as a typo added with `dvc exp run -S +epoch=3`, changes no other stage's dependencies:
without this stage DVC would run nothing and record the experiment as if it were fine.
This stage depends on the whole file, so any edit reruns it, and a bad key stops the
run with the same one-line message (exit status 2) as everywhere else. It writes
nothing and logs nothing to MLflow.
"""

import argparse

import common

if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    common.main(lambda params: print("check_params: params.yaml is valid"))
