"""Run by tests/test_fsdp.py under torchrun: train.py --fsdp for several methods in one launch
(the process group is set up once). Usage: fsdp_driver.py OUT_ROOT METHOD[:extra,flags] ... -- COMMON ARGS"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train  # noqa: E402

sep = sys.argv.index("--")
out_root, runs, common = sys.argv[1], sys.argv[2:sep], sys.argv[sep + 1:]
for run in runs:
    method, _, extra = run.partition(":")
    flags = extra.split(",") if extra else []
    train.train(train.parse_args(["--method", method, "--out_dir", os.path.join(out_root, method), "--fsdp",
                                  *common, *flags]))
