"""Training runs: presets against the paper's tables, the loss convention, the loop's limits,
logs and failures, comparisons, grid search and the training-curve figure."""

import dataclasses
import math
from pathlib import Path

import matplotlib
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mbf_analysis.data import Dataset, load_dataset
from mbf_analysis.models import build_model
from mbf_analysis.optim import KFAC
from mbf_analysis.optim.kfac import kfac_true_step
from mbf_analysis.plotting import plot_training_curves
from mbf_analysis.training import (
    GRIDS,
    LOG_COLUMNS,
    OPTIMIZERS,
    PRESETS,
    PROBLEMS,
    CsvLog,
    TrainingDiverged,
    augment_batch,
    compare,
    get_preset,
    get_problem,
    grid_search,
    lr_at_epoch,
    summarize,
    train,
)
from mbf_analysis.training import loop as training_loop
from mbf_analysis.training.presets import (
    FAST_OPTIMIZERS,
    GENERIC_OPTIMIZERS,
    KRONECKER_SCHEDULE,
    PRESET_SETS,
)

matplotlib.use("Agg")

_BESIDE_REPO = Path(__file__).resolve().parents[2] / "shared" / "data"
SHARED_DATA = _BESIDE_REPO if _BESIDE_REPO.is_dir() else Path("/work/shared/data")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


# ----------------------------------------------------------------------------- presets
@pytest.mark.parametrize(
    "problem, optimizer, lr, damping",
    [  # Table 4: (lr, damping)
        ("mnist-ae", "mbf", 1e-5, 3e-4),
        ("mnist-ae", "kfac", 3e-3, 3e-1),
        ("mnist-ae", "adam", 3e-4, 1e-4),
        ("faces-ae", "mbf", 1e-6, 3e-3),
        ("faces-ae", "kfac", 1e-1, 1e1),
        ("curves-ae", "shampoo", 1e-3, 3e-3),
        ("curves-ae", "sgdm", 1e-2, None),
    ],
)
def test_autoencoder_presets_are_table_4(problem, optimizer, lr, damping):
    preset = PRESETS[problem, optimizer]
    assert (preset.lr, preset.damping, preset.weight_decay) == (lr, damping, 0.0)
    assert preset.source == "Table 4" and preset.lr_decay_every is None
    assert preset.time_budget == (2000.0 if problem == "faces-ae" else 500.0)


@pytest.mark.parametrize(
    "problem, optimizer, lr, weight_decay, epochs, every",
    [  # Table 8: (lr, wd); §6: epochs and the decay period K
        ("resnet32-cifar10", "mbf", 1e-4, 3e0, 200, 60),
        ("resnet32-cifar10", "kfac", 3e-3, 1e-1, 100, 80),
        ("resnet32-cifar10", "sgdm", 1e-1, 1e-2, 200, 40),
        ("vgg16-cifar100", "mbf", 3e-5, 1e1, 150, 50),
        ("vgg16-cifar100", "adam", 3e-5, 1e1, 200, 40),
        ("vgg11-svhn", "mbf", 1e-3, 3e-1, 150, 50),
        ("vgg11-svhn", "shampoo", 3e-3, 1e-1, 100, 60),
    ],
)
def test_cnn_presets_are_table_8_with_the_papers_schedule(
    problem, optimizer, lr, weight_decay, epochs, every
):
    preset = PRESETS[problem, optimizer]
    assert (preset.lr, preset.weight_decay) == (lr, weight_decay)
    assert (preset.epochs, preset.lr_decay_every, preset.lr_decay) == (epochs, every, 0.1)
    assert preset.source == "Table 8"


def test_cnn_dampings_and_periods_are_the_papers():
    for problem in ("resnet32-cifar10", "vgg16-cifar100", "vgg11-svhn"):
        assert PRESETS[problem, "mbf"].damping == 0.003
        assert PRESETS[problem, "kfac"].damping == 0.03
        assert PRESETS[problem, "adam"].damping == 1e-8
        for opt in ("mbf", "kfac", "shampoo"):
            assert (PRESETS[problem, opt].stat_period, PRESETS[problem, opt].inverse_period) == (
                10,
                100,
            )


def test_every_problem_and_optimizer_has_a_preset_and_a_grid():
    fast = {(p, o) for p in PROBLEMS for o in FAST_OPTIMIZERS}
    mlps = ("mnist-ae", "curves-ae", "faces-ae", "mlp-digits")  # the Linear-only methods
    generic = {(p, o) for p in mlps for o in GENERIC_OPTIMIZERS}
    assert fast | generic == set(PRESETS)
    assert set(OPTIMIZERS) == set(FAST_OPTIMIZERS) | set(GENERIC_OPTIMIZERS)
    for kind in ("autoencoder", "classifier"):
        assert set(GRIDS[kind]) == set(OPTIMIZERS)
    assert GRIDS["autoencoder"]["mbf"]["lr"] == (1e-7, 3e-7, 1e-6, 3e-6, 1e-5, 3e-5, 1e-4)
    assert "damping" not in GRIDS["autoencoder"]["sgdm"]
    assert len(set(GRIDS["autoencoder"]["kfac"]["lr"])) == len(GRIDS["autoencoder"]["kfac"]["lr"])
    assert GRIDS["classifier"]["mbf"]["weight_decay"] == (1e-2, 3e-2, 1e-1, 3e-1, 1e0, 3e0, 1e1)


def test_the_preset_sets_differ_only_where_the_paper_does_not_train():
    assert PRESET_SETS["paper"] == {} and set(PRESET_SETS["ours"]) == {("mnist-ae", "mbf")}
    for key in PRESETS:
        paper, ours = get_preset(*key, presets="paper"), get_preset(*key, presets="ours")
        assert paper == PRESETS[key]
        assert (paper == ours) == (key != ("mnist-ae", "mbf"))
    ours = get_preset("mnist-ae", "mbf")  # "ours" is the default
    assert (ours.lr, ours.damping) == (3e-5, 1e-2) and "diverges" in ours.source
    assert get_preset("mnist-ae", "mbf", presets="paper").lr == 1e-5
    with pytest.raises(ValueError, match="unknown preset set"):
        get_preset("mnist-ae", "mbf", presets="mine")


def test_the_generic_optimizers_have_the_kronecker_schedule_on_mlps_only():
    for (_problem, optimizer), preset in PRESETS.items():
        if optimizer not in GENERIC_OPTIMIZERS:
            continue
        inverse = None if optimizer == "ngd" else 100  # NGD solves exactly: no inverse period
        assert (preset.stat_period, preset.inverse_period) == (100, inverse)
        assert preset.options["fisher_fraction"] == KRONECKER_SCHEDULE["fisher_fraction"] == 0.25
        assert preset.options["kl_clip"] == 0.01 and preset.options["momentum"] == 0.9
    with pytest.raises(ValueError, match="Linear layers only"):
        get_preset("resnet32-cifar10", "kpsvd")


def test_get_preset_overrides_and_refuses_bad_values():
    preset = get_preset("mnist-ae", "mbf", lr=2e-5, damping=1e-3, weight_decay=0.5)
    assert (preset.lr, preset.damping, preset.weight_decay) == (2e-5, 1e-3, 0.5)
    assert PRESETS["mnist-ae", "mbf"].lr == 1e-5  # the table is untouched
    with pytest.raises(ValueError, match="sgdm has no damping"):
        get_preset("mnist-ae", "sgdm", damping=1e-3)
    with pytest.raises(ValueError, match="unknown optimizer 'lbfgs'"):
        get_preset("mnist-ae", "lbfgs")
    with pytest.raises(ValueError, match="unknown problem 'mnist'; choose one of mlp-digits"):
        get_preset("mnist", "mbf")
    with pytest.raises(ValueError, match="lr must be positive"):
        get_preset("mnist-ae", "mbf", lr=0.0)


def test_step_schedule_decays_by_a_tenth_every_k_epochs():
    preset = PRESETS["vgg16-cifar100", "mbf"]  # K = 50
    assert [lr_at_epoch(preset, e) / preset.lr for e in (0, 49, 50, 99, 100)] == pytest.approx(
        [1.0, 1.0, 0.1, 0.1, 0.01]
    )
    assert lr_at_epoch(PRESETS["mnist-ae", "adam"], 1000) == 3e-4


# ----------------------------------------------------------------------------- losses
def test_loss_convention_mean_over_samples_sum_over_pixels():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 784, generator=gen, dtype=torch.float64)
    pixels = torch.rand(5, 784, generator=gen, dtype=torch.float64)
    p = torch.sigmoid(logits)
    per_sample = -(pixels * p.log() + (1 - pixels) * (1 - p).log()).sum(1)
    mnist = get_problem("mnist-ae")
    torch.testing.assert_close(mnist.loss_fn(logits, pixels), per_sample.mean())
    # mean over samples: a duplicated batch has the same loss; sum over pixels: not a mean
    doubled = mnist.loss_fn(logits.repeat(2, 1), pixels.repeat(2, 1))
    torch.testing.assert_close(doubled, per_sample.mean())
    assert float(mnist.loss_fn(logits, pixels)) > 100 * float(
        F.binary_cross_entropy_with_logits(logits, pixels)
    )
    faces = get_problem("faces-ae")
    half_sq = 0.5 * ((logits - pixels) ** 2).sum(1).mean()
    torch.testing.assert_close(faces.loss_fn(logits, pixels), half_sq)
    classes = torch.randint(0, 10, (5,), generator=gen)
    torch.testing.assert_close(
        get_problem("mlp-digits").loss_fn(logits[:, :10], classes),
        -torch.log_softmax(logits[:, :10], 1)[torch.arange(5), classes].mean(),
    )
    assert get_problem("curves-ae").loss == "bce_sum"


def test_mnist_autoencoder_on_real_data_starts_near_543_and_sgdm_preset_descends():
    """The summed-over-pixels BCE of a fresh autoencoder is ≈ 543 per image (the paper's Table 4
    scale: 51-56 after training), and SGD-m at the paper's lr 3e-3 lowers it in a few steps."""
    log = train(
        "mnist-ae",
        "sgdm",
        max_steps=6,
        data_dir=SHARED_DATA,
        eval_samples=500,
        progress=False,
    )
    evals = log[log.kind == "eval"]
    assert 500 < evals.train_loss.iloc[0] < 600
    assert evals.train_loss.iloc[-1] < evals.train_loss.iloc[0] - 10
    assert log.kind.iloc[-1] == "end" and log.status.iloc[-1] == "max_steps"
    assert evals.test_accuracy.isna().all()


# ----------------------------------------------------------------------------- the loop
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_loss_decreases_on_mlp_digits_for_every_optimizer(optimizer, digits):
    log = train("mlp-digits", optimizer, epochs=3, dataset=digits, progress=False)
    evals = log[log.kind == "eval"]
    assert len(evals) == 4  # step 0 and every epoch
    assert evals.train_loss.iloc[-1] < 0.8 * evals.train_loss.iloc[0]
    assert evals.test_accuracy.iloc[-1] > 0.5
    steps = log[log.kind == "step"]
    assert list(steps.step) == list(range(1, 46))  # 1500 samples / 100 per batch × 3
    assert steps.epoch.iloc[-1] == 3.0
    assert (steps.wall_time.diff().dropna() >= 0).all()
    assert list(log.columns) == list(LOG_COLUMNS)


def test_time_budget_stops_the_run(digits):
    log = train("mlp-digits", "adam", time_budget=1e-9, epochs=100, dataset=digits, progress=False)
    assert (log.kind == "step").sum() == 1
    end = log.iloc[-1]
    assert (end.kind, end.status) == ("end", "time_budget")
    assert log.kind.iloc[-2] == "eval"  # a final evaluation at the stop


@pytest.mark.parametrize("optimizer", ["mbf", "kfac"])
def test_same_seed_same_run_other_seed_other_run(optimizer, digits):
    def losses(seed):
        log = train("mlp-digits", optimizer, epochs=1, seed=seed, dataset=digits, progress=False)
        return log[log.kind != "end"][["step", "loss", "train_loss", "test_accuracy"]]

    first = losses(3)
    pd.testing.assert_frame_equal(first, losses(3))
    assert not first.loss.equals(losses(4).loss)


def test_kfac_presets_are_the_papers_true_fisher_kfac():
    for (problem, optimizer), preset in PRESETS.items():
        if optimizer == "kfac":
            assert preset.options["fisher"] == "mc", problem
    assert isinstance(get_problem("mnist-ae").likelihood_loss(), nn.BCEWithLogitsLoss)
    assert isinstance(get_problem("faces-ae").likelihood_loss(), nn.MSELoss)
    assert isinstance(get_problem("mlp-digits").likelihood_loss(), nn.CrossEntropyLoss)


def test_training_kfac_records_sampled_label_statistics(monkeypatch, digits):
    """The loop's KFAC step is ``kfac_true_step`` with a generator seeded with the run's seed:
    its ``G`` after one step is that of a hand-made true-Fisher step on the same first batch,
    and differs from an empirical-Fisher run (real labels), while ``A`` is the same."""
    made = []

    def spy(name, model, preset, *args):
        made.append((make_optimizer(name, model, preset, *args), model))
        return made[-1][0]

    make_optimizer = training_loop.make_optimizer
    monkeypatch.setattr(training_loop, "make_optimizer", spy)
    seed = 5
    train("mlp-digits", "kfac", max_steps=1, seed=seed, dataset=digits, progress=False)
    preset = PRESETS["mlp-digits", "kfac"]
    empirical = dataclasses.replace(preset, options={**preset.options, "fisher": "empirical"})
    monkeypatch.setitem(PRESETS, ("mlp-digits", "kfac"), empirical)
    train("mlp-digits", "kfac", max_steps=1, seed=seed, dataset=digits, progress=False)
    (true_run, true_model), (empirical_run, empirical_model) = made
    assert true_run.param_groups[0]["fisher"] == "mc"
    assert empirical_run.param_groups[0]["fisher"] == "empirical"

    torch.manual_seed(seed)
    model = build_model("digits-mlp")
    index = torch.randperm(len(digits.train_x), generator=torch.Generator().manual_seed(seed))
    x, y = digits.train_x[index[:100]], digits.train_y[index[:100]]
    by_hand = make_optimizer("kfac", model, preset)
    assert isinstance(by_hand, KFAC)
    generator = torch.Generator().manual_seed(seed)
    kfac_true_step(by_hand, model, nn.CrossEntropyLoss(), x, y, generator=generator)
    by_hand.remove_hooks()

    def linear_weights(net):
        return [m.weight for m in net.modules() if isinstance(m, nn.Linear)]

    layers = list(
        zip(
            linear_weights(model),
            linear_weights(true_model),
            linear_weights(empirical_model),
            strict=True,
        )
    )
    assert len(layers) >= 2
    for ours, true_w, empirical_w in layers:
        true_state, empirical_state = true_run.state[true_w], empirical_run.state[empirical_w]
        torch.testing.assert_close(true_state["G"], by_hand.state[ours]["G"])
        torch.testing.assert_close(true_state["A"], empirical_state["A"])
        difference = (true_state["G"] - empirical_state["G"]).norm()
        assert difference > 0.05 * empirical_state["G"].norm()


def test_interrupted_run_leaves_a_valid_csv(tmp_path, digits):
    path = tmp_path / "log.csv"

    def stop(row):
        if row["step"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train("mlp-digits", "kfac", epochs=5, dataset=digits, csv_path=path, on_step=stop)
    saved = pd.read_csv(path)
    assert list(saved.columns) == list(LOG_COLUMNS)
    assert list(saved.kind) == ["eval", "step", "step", "step", "end"]
    assert saved.status.iloc[-1] == "interrupted"
    assert saved.loss.notna().sum() == 3


def _copy(dataset: Dataset) -> Dataset:
    return dataclasses.replace(dataset, train_x=dataset.train_x.clone())


def test_nan_loss_stops_with_an_error_that_keeps_the_log(tmp_path, digits):
    path = tmp_path / "log.csv"
    data = _copy(digits)

    def poison(row):  # the run trains on data.train_x itself (float32 on the CPU: no copy)
        if row["step"] == 2:
            data.train_x.fill_(math.nan)

    with pytest.raises(TrainingDiverged, match="sgdm on mlp-digits diverged at step 3") as err:
        train("mlp-digits", "sgdm", epochs=2, dataset=data, csv_path=path, on_step=poison)
    assert "minibatch loss is nan; lower the lr" in str(err.value) and str(path) in str(err.value)
    kept = err.value.log
    assert list(kept.kind) == ["eval", "step", "step", "end"]
    assert kept.status.iloc[-1] == "diverged"
    saved = pd.read_csv(path)
    pd.testing.assert_frame_equal(saved[["kind", "step", "loss"]], kept[["kind", "step", "loss"]])


def test_train_refuses_bad_limits_and_foreign_data(digits):
    with pytest.raises(ValueError, match="give time_budget"):
        train("mlp-digits", "mbf", dataset=digits)
    with pytest.raises(ValueError, match="epochs must be a positive integer"):
        train("mlp-digits", "mbf", epochs=0, dataset=digits)
    with pytest.raises(ValueError, match="time_budget must be a positive"):
        train("mlp-digits", "mbf", time_budget=-1.0, dataset=digits)
    with pytest.raises(ValueError, match="trains on 'mnist', got data set 'digits'"):
        train("mnist-ae", "mbf", max_steps=1, dataset=digits)


def test_csv_log_appends_and_refuses_a_foreign_file(tmp_path):
    path = tmp_path / "log.csv"
    for step in (1, 2):
        log = CsvLog(path)
        log.write({"kind": "step", "step": step})
        log.close()
    assert list(pd.read_csv(path).step) == [1, 2]
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="other columns than a training log"):
        CsvLog(other)


def test_augment_batch_crops_and_flips_reproducibly():
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.float64).view(2, 3, 4, 4)
    same = augment_batch(images, torch.Generator().manual_seed(0), padding=0)
    for got, image in zip(same, images, strict=True):
        assert torch.equal(got, image) or torch.equal(got, image.flip(-1))
    a = augment_batch(images, torch.Generator().manual_seed(1), padding=2)
    b = augment_batch(images, torch.Generator().manual_seed(1), padding=2)
    assert a.shape == images.shape and torch.equal(a, b)
    # every output pixel is an input pixel of the same image and channel, or padding 0
    for i in range(2):
        for c in range(3):
            values = set(images[i, c].flatten().tolist()) | {0.0}
            assert set(a[i, c].flatten().tolist()) <= values


# ----------------------------------------------------------------------------- several runs
def test_compare_runs_every_optimizer_on_the_same_limits_and_keeps_divergence(digits):
    log = compare("mlp-digits", ["sgdm", "adam"], max_steps=4, dataset=digits, progress=False)
    summary = summarize(log)
    assert list(summary.optimizer) == ["sgdm", "adam"]
    assert list(summary.status) == ["max_steps", "max_steps"] and list(summary.steps) == [4, 4]
    broken = _copy(digits)
    broken.train_x.fill_(math.nan)
    blown = summarize(compare("mlp-digits", ["sgdm"], epochs=1, dataset=broken, progress=False))
    assert blown.status.iloc[0] == "diverged" and math.isnan(blown.train_loss.iloc[0])


def test_grid_search_picks_the_best_setting(digits):
    frame = grid_search(
        "mlp-digits",
        "sgdm",
        lrs=[1e-4, 0.05],
        weight_decays=[0.0],
        epochs=2,
        dataset=digits,
        progress=False,
    )
    assert list(frame.lr) == [1e-4, 0.05]
    assert frame.best.sum() == 1
    assert frame.loc[frame.best, "lr"].item() == 0.05
    assert frame.loc[frame.best, "score"].item() == frame.test_accuracy.max()


def test_grid_search_marks_no_best_when_every_point_diverges(digits):
    broken = _copy(digits)
    broken.train_x.fill_(math.nan)
    frame = grid_search(
        "mlp-digits", "adam", lrs=[1e-3, 1e-2], max_steps=2, dataset=broken, progress=False
    )
    assert list(frame.status) == ["diverged", "diverged"]
    assert not frame.best.any()


def test_training_curves_one_line_per_optimizer_log_scale(digits):
    log = compare("mlp-digits", ["sgdm", "mbf"], epochs=2, dataset=digits, progress=False)
    fig = plot_training_curves(log, ("wall_time", "epoch"), y="train_loss")
    axes = fig.get_axes()
    assert len(axes) == 2
    for ax in axes:
        assert [line.get_label() for line in ax.get_lines()] == ["sgdm", "mbf"]
        assert ax.get_yscale() == "log"
        assert len(ax.get_lines()[0].get_xdata()) == 3  # evaluations at epochs 0, 1, 2
    assert list(axes[1].get_lines()[0].get_xdata()) == [0.0, 1.0, 2.0]


def test_training_curves_default_to_the_smoothed_per_step_loss(digits):
    log = compare("mlp-digits", ["sgdm", "mbf"], epochs=2, dataset=digits, progress=False)
    fig = plot_training_curves(log, "epoch", smoothing=5)
    ax = fig.get_axes()[0]
    labelled = [line for line in ax.get_lines() if not line.get_label().startswith("_")]
    assert [line.get_label() for line in labelled] == ["sgdm", "mbf"]
    steps = log[(log.kind == "step") & (log.optimizer == "sgdm")]
    assert len(labelled[0].get_xdata()) == len(steps) == 30  # every step, 15 per epoch
    expected = steps.loss.rolling(5, min_periods=1).mean().to_numpy()
    assert labelled[0].get_ydata() == pytest.approx(expected)
    assert ax.get_ylabel() == "minibatch training loss"


def test_training_curves_mark_where_a_run_diverged(digits):
    data = _copy(digits)

    def poison(row):  # sgdm diverges at its 4th step; adam then trains on NaN and stops at once
        if row["step"] == 3:
            data.train_x.fill_(math.nan)

    log = compare(
        "mlp-digits", ["sgdm", "adam"], epochs=1, dataset=data, on_step=poison, progress=False
    )
    assert list(log[log.kind == "end"].status) == ["diverged", "diverged"]
    fig = plot_training_curves(log, "epoch")
    ax = fig.get_axes()[0]
    crosses = [line for line in ax.get_lines() if line.get_gid() == "diverged"]
    assert crosses and all(line.get_marker() == "x" for line in crosses)
    steps = log[log.kind == "step"]
    top = 2 * steps.groupby("run").loss.first().max()
    assert ax.get_ylim()[1] == pytest.approx(top)  # a divergence cannot flatten the others
    assert "diverged" in [t.get_text() for t in ax.get_legend().get_texts()]
    with pytest.raises(ValueError, match="x must be among"):
        plot_training_curves(log, "steps")


def test_a_grid_point_without_progress_is_never_the_best(digits):
    frame = grid_search(
        "mlp-digits", "sgdm", lrs=[0.05, 30.0], max_steps=30, dataset=digits, progress=False
    )
    assert list(frame.status) == ["max_steps", "no_progress"]
    assert frame.train_loss.iloc[1] >= frame.initial_train_loss.iloc[1]  # it did not train
    assert list(frame.best) == [True, False]
    stuck = grid_search(
        "mlp-digits", "sgdm", lrs=[30.0, 50.0], max_steps=30, dataset=digits, progress=False
    )
    assert (stuck.status == "no_progress").all() and not stuck.best.any()


def test_summaries_of_autoencoders_have_no_accuracy_columns(digits):
    classifier = summarize(train("mlp-digits", "sgdm", max_steps=2, dataset=digits, progress=False))
    assert {"train_accuracy", "test_accuracy"} <= set(classifier.columns)
    tiny = Dataset(
        name="mnist",
        train_x=torch.rand(40, 1, 28, 28),
        train_y=torch.zeros(40, dtype=torch.int64),
        test_x=torch.rand(10, 1, 28, 28),
        test_y=torch.zeros(10, dtype=torch.int64),
        num_classes=10,
        input_shape=(1, 28, 28),
    )
    autoencoder = summarize(train("mnist-ae", "sgdm", max_steps=2, dataset=tiny, progress=False))
    assert "train_accuracy" not in autoencoder and "test_accuracy" not in autoencoder
    assert autoencoder.train_loss.notna().all()
