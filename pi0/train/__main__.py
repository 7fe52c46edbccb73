"""`python -m pi0.train` (as torchrun starts it): the same command as `pi0 train`."""

import argparse
import sys

from pi0.train.command import add_arguments, main

ap = argparse.ArgumentParser(prog="python -m pi0.train", description="Fine-tune pi0 / pi0.5 on a LeRobot v3 dataset")
add_arguments(ap)
sys.exit(main(ap.parse_args()))
