"""`torchrun --nproc-per-node N -m vfm.train RECIPE --stage ... --data ... --out ...`"""

from vfm.train.cli import main

main()
