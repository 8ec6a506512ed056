"""LESA on tiny models: exact SVD reconstruction, placement, norms, held-out layers."""
import torch

import lesa
from conftest import tiny_model


def test_svd_reconstructs_every_layer_exactly():
    model = tiny_model(n_layer=6)
    for kind, (U, S, V) in lesa.svd_factors(model).items():
        for l, layer in enumerate(model.layers):
            w = lesa.weight(layer, kind)
            assert torch.allclose(U @ torch.diag(S) @ V[l], w, atol=1e-5), (kind, l)


def test_predicted_layers_land_where_asked_with_neighbour_norms():
    model = tiny_model(n_layer=6)
    factors = lesa.svd_factors(model)
    nets = lesa.train_predictors(factors, epochs=1)
    big = lesa.expand_lesa(model, [2, 4], factors, nets)
    assert big.config.n_layer == 8 and big.config.new_layers == (3, 6)
    originals = [0, 1, 2, 4, 5, 7]    # new layers sit right after originals 2 and 4
    for j, i in zip(originals, range(6)):
        assert torch.equal(big.layers[j].mlp.up_proj.weight, model.layers[i].mlp.up_proj.weight)
    for j, l in ((3, 2), (6, 4)):
        new = big.layers[j]
        for norm in ("input_layernorm", "post_attention_layernorm"):
            assert torch.equal(getattr(new, norm).weight, getattr(model.layers[l], norm).weight)
        want = lesa.predict_weights(factors, nets, l, l + 1)
        for kind in lesa.KINDS:
            assert torch.allclose(lesa.weight(new, kind), want[kind])
            assert not torch.allclose(lesa.weight(new, kind), lesa.weight(model.layers[l], kind))


def test_predictor_learns():
    model = tiny_model(n_layer=8)
    factors = {k: v for k, v in lesa.svd_factors(model).items() if k == "mlp.up_proj"}
    x, y, _ = lesa.training_pairs(factors["mlp.up_proj"][2])
    with torch.no_grad():
        before = float(lesa.lesa_loss(lesa.predictor(32)(x), y))
    net = lesa.train_predictors(factors, epochs=30, batch_size=16)["mlp.up_proj"]
    with torch.no_grad():
        assert float(lesa.lesa_loss(net(x), y)) < 0.5 * before


def test_held_out_layers_never_enter_training():
    V = [torch.full((2, 3), float(l)) for l in range(10)]
    x, y, layers = lesa.training_pairs(V, holdout=[4])
    assert layers == [1, 2, 6, 7, 8]
    assert 4.0 not in set(y[:, 0].tolist()) | set(x[:, 0].tolist()) | set(x[:, 3].tolist())


def test_default_positions_are_in_the_upper_half():
    pos = lesa.default_positions(30, 10)
    assert len(pos) == 10 and min(pos) >= 15 and max(pos) <= 28
