"""
LESA: Learnable LLM Layer Scaling-Up (arXiv 2502.13794), as a layer operation beside
dlo.py: `expand_lesa(model, after)` returns a deeper model. lesa_claim.py tests the
paper's claim on SmolLM2.

The method in four steps:
1. one SVD per weight type across all layers: [W_1 | ... | W_L] = U S V^T, so W_l = U S V_l
2. training pairs [V_{l-1}, V_{l+1}] -> V_l for l = 1 .. L-2, each row of V_l one sample
3. one small MLP per type learns them, with an MSE plus row-norm loss
4. a new layer between l and l+1 gets W = U S f([V_l, V_{l+1}]) and layer l's norms (the official
   notebook gives every new layer layer 0's norms, whose scale belongs to the bottom of the model)

Notable features
- held-out layers can be kept out of the SVD and out of every training pair (lesa_claim.py)
- cost on SmolLM2-135M, 2-core CPU shared with another job, one thread: factors 9 s, predictors
  65 s for 10 epochs over all seven types
"""
import torch
import torch.nn as nn
from tqdm import tqdm

import dlo

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
KINDS = ATTN + ("gate_proj", "up_proj", "down_proj")


def weight(layer, kind):
    """The (out, in) weight of one of a block's seven linears, by its short name: a view
    into the fused q/k/v and gate/up matrices where the model stacks them."""
    attn, mlp = layer.self_attn, layer.mlp
    if kind in ("q_proj", "k_proj", "v_proj"):
        return dict(zip(ATTN, attn.qkv_proj.weight.split(attn.sizes)))[kind]
    if kind in ("gate_proj", "up_proj"):
        return dict(zip(("gate_proj", "up_proj"), mlp.gate_up_proj.weight.chunk(2)))[kind]
    return getattr(attn if kind in ATTN else mlp, kind).weight


@torch.no_grad()
def svd_factors(model, kinds=KINDS, exclude=()):
    """{kind: (U, S, [V_0 .. V_{L-1}])} in fp32, with W_l = U diag(S) V_l and V_l (r, d_in).
    U and S are those of the SVD of [W_1 | ... | W_L] over the layers not in `exclude`, taken
    from its Gram matrix sum_l W_l W_l^T = U S^2 U^T in float64 (seconds, where the full SVD
    takes minutes on a CPU). Each V_l = S^-1 U^T W_l is then exactly layer l's slice of V^T;
    U is square whenever L d_in >= d_out (every Llama weight), so an excluded layer is still
    represented exactly, without having shaped U or S."""
    factors = {}
    for kind in kinds:
        mats = [weight(layer, kind).detach().cpu().double() for layer in model.layers]   # (out, in) each
        gram = sum(w @ w.T for l, w in enumerate(mats) if l not in exclude)          # (out, out)
        eig, U = torch.linalg.eigh(gram)                                              # ascending
        S, U = eig.flip(0).clamp_min(0).sqrt(), U.flip(1)                             # (out,), (out, out)
        r = int((S > S[0] * 1e-7).sum())   # rank: below it, S^-1 would only amplify rounding
        S, U = S[:r], U[:, :r]
        factors[kind] = (U.float(), S.float(), [(U.T @ w / S[:, None]).float() for w in mats])
    return factors


def predictor(d_in, hidden=256):
    """The paper's network f: 2 d_in -> 256 -> 256 -> d_in with ReLU (step 3)."""
    return nn.Sequential(nn.Linear(2 * d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, d_in))


def training_pairs(V, holdout=()):
    """x = rows of [V_{l-1}, V_{l+1}], y = rows of V_l, for l = 1 .. L-2 (step 2). A pair is
    dropped when its target or either input is held out: as an input a held-out layer would
    still teach the net its coordinates, and the held-out test must see none of them."""
    held = set(holdout)
    layers = [l for l in range(1, len(V) - 1) if not {l - 1, l, l + 1} & held]
    x = torch.cat([torch.cat([V[l - 1], V[l + 1]], dim=1) for l in layers])   # (r n, 2 d_in)
    y = torch.cat([V[l] for l in layers])                                      # (r n, d_in)
    return x, y, layers


def lesa_loss(pred, target, alpha=5e-4):
    """(1 - a) MSE + a (||Y_hat|| - ||Y||)^2 (step 3), the norms taken per row as each row is
    one sample; the official notebook takes one norm over the whole batch instead."""
    mse = (pred - target).pow(2).mean()
    return (1 - alpha) * mse + alpha * (pred.norm(dim=1) - target.norm(dim=1)).pow(2).mean()


def train_predictors(factors, epochs=10, batch_size=64, lr=1e-3, alpha=5e-4, holdout=(), seed=0):
    """One predictor per weight type; AdamW and the paper's settings as defaults. {kind: net}."""
    predictors = {}
    for kind, (_, _, V) in factors.items():
        torch.manual_seed(seed)
        x, y, _ = training_pairs(V, holdout)
        net = predictor(y.shape[1])
        opt = torch.optim.AdamW(net.parameters(), lr=lr)
        bar = tqdm(range(epochs), desc=f"LESA {kind}", leave=False)
        for _ in bar:
            total = torch.zeros(())
            for i in torch.randperm(len(x)).split(batch_size):
                loss = lesa_loss(net(x[i]), y[i], alpha)
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += loss.detach() * len(i)
            bar.set_postfix(loss=f"{float(total) / len(x):.3e}")
        predictors[kind] = net.eval()
    return predictors


@torch.no_grad()
def predict_layer(factors, predictors, l, above=None):
    """{kind: W_hat} for a new layer between layers l and `above` (default l + 1):
    V_hat = f([V_l, V_above]), W_hat = U S V_hat (step 4)."""
    above = l + 1 if above is None else above
    out = {}
    for kind, (U, S, V) in factors.items():
        v_hat = predictors[kind](torch.cat([V[l], V[above]], dim=1))   # (r, d_in)
        out[kind] = U @ (S[:, None] * v_hat)                             # (out, d_in)
    return out


def default_positions(n_layer, n_new=None):
    """Insert before layers of the upper half: after n_new of the layers n_layer/2 - 1 .. n_layer - 2,
    evenly spaced, both ends included. With n_new None, after all of them: the paper's
    Llama-3-8B 32 -> 48 (after layers 15..30); for SmolLM2, 30 -> 45 (after 14..28)."""
    slots = list(range(n_layer // 2 - 1, n_layer - 1))
    n_new = len(slots) if n_new is None else n_new
    if not 0 < n_new <= len(slots):
        raise dlo.ExpansionError(f"the upper half of {n_layer} layers has room for 1 .. {len(slots)} "
                                 f"LESA layers, not {n_new}")
    step = (len(slots) - 1) / max(n_new - 1, 1)
    return [slots[int(i * step + 0.5)] for i in range(n_new)]   # half-up rounding keeps them distinct


def expand_lesa(model, after=None, factors=None, predictors=None, **train_kw):
    """A deeper model with a LESA layer after each original layer in `after` (default:
    default_positions). Each new layer is planned as a copy of layer l, which brings l's
    norms, and its seven linears are then overwritten with the prediction between l and l + 1.
    Factors and predictors are computed (train_kw go to train_predictors) when not given."""
    L = model.config.n_layer
    if getattr(model.config, "arch", "llama") != "llama":
        raise dlo.ExpansionError("LESA predicts the seven linears of a Llama block; this model is "
                                 f"{model.config.arch}")
    after = default_positions(L) if after is None else list(after)
    bad = [l for l in after if not 0 <= l < L - 1]
    if bad:
        raise dlo.ExpansionError(f"LESA inserts between two layers: positions {bad} must be in 0 .. {L - 2}")
    factors = svd_factors(model) if factors is None else factors
    predictors = train_predictors(factors, **train_kw) if predictors is None else predictors
    plan = dlo.index_plan(L, after, dlo.layer_weights)
    new = dlo.rebuild(model, plan)
    with torch.no_grad():
        for j, (l, init) in enumerate(plan):
            if init is not None:
                for kind, w in predict_layer(factors, predictors, l).items():
                    weight(new.layers[j], kind).copy_(w)
    return new
