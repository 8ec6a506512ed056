"""
Calibrate a routed checkpoint's per-layer thresholds on held-out rows, on demand.

    python calibrate.py out/dlo/ckpt.pt                  # the capacities it was trained at
    python calibrate.py out/dlo/ckpt.pt --capacity 0.8   # skip more (or less) at inference

Training ends with this step (train.py); run it again to move a trained model along
its quality/compute curve without retraining. A global capacity c is split over the
layers the way training split it: capacity is taken where the similarity labels put
it (router.CapacitySchedule), so layers the labels say to run stay dense. The
thresholds are written into the checkpoint's model config, which sample.py, bench.py
and compare.py read; the checkpoint is rewritten atomically.
"""
import argparse
import dataclasses
import sys

import torch

import train
import weights
from router import CapacitySchedule


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Calibrate a routed checkpoint's per-layer thresholds.")
    p.add_argument("checkpoint", help="a train.py checkpoint (.pt) of a model routed with top-k")
    p.add_argument("--capacity", type=float, default=None,
                   help="mean fraction of routable tokens each routed layer runs (default: the training one)")
    p.add_argument("--rows", type=int, default=None, help="held-out rows to calibrate on (default: training's)")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        ckpt = weights.load_checkpoint(args.checkpoint)
        cfg = train.TrainConfig(**ckpt["train_config"])
        if cfg.route == "none" or cfg.train_rule != "topk" or cfg.predictor:
            raise ValueError(f"{args.checkpoint}: only models routed with top-k have thresholds to calibrate")
        if args.capacity is not None and not 0 < args.capacity <= 1:
            raise ValueError(f"--capacity must be in (0, 1], got {args.capacity}")
        model = weights.model_from_checkpoint(ckpt).to(device)
        data = train.load_data(cfg, "val", cfg.init_from)
    except (ValueError, OSError, TypeError) as e:
        sys.exit(f"error: {e}")
    n_rows = args.rows or cfg.calib_rows
    rows = data.val_rows(cfg.eval_rows + n_rows)[cfg.eval_rows:] if n_rows else data.val_rows(cfg.eval_rows)
    capacity = cfg.capacity_end if args.capacity is None else args.capacity
    schedule = CapacitySchedule(len(model.config.routed_ids()), capacity, capacity, split=cfg.capacity_split)
    schedule.load_state_dict(ckpt["schedule"])
    caps = schedule.capacities(0)
    thresholds = train.calibrate(model, data, rows, caps, device, train.train_dtype(cfg.dtype, device))
    ckpt["model_config"] = dataclasses.asdict(dataclasses.replace(model.config, route_threshold=thresholds))
    weights.save_checkpoint(args.checkpoint, ckpt)
    print(f"{len(thresholds)} thresholds at mean capacity {float(caps.mean()):.3f} on {len(rows)} held-out rows "
          f"written to {args.checkpoint}")


if __name__ == "__main__":
    main()
