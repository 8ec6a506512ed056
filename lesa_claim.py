"""
LESA's claim, tested on SmolLM2: can a layer be predicted from its two neighbours?

    python lesa_claim.py --holdout 13,14,15,16     # predict held-out layers from their neighbours
    python lesa_claim.py --epochs 3                # quicker predictors (the paper trains 10 epochs)

The held-out layers are kept out of the SVD and out of every training pair (as inputs
and as targets); each is then predicted from its two neighbours (lesa.py) and compared
with the neighbours' mean, in weight space (relative error) and in held-out loss with
the layer replaced, against the original layer and against removing it. The 13 loss
evaluations take ~7 minutes on a 2-core CPU.
"""
import argparse
import copy
import json
import os
import time

import torch

import growth
import weights
from data import DataError, TokenData
from lesa import KINDS, predict_layer, svd_factors, train_predictors, weight


def with_layer(model, l, linears):
    """A copy of the model whose layer l holds `linears` ({kind: W}) in its seven linears."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for kind, w in linears.items():
            weight(m.layers[l], kind).copy_(w)
    return m


def rel_errors(guess, truth):
    """||W_hat - W|| / ||W|| per kind, and over the seven matrices together."""
    per_kind = {k: float((guess[k] - truth[k]).norm() / truth[k].norm()) for k in truth}
    err = sum(float((guess[k] - truth[k]).pow(2).sum()) for k in truth)
    return per_kind, (err / sum(float(truth[k].pow(2).sum()) for k in truth)) ** 0.5


def main():
    p = argparse.ArgumentParser(description="Test LESA's claim on SmolLM2: hold middle layers out of the "
                                            "SVD and the predictor, then predict each from its neighbours.")
    p.add_argument("--holdout", default="13,14,15,16", help="layers kept out of training, comma-separated")
    p.add_argument("--epochs", type=int, default=10, help="predictor epochs (paper: 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default="data/sharegpt", help="prepared data (python data.py sharegpt)")
    p.add_argument("--eval_rows", type=int, default=32, help="validation rows for the held-out loss")
    p.add_argument("--seq_len", type=int, default=256, help="tokens per validation row")
    p.add_argument("--out", default="out/lesa_claim.json")
    args = p.parse_args()
    model = weights.from_pretrained("smollm2")
    holdout = [int(s) for s in args.holdout.split(",")]
    if not all(1 <= l <= model.config.n_layer - 2 for l in holdout):
        p.error(f"held-out layers need a neighbour on each side: use 1 .. {model.config.n_layer - 2}")
    try:
        val = TokenData(args.data, "val", args.seq_len)
    except DataError as e:
        raise SystemExit(f"error: {e}")
    x, y, valid = val.batch(val.val_rows(args.eval_rows))

    @torch.no_grad()
    def loss_of(m):
        return float(m(x, y, valid=valid)[1])

    t0 = time.time()
    factors = svd_factors(model, exclude=holdout)
    t1 = time.time()
    predictors = train_predictors(factors, epochs=args.epochs, holdout=holdout, seed=args.seed)
    timing = {"svd_s": round(t1 - t0, 1), "train_s": round(time.time() - t1, 1)}
    reference, rows = loss_of(model), []
    for l in holdout:
        truth = {k: weight(model.layers[l], k).detach() for k in KINDS}
        guesses = {"lesa": predict_layer(factors, predictors, l - 1, l + 1),
                   "mean": {k: (weight(model.layers[l - 1], k) + weight(model.layers[l + 1], k)).detach() / 2
                            for k in KINDS}}
        row = {"layer": l, "loss_original": reference, "loss_removed": loss_of(growth.drop_layers(model, [l]))}
        for name, guess in guesses.items():
            row[f"per_kind_{name}"], row[f"rel_err_{name}"] = rel_errors(guess, truth)
            row[f"loss_{name}"] = loss_of(with_layer(model, l, guess))
        rows.append(row)

    print(f"\nSVD {timing['svd_s']} s, predictors {timing['train_s']} s ({args.epochs} epochs); "
          f"loss on {len(x)} rows of {args.data} val\n")
    print("| held-out layer | rel. error: LESA | rel. error: neighbour mean | loss: LESA | loss: neighbour mean "
          "| loss: original | loss: layer removed |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layer']} | {r['rel_err_lesa']:.3f} | {r['rel_err_mean']:.3f} | {r['loss_lesa']:.4f} "
              f"| {r['loss_mean']:.4f} | {r['loss_original']:.4f} | {r['loss_removed']:.4f} |")
    print("\nRelative weight error per kind, LESA / neighbour mean:\n\n| layer | " + " | ".join(KINDS) + " |\n|"
          + "---|" * (len(KINDS) + 1))
    for r in rows:
        print(f"| {r['layer']} | " + " | ".join(f"{r['per_kind_lesa'][k]:.3f} / {r['per_kind_mean'][k]:.3f}"
                                                for k in KINDS) + " |")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"settings": vars(args), "timing": timing, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
