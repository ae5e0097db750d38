"""Fine-tune a model with a PEFT method.

    python train.py --model llama-7b --method lora --dry-run     # parameter report, no weights
"""
import argparse
import sys

import model as M
import methods


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-tiny", help=f"a preset ({', '.join(M.LLAMA_PRESETS)}) or a checkpoint path")
    p.add_argument("--method", default="lorada_la" if "lorada_la" in methods.METHODS else "lora",
                   help=f"one of: {', '.join(methods.METHODS)}")
    p.add_argument("--dry-run", action="store_true",
                   help="build the model (on the meta device for a preset name), apply the method, "
                        "print the trainable-parameter line and exit")
    hp = p.add_argument_group("method hyperparameters (default: the registry's preset for the model)")
    for name, typ in methods.HPARAMS.items():
        hp.add_argument(f"--{name}", type=typ, default=None)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    overrides = {k: getattr(args, k) for k in methods.HPARAMS if getattr(args, k) is not None}
    try:
        model = M.build(args.model)
        methods.apply_method(model, args.method, **overrides)
    except ValueError as e:
        sys.exit(f"error: {e}")
    print(methods.parameter_report(model))
    if args.dry_run:
        return model
    sys.exit("error: the training loop is not implemented yet (issue 5); use --dry-run")


if __name__ == "__main__":
    main()
