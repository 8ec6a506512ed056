"""
A trained model as a folder to share: model.safetensors, config.json (the full model
config: depth, routers, calibrated thresholds; and the run's settings) and the tokenizer.
No optimizer, no RNG state, no pickle: loading it never runs code from the file.

    python export.py out/dlo/ckpt.pt out/dlo-export                     # fp32
    python export.py out/dlo/ckpt.pt out/dlo-bf16 --dtype bfloat16      # half the bytes
    python sample.py --init_from out/dlo-export                         # same tokens, same routing
    python evaluate.py out/dlo-export                                   # same held-out loss

The folder is a transformers Llama folder too; for a model without routers it gives the
same logits there (weights.py's docstring says what transformers makes of a routed one).
"""
import argparse
import os
import sys

import torch

import weights


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Export a checkpoint as safetensors + config.json + tokenizer.")
    p.add_argument("checkpoint", help="a train.py checkpoint (.pt), or an export folder to convert")
    p.add_argument("out_dir", help="the folder to write")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="the weights' dtype")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        weights.export(args.checkpoint, args.out_dir, getattr(torch, args.dtype))
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    size = sum(os.path.getsize(os.path.join(args.out_dir, f)) for f in os.listdir(args.out_dir))
    print(f"{args.out_dir}: {size / 1e9:.2f} GB ({size} bytes), {args.dtype}")


if __name__ == "__main__":
    main()
