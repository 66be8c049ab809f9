"""Conv2d and pooling options through BackPACK, against torch.func in float64 (issue #11).

BackPACK 1.7.1 passes a Conv2d layer's ``padding`` on to the convolutions of its derivatives,
where ``"same"`` pads for the wrong kernel and ``padding_mode`` is ignored (module docstring of
:mod:`mbf_analysis.curvature.backend`). Every option the toolkit accepts is pinned here, for the
per-sample gradients, the dense Fisher of every kind (empirical, exact with both backends,
Monte Carlo with the same sampled labels), the mini-blocks and the per-sample path of
:func:`collect`; every option it refuses is refused by layer name at each entry point, with a
replacement that computes the same function.

The tested layer sits behind a trainable 1×1 convolution, so BackPACK's exact backend also
backpropagates through its input Jacobian.
"""

import re
from collections import OrderedDict

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev, vmap

from mbf_analysis.curvature import (
    KFAC_FACTORS,
    PER_SAMPLE_GRAD,
    collect,
    fisher_rows,
    layer_fisher,
    likelihood_of,
    miniblock_fisher,
    per_sample_grads,
)
from mbf_analysis.errors import NonFiniteError, UnsupportedModuleError
from mbf_analysis.layout import model_layouts

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths"),
]

DT = torch.float64
N = 5
M = 2  # Monte-Carlo labels per input
KINDS = ["empirical", "exact", "mc"]


def _frozen(module):
    return module.requires_grad_(False)


# (layers between the 1×1 stem and the head, input [C, H, W], whether BackPACK's exact backend
# applies). The expected exact-chain flag is written out, not computed by the toolkit.
SUPPORTED = {
    "same-3x3": (lambda: [nn.Conv2d(2, 4, 3, padding="same")], (2, 6, 6), True),
    "same-3x5": (lambda: [nn.Conv2d(2, 4, (3, 5), padding="same")], (2, 6, 7), True),
    "same-dilation-2": (lambda: [nn.Conv2d(2, 3, 3, padding="same", dilation=2)], (2, 6, 6), True),
    "same-2x2-dilation-(2,4)": (
        lambda: [nn.Conv2d(2, 3, 2, padding="same", dilation=(2, 4))],
        (2, 5, 6),
        True,
    ),
    "same-groups-2-no-bias": (
        lambda: [nn.Conv2d(2, 4, 3, padding="same", groups=2, bias=False)],
        (2, 5, 5),
        True,
    ),
    "valid-stride-2": (lambda: [nn.Conv2d(2, 3, 3, padding="valid", stride=2)], (2, 7, 6), True),
    "padding-(1,2)-kernel-3x5": (
        lambda: [nn.Conv2d(2, 3, (3, 5), padding=(1, 2))],
        (2, 5, 5),
        True,
    ),
    "stride-3-kernel-2": (lambda: [nn.Conv2d(2, 3, 2, stride=3)], (2, 7, 8), True),
    "stride-(2,3)-dilation-(2,1)-padding-(2,1)": (
        lambda: [nn.Conv2d(2, 3, 3, stride=(2, 3), dilation=(2, 1), padding=(2, 1))],
        (2, 8, 7),
        True,
    ),
    "depthwise-dilation-2": (
        lambda: [nn.Conv2d(2, 2, 3, groups=2, dilation=2, padding=1)],
        (2, 6, 6),
        True,
    ),
    "reflect-padding-0": (
        lambda: [nn.Conv2d(2, 3, 3, padding_mode="reflect")],
        (2, 5, 5),
        True,
    ),
    "zeropad-instead-of-asymmetric-same": (
        lambda: [nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(2, 3, 2)],
        (2, 5, 5),
        True,
    ),
    "reflectionpad-instead-of-reflect": (
        lambda: [nn.ReflectionPad2d((1, 1, 1, 1)), nn.Conv2d(2, 3, 3)],
        (2, 5, 5),
        False,
    ),
    "frozen-asymmetric-same": (
        lambda: [_frozen(nn.Conv2d(2, 3, 2, padding="same")), nn.Conv2d(3, 2, 3)],
        (2, 5, 5),
        False,
    ),
    "frozen-reflect-padding-1": (
        lambda: [_frozen(nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect")), nn.Tanh()],
        (2, 5, 5),
        False,
    ),
    "maxpool-padding-dilation-ceil": (
        lambda: [
            nn.Conv2d(2, 3, 3),
            nn.MaxPool2d(2, stride=2, padding=1, dilation=2, ceil_mode=True),
        ],
        (2, 7, 7),
        True,
    ),
    "avgpool-padding-stride": (
        lambda: [nn.Conv2d(2, 3, 3), nn.AvgPool2d(3, stride=2, padding=1)],
        (2, 7, 7),
        True,
    ),
    "avgpool-divisor-override": (
        lambda: [nn.Conv2d(2, 3, 3), nn.AvgPool2d(2, divisor_override=3)],
        (2, 7, 7),
        False,
    ),
    "avgpool-ceil-mode": (
        lambda: [nn.Conv2d(2, 3, 3), nn.AvgPool2d(2, ceil_mode=True)],
        (2, 7, 7),
        False,
    ),
    "avgpool-no-count-include-pad": (
        lambda: [nn.Conv2d(2, 3, 3), nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False)],
        (2, 7, 7),
        False,
    ),
}


def _model(layers, in_shape, first=False):
    stem = [] if first else [nn.Conv2d(in_shape[0], 2, 1)]
    body = nn.Sequential(*stem, *layers, nn.Tanh(), nn.Flatten()).to(DT)
    with torch.no_grad():
        width = body(torch.zeros(1, *in_shape, dtype=DT)).shape[1]
    return nn.Sequential(*body, nn.Linear(width, 3)).to(DT)


def _problem(case, first=False):
    torch.manual_seed(0)
    build, in_shape, _ = SUPPORTED[case]
    model = _model(build(), in_shape, first)
    return model, torch.randn(N, *in_shape, dtype=DT), torch.randint(0, 3, (N,))


# ----------------------------------------------------------------------------- references
def _ce(f, y):
    """Cross-entropy of one sample, written out."""
    return -torch.log_softmax(f, 0).gather(0, y.reshape(1)).squeeze(0)


def _trainable(model):
    return {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}


def _reference_per_sample(model, x, y):
    def loss(p, xi, yi):
        return _ce(functional_call(model, p, (xi[None],))[0], yi)

    return vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(_trainable(model), x, y)


def _reference_efm(model, x, labels):
    """``(1/N) Σ_n (1/K) Σ_k g_nk g_nkᵀ`` for the label sets ``labels`` (K of them)."""
    out = {}
    for y in labels:
        grads = _reference_per_sample(model, x, y)
        for name, layout in model_layouts(model).items():
            g = layout.flatten(grads)
            out[name] = out.get(name, 0) + g.T @ g / (len(x) * len(labels))
    return out


def _reference_ggn(model, x):
    """``(1/N) Σ_n J_nᵀ H_n J_n`` with torch.func's Jacobian and the Hessian of the written-out
    cross-entropy (which does not depend on the label)."""
    jac = vmap(jacrev(lambda p, xi: functional_call(model, p, (xi[None],))[0]), (None, 0))(
        _trainable(model), x
    )
    f = model(x).detach()
    hess = torch.stack([hessian(lambda o: _ce(o, torch.tensor(0)))(fi) for fi in f])
    out = {}
    for name, layout in model_layouts(model).items():
        j = layout.flatten(jac)  # [N, C, d]
        out[name] = torch.einsum("nci,ncd,ndj->ij", j, hess, j) / len(x)
    return out


def _sampled_labels(model, x, seed):
    """The labels ``fisher_rows`` draws for ``kind="mc"``: M draws, one generator, up front."""
    likelihood = likelihood_of(nn.CrossEntropyLoss())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        outputs = model(x)
    return [likelihood.sample_targets(outputs, generator) for _ in range(M)]


def _reference(model, x, y, kind):
    if kind == "empirical":
        return _reference_efm(model, x, [y])
    if kind == "exact":
        return _reference_ggn(model, x)
    return _reference_efm(model, x, _sampled_labels(model, x, seed=1))


def _dense_from_rows(rows_iter, n):
    out = {}
    for rows in rows_iter:
        for name, r in rows.items():
            out[name] = out.get(name, 0) + r.T @ r
    return {name: value / n for name, value in out.items()}


def _assert_all_close(got, ref):
    assert set(got) == set(ref)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- supported options
def test_same_padding_on_the_issue_case_6x6_first_layer():
    """The case of the issue: ``padding="same"``, 3×3, first layer, 6×6 input."""
    model, x, y = _problem("same-3x3", first=True)
    got = per_sample_grads(model, nn.CrossEntropyLoss(), x, y)
    _assert_all_close(got, _reference_per_sample(model, x, y))
    for kind in KINDS:
        fisher = layer_fisher(
            model,
            nn.CrossEntropyLoss(),
            x,
            y,
            kind=kind,
            mc_samples=M,
            generator=torch.Generator().manual_seed(1),
        )
        _assert_all_close(fisher, _reference(model, x, y, kind))


@pytest.mark.parametrize("case", list(SUPPORTED))
def test_per_sample_grads_match_vmap(case):
    model, x, y = _problem(case)
    got = per_sample_grads(model, nn.CrossEntropyLoss(), x, y, chunk_size=3)
    _assert_all_close(got, _reference_per_sample(model, x, y))


@pytest.mark.parametrize("case", list(SUPPORTED))
def test_empirical_fisher_matches_outer_products(case):
    model, x, y = _problem(case)
    got = layer_fisher(model, nn.CrossEntropyLoss(), x, y, kind="empirical", chunk_size=3)
    _assert_all_close(got, _reference(model, x, y, "empirical"))


@pytest.mark.parametrize("case", list(SUPPORTED))
def test_mc_fisher_matches_the_efm_of_the_same_sampled_labels(case):
    model, x, y = _problem(case)
    got = layer_fisher(
        model,
        nn.CrossEntropyLoss(),
        x,
        y,
        kind="mc",
        mc_samples=M,
        generator=torch.Generator().manual_seed(1),
        chunk_size=3,
    )
    _assert_all_close(got, _reference(model, x, y, "mc"))


EXACT_CASES = [
    (case, backend)
    for case, (_, _, exact_chain) in SUPPORTED.items()
    for backend in ["auto", "output_hessian"] + (["backpack"] if exact_chain else [])
]


@pytest.mark.parametrize(("case", "backend"), EXACT_CASES)
def test_exact_fisher_matches_jacobian_hessian_ggn(case, backend):
    model, x, y = _problem(case)
    rows = fisher_rows(
        model, nn.CrossEntropyLoss(), x, y, kind="exact", exact_backend=backend, chunk_size=3
    )
    _assert_all_close(_dense_from_rows(rows, N), _reference(model, x, y, "exact"))


@pytest.mark.parametrize("case", [c for c, (_, _, chain) in SUPPORTED.items() if not chain])
def test_backpack_exact_backend_is_refused_where_backpack_is_wrong(case):
    model, x, y = _problem(case)
    with pytest.raises(UnsupportedModuleError, match="output_hessian"):
        next(
            fisher_rows(model, nn.CrossEntropyLoss(), x, y, kind="exact", exact_backend="backpack")
        )


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", list(SUPPORTED))
def test_miniblocks_are_the_diagonal_blocks_of_the_reference(case, kind):
    model, x, y = _problem(case)
    got = miniblock_fisher(
        model,
        nn.CrossEntropyLoss(),
        x,
        y,
        kind=kind,
        mc_samples=M,
        generator=torch.Generator().manual_seed(1),
        chunk_size=3,
    )
    ref = {}
    for name, dense in _reference(model, x, y, kind).items():
        ref.update(model_layouts(model)[name].extract_blocks(dense))
    _assert_all_close(got, ref)


@pytest.mark.parametrize("case", list(SUPPORTED))
def test_collect_per_sample_grads_match_vmap(case):
    model, x, y = _problem(case)
    stats = collect(model, nn.CrossEntropyLoss(), x, y, {PER_SAMPLE_GRAD})
    ref = _reference_per_sample(model, x, y)
    layouts = model_layouts(model)
    _assert_all_close(stats.per_sample, {name: lay.flatten(ref) for name, lay in layouts.items()})
    _assert_all_close(stats.grad, {name: lay.flatten(ref).mean(0) for name, lay in layouts.items()})


def test_kfac_factors_are_unchanged_by_the_integer_padding_of_the_backpack_pass():
    """``collect`` runs KFAC's hooks inside the BackPACK pass, where the layer's "same" padding
    is an integer tuple: the factors must equal those of a pass without BackPACK."""
    model, x, y = _problem("same-3x3")
    both = collect(model, nn.CrossEntropyLoss(), x, y, {PER_SAMPLE_GRAD, KFAC_FACTORS})
    alone = collect(model, nn.CrossEntropyLoss(), x, y, {KFAC_FACTORS})
    for name, (a, g) in alone.kfac.items():
        torch.testing.assert_close(both.kfac[name].A, a, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(both.kfac[name].G, g, rtol=1e-12, atol=1e-14)
    ref = _reference_per_sample(model, x, y)
    for name, layout in model_layouts(model).items():
        torch.testing.assert_close(both.per_sample[name], layout.flatten(ref))


# ----------------------------------------------------------------------------- module untouched
def _paddings(model):
    return [
        (m.padding, list(m._reversed_padding_repeated_twice))
        for m in model.modules()
        if isinstance(m, nn.Conv2d)
    ]


def test_string_padding_is_restored_after_every_call():
    model, x, y = _problem("same-3x3")
    before = _paddings(model)
    assert before[1][0] == "same"
    per_sample_grads(model, nn.CrossEntropyLoss(), x, y)
    assert _paddings(model) == before
    for kind in KINDS:
        layer_fisher(model, nn.CrossEntropyLoss(), x, y, kind=kind)
        assert _paddings(model) == before
    collect(model, nn.CrossEntropyLoss(), x, y, {PER_SAMPLE_GRAD})
    assert _paddings(model) == before


def test_string_padding_is_restored_after_an_error_and_an_abandoned_stream():
    model, x, y = _problem("same-3x3")
    before = _paddings(model)
    bad = x.clone()
    bad[1, 0, 2, 2] = float("nan")
    with pytest.raises(NonFiniteError):
        per_sample_grads(model, nn.CrossEntropyLoss(), bad, y)
    assert _paddings(model) == before
    rows = fisher_rows(model, nn.CrossEntropyLoss(), x, y, kind="exact", chunk_size=2)
    next(rows)
    assert model[1].padding == (1, 1)  # inside the pass BackPACK sees the integer padding
    rows.close()
    assert _paddings(model) == before


# ----------------------------------------------------------------------------- refused options
# (layer, input [C, H, W], the padding module and its F.pad tuple the message proposes)
REFUSED = {
    "same-2x2": (lambda: nn.Conv2d(2, 3, 2, padding="same"), "nn.ZeroPad2d", (0, 1, 0, 1)),
    "same-3x2": (lambda: nn.Conv2d(2, 3, (3, 2), padding="same"), "nn.ZeroPad2d", (0, 1, 1, 1)),
    "same-2x3-dilation-(3,1)": (
        lambda: nn.Conv2d(2, 3, (2, 3), padding="same", dilation=(3, 1)),
        "nn.ZeroPad2d",
        (1, 1, 1, 2),
    ),
    "reflect-padding-1": (
        lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"),
        "nn.ReflectionPad2d",
        (1, 1, 1, 1),
    ),
    "replicate-padding-(1,2)": (
        lambda: nn.Conv2d(2, 3, 3, padding=(1, 2), padding_mode="replicate"),
        "nn.ReplicationPad2d",
        (2, 2, 1, 1),
    ),
    "circular-same-3x3": (
        lambda: nn.Conv2d(2, 3, 3, padding="same", padding_mode="circular"),
        "nn.CircularPad2d",
        (1, 1, 1, 1),
    ),
    "reflect-same-2x2": (
        lambda: nn.Conv2d(2, 3, 2, padding="same", padding_mode="reflect"),
        "nn.ReflectionPad2d",
        (0, 1, 0, 1),
    ),
}


def _refused_problem(case):
    """A model that runs (so only the refusal stops the extraction), with the layer nested."""
    torch.manual_seed(0)
    layers = OrderedDict(
        stem=nn.Conv2d(2, 2, 1),
        body=nn.Sequential(OrderedDict(conv=REFUSED[case][0](), act=nn.Tanh())),
        flatten=nn.Flatten(),
    )
    x = torch.randn(N, 2, 6, 6, dtype=DT)
    with torch.no_grad():
        width = nn.Sequential(layers).to(DT)(x).shape[1]
    model = nn.Sequential(OrderedDict(**layers, fc=nn.Linear(width, 3))).to(DT)
    model(x)
    return model, x, torch.randint(0, 3, (N,))


ENTRY_POINTS = {
    "per_sample_grads": lambda m, x, y: per_sample_grads(m, nn.CrossEntropyLoss(), x, y),
    **{
        f"layer_fisher-{kind}": (
            lambda m, x, y, kind=kind: layer_fisher(m, nn.CrossEntropyLoss(), x, y, kind=kind)
        )
        for kind in KINDS
    },
    "miniblock_fisher": lambda m, x, y: miniblock_fisher(m, nn.CrossEntropyLoss(), x, y),
    "fisher_rows-output_hessian": lambda m, x, y: next(
        fisher_rows(m, nn.CrossEntropyLoss(), x, y, kind="exact", exact_backend="output_hessian")
    ),
    "collect-per_sample": lambda m, x, y: collect(
        m, nn.CrossEntropyLoss(), x, y, {PER_SAMPLE_GRAD}
    ),
}


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_option_names_the_layer_and_the_replacement(case, entry):
    model, x, y = _refused_problem(case)
    _, pad_module, pad = REFUSED[case]
    with pytest.raises(
        UnsupportedModuleError, match=r"'body\.conv'.*" + re.escape(f"{pad_module}({pad})")
    ):
        ENTRY_POINTS[entry](model, x, y)


@pytest.mark.parametrize("case", list(REFUSED))
def test_proposed_replacement_computes_the_same_layer(case):
    """The padding module the message proposes, then ``padding=0``, is the refused layer."""
    torch.manual_seed(0)
    build, pad_module, pad = REFUSED[case]
    conv = build().to(DT)
    replacement = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        dilation=conv.dilation,
        groups=conv.groups,
    ).to(DT)
    replacement.load_state_dict(conv.state_dict())
    padder = getattr(nn, pad_module.removeprefix("nn."))(pad)
    x = torch.randn(3, 2, 6, 7, dtype=DT)
    torch.testing.assert_close(replacement(padder(x)), conv(x), rtol=0, atol=0)


def test_kfac_refuses_asymmetric_same_with_the_same_replacement():
    """KFAC's hooks share the padding logic: without per-sample gradients (no BackPACK pass)
    ``collect`` refuses the layer for KFAC, proposing the same ``nn.ZeroPad2d``."""
    model, x, y = _refused_problem("same-3x2")
    with pytest.raises(UnsupportedModuleError, match=r"KFAC factors of module 'body\.conv'.*"):
        collect(model, nn.CrossEntropyLoss(), x, y, {KFAC_FACTORS})
    with pytest.raises(UnsupportedModuleError, match=re.escape("nn.ZeroPad2d((0, 1, 1, 1))")):
        collect(model, nn.CrossEntropyLoss(), x, y, {KFAC_FACTORS})
