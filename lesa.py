"""
LESA: Learnable LLM Layer Scaling-Up (arXiv 2502.13794), and a test of its claim.

    python lesa.py --holdout 10,15,20      # SmolLM2: predict held-out layers from their neighbours

1. Per weight type, concatenate the L matrices along the input dimension and take
   one SVD: W_cat = [W_1 | ... | W_L] = U S V^T, so W_l = U S V_l (section 3.1).
2. Train one small MLP per type to map [V_{l-1}, V_{l+1}] to V_l, row by row (3.2).
3. A new layer between l and l+1 gets W = U S f([V_l, V_{l+1}]) and l's norms (3.3).
The official notebooks copy layer 0's norms into every new layer; we copy the
neighbour's, as the paper's text intends.
"""
import argparse
import json
import os

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

import dlo

KINDS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def weight(layer, kind):
    return layer.get_submodule(kind).weight


@torch.no_grad()
def svd_factors(model, kinds=KINDS):
    """{kind: (U, S, [V_1 .. V_L])} with W_l = U @ diag(S) @ V_l, computed in fp32."""
    factors = {}
    for kind in kinds:
        mats = [weight(layer, kind).detach().float().cpu() for layer in model.layers]   # (out, in) each
        U, S, Vh = torch.linalg.svd(torch.cat(mats, dim=1), full_matrices=False)
        factors[kind] = (U, S, list(Vh.split(mats[0].shape[1], dim=1)))
    return factors


def predictor(d_in, hidden=256):
    """The paper's network: 2 d_in -> 256 -> 256 -> d_in with ReLU."""
    return nn.Sequential(nn.Linear(2 * d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, d_in))


def training_pairs(V, holdout=()):
    """Rows of [V_{l-1}, V_{l+1}] -> V_l for l = 1 .. L-2. A pair is left out when its
    target or either input is a held-out layer, so nothing about it leaks in."""
    held = set(holdout)
    layers = [l for l in range(1, len(V) - 1) if not {l - 1, l, l + 1} & held]
    x = torch.cat([torch.cat([V[l - 1], V[l + 1]], dim=1) for l in layers])
    y = torch.cat([V[l] for l in layers])
    return x, y, layers


def lesa_loss(pred, target, alpha=5e-4):
    """(1 - a) MSE + a (||Y_hat|| - ||Y||)^2, the norm term per row (section 3.2)."""
    mse = (pred - target).pow(2).mean()
    return (1 - alpha) * mse + alpha * (pred.norm(dim=1) - target.norm(dim=1)).pow(2).mean()


def train_predictors(factors, epochs=10, batch_size=64, lr=1e-3, alpha=5e-4, holdout=(), seed=0):
    """One predictor per weight type, AdamW, the paper's defaults. Returns {kind: net}."""
    nets = {}
    for kind, (_, _, V) in factors.items():
        torch.manual_seed(seed)
        x, y, _ = training_pairs(V, holdout)
        net = predictor(V[0].shape[1])
        opt = torch.optim.AdamW(net.parameters(), lr=lr)
        bar = tqdm(range(epochs), desc=f"LESA {kind}", leave=False)
        for _ in bar:
            for i in torch.randperm(len(x)).split(batch_size):
                loss = lesa_loss(net(x[i]), y[i], alpha)
                opt.zero_grad()
                loss.backward()
                opt.step()
            bar.set_postfix(loss=f"{loss.detach().item():.2e}")
        nets[kind] = net.eval()
    return nets


@torch.no_grad()
def predict_weights(factors, nets, below, above):
    """{kind: W_hat} for a layer between layers `below` and `above` (W = U S f([V_b, V_a]))."""
    out = {}
    for kind, (U, S, V) in factors.items():
        v_hat = nets[kind](torch.cat([V[below], V[above]], dim=1))
        out[kind] = U @ torch.diag(S) @ v_hat
    return out


def default_positions(n_layer, n_new):
    """n_new insertion points spread evenly over the upper half (the paper inserts in the
    upper half: Llama-3-8B 32 -> 48 after layers 15..30); each needs a layer above it."""
    top = n_layer - 2
    positions = sorted(set(np.linspace(n_layer // 2, top, n_new).round().astype(int).tolist()))
    if len(positions) < n_new:
        raise dlo.ExpansionError(f"the upper half of {n_layer} layers has room for {len(positions)} LESA layers")
    return positions


def expand_lesa(model, after, factors=None, nets=None, **train_kw):
    """A deeper model with a LESA-predicted layer after each original layer in `after`."""
    L = model.config.n_layer
    bad = [l for l in after if not 0 <= l < L - 1]
    if bad:
        raise dlo.ExpansionError(f"LESA inserts between two layers: positions {bad} must be in 0 .. {L - 2}")
    factors = factors or svd_factors(model)
    nets = nets or train_predictors(factors, **train_kw)
    plan = dlo.index_plan(L, list(after), "copy")   # copies bring the neighbour's norms
    new = dlo.rebuild(model, plan)
    with torch.no_grad():
        for j, (src, init) in enumerate(plan):
            if init is not None:
                for kind, w in predict_weights(factors, nets, src, src + 1).items():
                    weight(new.layers[j], kind).copy_(w)
    return new


def main():
    p = argparse.ArgumentParser(description="Test LESA's claim on SmolLM2: predict held-out layers.")
    p.add_argument("--holdout", default="10,15,20", help="middle layers kept out of training")
    p.add_argument("--epochs", type=int, default=10, help="predictor epochs (paper: 10)")
    p.add_argument("--eval_rows", type=int, default=16, help="ShareGPT held-out rows for the loss")
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--out", default="out/lesa_claim.json")
    args = p.parse_args()
    import weights
    from data import TokenData, prepare_sharegpt
    from tokenizer import load_tokenizer
    holdout = [int(s) for s in args.holdout.split(",")]
    model = weights.from_pretrained("smollm2")
    if not os.path.exists("data/sharegpt/meta.json"):
        prepare_sharegpt("data/sharegpt", load_tokenizer("smollm2"))
    val = TokenData("data/sharegpt", "val", args.seq_len)
    x, y, valid = val.batch(val.val_rows(args.eval_rows))

    @torch.no_grad()
    def loss_of(m):
        return float(m(x, y, valid=valid)[1])

    factors = svd_factors(model)
    nets = train_predictors(factors, epochs=args.epochs, holdout=holdout)
    rows, reference = [], loss_of(model)
    for l in holdout:
        truth = {k: weight(model.layers[l], k).detach() for k in KINDS}
        guesses = {"lesa": predict_weights(factors, nets, l - 1, l + 1),
                   "mean": {k: (weight(model.layers[l - 1], k) + weight(model.layers[l + 1], k)).detach() / 2
                            for k in KINDS}}
        row = {"layer": l, "loss_original": reference, "loss_removed": loss_of(dlo.drop_layers(model, [l]))}
        for name, guess in guesses.items():
            # relative error over all seven matrices together, and per kind
            err = sum(float((guess[k] - truth[k]).pow(2).sum()) for k in KINDS)
            row[f"rel_err_{name}"] = (err / sum(float(truth[k].pow(2).sum()) for k in KINDS)) ** 0.5
            row[f"per_kind_{name}"] = {k: float((guess[k] - truth[k]).norm() / truth[k].norm()) for k in KINDS}
            replaced = dlo.rebuild(model, [(i, None) for i in range(model.config.n_layer)])
            with torch.no_grad():
                for k in KINDS:
                    weight(replaced.layers[l], k).copy_(guess[k])
            row[f"loss_{name}"] = loss_of(replaced)
        rows.append(row)
    print("| layer | rel. error LESA | rel. error neighbour mean | loss: LESA | loss: mean | loss: original "
          "| loss: layer removed |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layer']} | {r['rel_err_lesa']:.3f} | {r['rel_err_mean']:.3f} | {r['loss_lesa']:.4f} "
              f"| {r['loss_mean']:.4f} | {r['loss_original']:.4f} | {r['loss_removed']:.4f} |")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"settings": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
