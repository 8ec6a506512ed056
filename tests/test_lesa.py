"""LESA on tiny models: exact factors, placement and norms, a predictor that learns, held-out layers."""
import pytest
import torch

import dlo
import lesa
from conftest import tiny_model


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls gain nothing from threads, and on a busy 2-core machine OpenMP's waiting
    threads made one tiny training run 250 times slower (90 s against 0.4 s)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_factors_reconstruct_every_layer_and_match_the_svd():
    model = tiny_model(n_layer=6)
    for kind, (U, S, V) in lesa.svd_factors(model).items():
        mats = [lesa.weight(layer, kind) for layer in model.layers]
        assert torch.allclose(S, torch.linalg.svdvals(torch.cat(mats, dim=1)), atol=1e-5), kind
        assert torch.allclose(U.T @ U, torch.eye(len(S)), atol=1e-5), kind
        for l, w in enumerate(mats):
            assert torch.allclose(U @ (S[:, None] * V[l]), w, atol=1e-5), (kind, l)


def test_excluded_layers_do_not_shape_the_basis_yet_reconstruct():
    model, other = tiny_model(n_layer=6), tiny_model(n_layer=6)
    changed = tiny_model(seed=1, n_layer=6).layers[2].state_dict()
    other.layers[2].load_state_dict(changed)     # the two models differ only in layer 2
    a, b = lesa.svd_factors(model, exclude=[2]), lesa.svd_factors(other, exclude=[2])
    for kind in lesa.KINDS:
        (Ua, Sa, Va), (Ub, Sb, Vb) = a[kind], b[kind]
        assert torch.equal(Ua, Ub) and torch.equal(Sa, Sb) and torch.equal(Va[3], Vb[3])
        assert torch.allclose(Ub @ (Sb[:, None] * Vb[2]), lesa.weight(other.layers[2], kind), atol=1e-5)


def test_predicted_layers_land_where_asked_with_neighbour_norms():
    model = tiny_model(n_layer=6)
    factors = lesa.svd_factors(model)
    predictors = lesa.train_predictors(factors, epochs=1)
    big = lesa.expand_lesa(model, [2, 4], factors, predictors)
    assert big.config.n_layer == 8 and big.config.new_layers == (3, 6)
    for j, i in zip([0, 1, 2, 4, 5, 7], range(6)):    # the originals, shifted past the new layers
        for name, p in model.layers[i].state_dict().items():
            assert torch.equal(big.layers[j].state_dict()[name], p), (j, name)
    for j, l in ((3, 2), (6, 4)):
        new = big.layers[j]
        for norm in ("input_layernorm", "post_attention_layernorm"):
            assert torch.equal(getattr(new, norm).weight, getattr(model.layers[l], norm).weight)
        want = lesa.predict_layer(factors, predictors, l)
        for kind in lesa.KINDS:
            assert torch.allclose(lesa.weight(new, kind), want[kind])
            assert not torch.allclose(lesa.weight(new, kind), lesa.weight(model.layers[l], kind))


def test_expand_defaults_to_the_upper_half_and_rejects_the_top():
    model = tiny_model(n_layer=6)
    big = lesa.expand_lesa(model, epochs=1)
    assert big.config.new_layers == (3, 5, 7)     # after originals 2, 3 and 4
    with pytest.raises(dlo.ExpansionError):
        lesa.expand_lesa(model, [5], epochs=1)   # no layer above the last one


def test_predictor_learns():
    model = tiny_model(n_layer=8)
    factors = {"up_proj": lesa.svd_factors(model, kinds=("up_proj",))["up_proj"]}
    x, y, _ = lesa.training_pairs(factors["up_proj"][2])
    torch.manual_seed(0)
    with torch.no_grad():
        before = float(lesa.lesa_loss(lesa.predictor(y.shape[1])(x), y))
    net = lesa.train_predictors(factors, epochs=30, batch_size=16)["up_proj"]
    with torch.no_grad():
        assert float(lesa.lesa_loss(net(x), y)) < 0.5 * before


def test_held_out_layers_never_enter_training():
    V = [torch.full((2, 3), float(l)) for l in range(10)]
    x, y, layers = lesa.training_pairs(V, holdout=[4, 5])
    assert layers == [1, 2, 7, 8]
    seen = set(y[:, 0].tolist()) | set(x[:, 0].tolist()) | set(x[:, 3].tolist())   # targets, inputs
    assert seen == {0.0, 1.0, 2.0, 3.0, 6.0, 7.0, 8.0, 9.0}
    # end to end: changing a held-out layer leaves the trained predictor bit for bit the same
    model = tiny_model(n_layer=6)
    factors = lesa.svd_factors(model, kinds=("v_proj",), exclude=[3])
    U, S, V = factors["v_proj"]
    moved = {"v_proj": (U, S, V[:3] + [torch.randn_like(V[3])] + V[4:])}
    a = lesa.train_predictors(factors, epochs=2, holdout=[3])["v_proj"]
    b = lesa.train_predictors(moved, epochs=2, holdout=[3])["v_proj"]
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_default_positions_follow_the_paper():
    assert lesa.default_positions(32) == list(range(15, 31))    # Llama-3-8B 32 -> 48
    pos = lesa.default_positions(30, 10)
    assert len(set(pos)) == 10 and pos == sorted(pos) and pos[0] == 14 and pos[-1] == 28
    with pytest.raises(dlo.ExpansionError):
        lesa.default_positions(30, 16)
