"""Models of the MBF experiments: MLPs, the Simple CNN, autoencoders, ResNet32, VGG11/16-BN.

Every model is built from plain ``torch.nn`` modules so that BackPACK (``backpack.extend``) can
analyse it:

- activations are modules (``nn.ReLU()``, ``nn.Tanh()``, ...), never functional calls, and never
  in place (``inplace=False``);
- feed-forward models are ``nn.Sequential`` (BackPACK's second-order extensions need that), with
  ``nn.Flatten()`` as a module;
- children carry readable names (``fc1``, ``act1``, ``conv1``, ...) because the CLI and the analyses
  use the qualified module names as layer names.

Initialization is PyTorch's default for every layer; nothing global is set here. Callers who need
reproducible weights seed before building, e.g. ``torch.manual_seed(0); model = paper_mlp()``.

The loss is applied outside the models; every model returns logits (or, for the FACES autoencoder,
real-valued reconstructions).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

from torch import Tensor, nn

from mbf_analysis.errors import ConfigError

__all__ = [
    "ACTIVATIONS",
    "CURVES_AE_WIDTHS",
    "FACES_AE_WIDTHS",
    "MNIST_AE_WIDTHS",
    "MODELS",
    "PAPER_MLP_WIDTHS",
    "BasicBlock",
    "ShortcutA",
    "autoencoder",
    "build_model",
    "curves_autoencoder",
    "faces_autoencoder",
    "mlp",
    "mnist_autoencoder",
    "model_names",
    "num_parameters",
    "paper_mlp",
    "resnet32",
    "simple_cnn",
    "vgg11_bn",
    "vgg16_bn",
]

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
    "selu": nn.SELU,
}
"""Activation names accepted by :func:`mlp` and :func:`autoencoder`."""

PAPER_MLP_WIDTHS: tuple[int, ...] = (256, 20, 20, 20, 20, 20, 10)
"""Widths of the MLP of the paper's heatmap and cosine analyses (16×16 down-scaled MNIST)."""

DIGITS_MLP_WIDTHS: tuple[int, ...] = (64, 32, 16, 10)
"""Widths of the default network on the embedded 8×8 digits (small enough for dense blocks)."""

MNIST_AE_WIDTHS: tuple[int, ...] = (784, 1000, 500, 250, 30, 250, 500, 1000, 784)
"""MNIST autoencoder widths (Hinton & Salakhutdinov 2006); trained with BCE-with-logits."""

FACES_AE_WIDTHS: tuple[int, ...] = (625, 2000, 1000, 500, 30, 500, 1000, 2000, 625)
"""FACES autoencoder widths (25×25 images); trained with mean-squared error."""

CURVES_AE_WIDTHS: tuple[int, ...] = (784, 400, 200, 100, 50, 25, 6, 25, 50, 100, 200, 400, 784)
"""CURVES autoencoder widths (28×28 images); trained with BCE-with-logits."""


def _make_activation(activation: str | type[nn.Module]) -> nn.Module:
    """Instantiate an activation module (never in place).

    Args:
        activation: A name from :data:`ACTIVATIONS` (case-insensitive, ``-`` or ``_``) or an
            ``nn.Module`` subclass that can be built without arguments.

    Returns:
        A fresh activation module.

    Raises:
        ValueError: For an unknown name (the message lists the choices).
        TypeError: For anything that is neither a string nor an ``nn.Module`` subclass.
    """
    if isinstance(activation, str):
        key = activation.lower().replace("-", "_")
        if key not in ACTIVATIONS:
            raise ConfigError(
                f"unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}"
            )
        cls = ACTIVATIONS[key]
    elif isinstance(activation, type) and issubclass(activation, nn.Module):
        cls = activation
    else:
        raise TypeError(f"activation must be a name or an nn.Module subclass, got {activation!r}")
    module = cls()
    if getattr(module, "inplace", False):
        module.inplace = False
    return module


def _check_widths(widths: Sequence[int], min_len: int = 2) -> list[int]:
    widths = [int(w) for w in widths]
    if len(widths) < min_len or any(w < 1 for w in widths):
        raise ConfigError(f"widths must be at least {min_len} positive integers, got {widths}")
    return widths


def mlp(
    widths: Sequence[int], activation: str | type[nn.Module] = "tanh", *, bias: bool = True
) -> nn.Sequential:
    """Fully connected network ``flatten, fc1, act1, fc2, act2, ..., fcK``.

    ``fc_k = nn.Linear(widths[k-1], widths[k])``; an activation follows every linear layer but the
    last (the network returns logits).

    Args:
        widths: ``[d_0, d_1, ..., d_K]``: input dimension, hidden widths, output dimension.
        activation: Activation name (``relu``, ``tanh``, ``sigmoid``, ``elu``, ``leaky_relu``,
            ``selu``) or an ``nn.Module`` subclass.
        bias: Whether the linear layers have biases.

    Returns:
        ``nn.Sequential`` mapping ``[N, *]`` (flattened to ``[N, d_0]``) to ``[N, d_K]``.

    Raises:
        ValueError: For fewer than two widths, a non-positive width or an unknown activation.
    """
    widths = _check_widths(widths)
    layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
    num_linear = len(widths) - 1
    for k in range(1, num_linear + 1):
        layers[f"fc{k}"] = nn.Linear(widths[k - 1], widths[k], bias=bias)
        if k < num_linear:
            layers[f"act{k}"] = _make_activation(activation)
    return nn.Sequential(layers)


def paper_mlp() -> nn.Sequential:
    """The 256-20-20-20-20-20-10 tanh MLP of the paper (METHODS.md §5).

    Layers: ``flatten, fc1, act1, fc2, act2, fc3, act3, fc4, act4, fc5, act5, fc6``.

    Returns:
        ``nn.Sequential`` mapping ``[N, 1, 16, 16]`` (or ``[N, 256]``) to logits ``[N, 10]``.
    """
    return mlp(PAPER_MLP_WIDTHS, "tanh")


def simple_cnn(in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> nn.Sequential:
    """The Simple CNN (Shallue et al. 2019 base model, METHODS.md §5), without BatchNorm.

    ``conv1`` (5×5, 32, "same" padding 2) → ``relu1`` → ``pool1`` (max 2×2, stride 2) →
    ``conv2`` (5×5, 64, "same") → ``relu2`` → ``pool2`` → ``flatten`` → ``fc1`` (1024) →
    ``relu3`` → ``fc2`` (``num_classes``).

    Args:
        in_channels: Input channels ``C``.
        num_classes: Number of classes.
        image_size: Side ``H = W`` of the square input; ``fc1`` reads
            ``64 · (H // 4)²`` features (``7·7·64`` for 28×28 inputs).

    Returns:
        ``nn.Sequential`` mapping ``[N, C, H, H]`` to logits ``[N, num_classes]``.
    """
    if image_size < 4:
        raise ConfigError(f"image_size must be at least 4, got {image_size}")
    side = image_size // 2 // 2
    return nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(in_channels, 32, kernel_size=5, padding=2),
            relu1=nn.ReLU(),
            pool1=nn.MaxPool2d(kernel_size=2, stride=2),
            conv2=nn.Conv2d(32, 64, kernel_size=5, padding=2),
            relu2=nn.ReLU(),
            pool2=nn.MaxPool2d(kernel_size=2, stride=2),
            flatten=nn.Flatten(),
            fc1=nn.Linear(64 * side * side, 1024),
            relu3=nn.ReLU(),
            fc2=nn.Linear(1024, num_classes),
        )
    )


def autoencoder(
    widths: Sequence[int],
    activation: str | type[nn.Module] = "relu",
    code_activation: str | type[nn.Module] | None = None,
) -> nn.Sequential:
    """Deep autoencoder ``flatten, fc1, act1, ..., fcK``, with a linear code layer by default.

    ``fc_k = nn.Linear(widths[k-1], widths[k])``. The code layer is the linear layer whose output
    is the narrowest inner width (``30`` for MNIST/FACES, ``6`` for CURVES). As in Hinton &
    Salakhutdinov (2006) no activation follows it unless ``code_activation`` is given; none
    follows the output layer: the model returns logits. Activation modules are named after the
    linear layer they follow (``act{k}`` after ``fc{k}``), so without a code activation the code
    layer's index is skipped.

    ``code_activation="relu"`` gives the network of the KPSVD and two-level KFAC papers' public
    code (``apps/mlp_cnn/models.py`` of Abdoulaye-Koroko/natural-gradients: ``nn.Linear(250, 30),
    nn.ReLU()`` on MNIST), whose dead code units make the input of the next layer non-negative
    and low-rank.

    The loss is applied outside: ``nn.BCEWithLogitsLoss`` for MNIST and CURVES (pixels in
    ``[0, 1]``), ``nn.MSELoss`` for FACES (METHODS.md §1 uses ½‖f − y‖² per sample).

    Args:
        widths: ``[d_0, ..., d_K]`` with at least one inner width; ``d_0`` is the input size.
        activation: Hidden activation (default ReLU), as in :func:`mlp`.
        code_activation: Activation after the code layer (``act{code}``), or ``None`` for a
            linear code.

    Returns:
        ``nn.Sequential`` mapping ``[N, *]`` (flattened to ``[N, d_0]``, so ``[N, 1, 28, 28]``
        works for 784) to ``[N, d_K]``.
    """
    widths = _check_widths(widths, min_len=3)
    inner = widths[1:-1]
    code = 1 + inner.index(min(inner))
    layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
    num_linear = len(widths) - 1
    for k in range(1, num_linear + 1):
        layers[f"fc{k}"] = nn.Linear(widths[k - 1], widths[k])
        if k < num_linear and k != code:
            layers[f"act{k}"] = _make_activation(activation)
        elif k == code and code_activation is not None:
            layers[f"act{k}"] = _make_activation(code_activation)
    return nn.Sequential(layers)


def mnist_autoencoder(code_activation: str | type[nn.Module] | None = None) -> nn.Sequential:
    """MNIST autoencoder 784-1000-500-250-30-250-500-1000-784 (loss: BCE-with-logits).

    Args:
        code_activation: As in :func:`autoencoder` (``"relu"``: the KPSVD papers' network).

    Returns:
        ``nn.Sequential`` mapping ``[N, 784]`` or ``[N, 1, 28, 28]`` to logits ``[N, 784]``.
    """
    return autoencoder(MNIST_AE_WIDTHS, code_activation=code_activation)


def faces_autoencoder(code_activation: str | type[nn.Module] | None = None) -> nn.Sequential:
    """FACES autoencoder 625-2000-1000-500-30-500-1000-2000-625 (loss: MSE).

    Args:
        code_activation: As in :func:`autoencoder`.

    Returns:
        ``nn.Sequential`` mapping ``[N, 625]`` or ``[N, 1, 25, 25]`` to ``[N, 625]``.
    """
    return autoencoder(FACES_AE_WIDTHS, code_activation=code_activation)


def curves_autoencoder(code_activation: str | type[nn.Module] | None = None) -> nn.Sequential:
    """CURVES autoencoder 784-400-200-100-50-25-6-25-50-100-200-400-784 (loss: BCE-with-logits).

    Args:
        code_activation: As in :func:`autoencoder`.

    Returns:
        ``nn.Sequential`` mapping ``[N, 784]`` or ``[N, 1, 28, 28]`` to logits ``[N, 784]``.
    """
    return autoencoder(CURVES_AE_WIDTHS, code_activation=code_activation)


class ShortcutA(nn.Module):
    """Parameter-free "option A" shortcut of He et al. (2016) for CIFAR ResNets.

    Subsamples spatially with stride ``stride`` (``x[:, :, ::s, ::s]``) and zero-pads the channel
    dimension from ``C_in`` to ``C_out``: ``(C_out − C_in) // 2`` zero channels before the input's
    channels and the rest after (the split of the widely used CIFAR ResNet reimplementations;
    ``16 → 32`` puts 8 zero channels on each side).

    Args:
        in_channels: ``C_in``.
        out_channels: ``C_out ≥ C_in``.
        stride: Spatial subsampling factor ``s``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 2) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ConfigError(
                f"option-A shortcut cannot shrink channels ({in_channels} -> {out_channels})"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        """Map ``[N, C_in, H, W]`` to ``[N, C_out, ⌈H/s⌉, ⌈W/s⌉]``."""
        x = x[:, :, :: self.stride, :: self.stride]
        extra = self.out_channels - self.in_channels
        before = extra // 2
        return nn.functional.pad(x, (0, 0, 0, 0, before, extra - before))

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


class BasicBlock(nn.Module):
    """ResNet basic block: ``relu2(bn2(conv2(relu1(bn1(conv1(x))))) + shortcut(x))``.

    Both convolutions are 3×3 without bias (BatchNorm follows); ``conv1`` carries the stride. The
    shortcut is ``nn.Identity()`` when shape is kept and :class:`ShortcutA` otherwise.

    Args:
        in_channels: ``C_in``.
        out_channels: ``C_out``.
        stride: Stride of ``conv1`` (2 at the first block of a down-sampling stage).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(
            in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False
        )
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(
            out_channels, out_channels, kernel_size=3, stride=1, padding=1, bias=False
        )
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module
        if stride != 1 or in_channels != out_channels:
            self.shortcut = ShortcutA(in_channels, out_channels, stride)
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        """Map ``[N, C_in, H, W]`` to ``[N, C_out, H/s, W/s]``."""
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


def resnet32(num_classes: int = 10, in_channels: int = 3) -> nn.Sequential:
    """ResNet32 for CIFAR (He et al. 2016, §4.2) with the option-A shortcut: 0.464M parameters.

    ``conv1`` (3×3, 16) → ``bn1`` → ``relu1`` → ``stage1`` / ``stage2`` / ``stage3`` (each an
    ``nn.Sequential`` of 5 :class:`BasicBlock` named ``block1..block5``; 16, 32, 64 channels;
    stages 2 and 3 halve the resolution in their first block) → ``avgpool`` (global) →
    ``flatten`` → ``fc`` (``64 → num_classes``). 31 convolutions + 1 linear layer = 32 layers.
    Qualified layer names look like ``stage2.block1.conv1``.

    Args:
        num_classes: Number of classes.
        in_channels: Input channels (3 for CIFAR/SVHN).

    Returns:
        Top-level ``nn.Sequential`` mapping ``[N, C, 32, 32]`` to logits ``[N, num_classes]``.
        The residual blocks make it non-sequential inside, so only BackPACK's first-order
        extensions apply (and, with BatchNorm, per-sample quantities only in ``eval()`` mode).
    """
    layers: OrderedDict[str, nn.Module] = OrderedDict(
        conv1=nn.Conv2d(in_channels, 16, kernel_size=3, padding=1, bias=False),
        bn1=nn.BatchNorm2d(16),
        relu1=nn.ReLU(),
    )
    channels = 16
    for stage, width in enumerate((16, 32, 64), start=1):
        blocks: OrderedDict[str, nn.Module] = OrderedDict()
        for b in range(1, 6):
            stride = 2 if (b == 1 and stage > 1) else 1
            blocks[f"block{b}"] = BasicBlock(channels, width, stride)
            channels = width
        layers[f"stage{stage}"] = nn.Sequential(blocks)
    layers["avgpool"] = nn.AdaptiveAvgPool2d(1)
    layers["flatten"] = nn.Flatten()
    layers["fc"] = nn.Linear(64, num_classes)
    return nn.Sequential(layers)


_VGG_CONFIGS: dict[str, tuple[int | str, ...]] = {
    "A": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "D": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
}


def _vgg_bn(
    config: Sequence[int | str], num_classes: int, in_channels: int, dropout: float
) -> nn.Sequential:
    """Flat VGG-BN ``nn.Sequential`` for 32×32 inputs (see :func:`vgg11_bn`)."""
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"dropout must be in [0, 1), got {dropout}")
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    channels, n_conv, n_pool = in_channels, 0, 0
    for item in config:
        if item == "M":
            n_pool += 1
            layers[f"pool{n_pool}"] = nn.MaxPool2d(kernel_size=2, stride=2)
        else:
            n_conv += 1
            width = int(item)
            layers[f"conv{n_conv}"] = nn.Conv2d(channels, width, kernel_size=3, padding=1)
            layers[f"bn{n_conv}"] = nn.BatchNorm2d(width)
            layers[f"relu{n_conv}"] = nn.ReLU()
            channels = width
    layers["flatten"] = nn.Flatten()
    for k, (n_in, n_out) in enumerate(((channels, 4096), (4096, 4096)), start=1):
        layers[f"fc{k}"] = nn.Linear(n_in, n_out)
        layers[f"relu{n_conv + k}"] = nn.ReLU()
        if dropout > 0:
            layers[f"dropout{k}"] = nn.Dropout(dropout)
    layers["fc3"] = nn.Linear(4096, num_classes)
    return nn.Sequential(layers)


def vgg11_bn(num_classes: int = 10, in_channels: int = 3, dropout: float = 0.0) -> nn.Sequential:
    """VGG11 (configuration A) with BatchNorm after every convolution, for 32×32 inputs.

    Features: ``conv{i}`` (3×3, padding 1, with bias) → ``bn{i}`` → ``relu{i}`` for the 8
    convolutions, ``pool{j}`` (max 2×2, stride 2) after each of the 5 stages; then ``flatten`` →
    ``fc1`` (512 → 4096) → ``relu9`` → ``fc2`` (4096 → 4096) → ``relu10`` → ``fc3``
    (4096 → ``num_classes``). With ``dropout > 0``, ``dropout1`` / ``dropout2`` follow the two
    hidden ReLUs; the default ``0.0`` leaves them out.

    Args:
        num_classes: Number of classes.
        in_channels: Input channels.
        dropout: Dropout probability in the classifier (default 0: no dropout modules).

    Returns:
        Flat ``nn.Sequential`` mapping ``[N, C, 32, 32]`` to logits ``[N, num_classes]``.
    """
    return _vgg_bn(_VGG_CONFIGS["A"], num_classes, in_channels, dropout)


def vgg16_bn(num_classes: int = 10, in_channels: int = 3, dropout: float = 0.0) -> nn.Sequential:
    """VGG16 (configuration D) with BatchNorm after every convolution, for 32×32 inputs.

    Naming as in :func:`vgg11_bn`, with 13 convolutions (``conv1..conv13``, ``relu1..relu13``)
    and the classifier ReLUs ``relu14`` and ``relu15``.

    Args:
        num_classes: Number of classes.
        in_channels: Input channels.
        dropout: Dropout probability in the classifier (default 0: no dropout modules).

    Returns:
        Flat ``nn.Sequential`` mapping ``[N, C, 32, 32]`` to logits ``[N, num_classes]``.
    """
    return _vgg_bn(_VGG_CONFIGS["D"], num_classes, in_channels, dropout)


def digits_mlp() -> nn.Sequential:
    """The default network: a 64-32-16-10 tanh MLP for the embedded 8×8 digits."""
    return mlp(DIGITS_MLP_WIDTHS, "tanh")


MODELS: dict[str, Callable[..., nn.Module]] = {
    "digits-mlp": digits_mlp,
    "paper-mlp": paper_mlp,
    "simple-cnn": simple_cnn,
    "mnist-ae": mnist_autoencoder,
    "faces-ae": faces_autoencoder,
    "curves-ae": curves_autoencoder,
    "resnet32": resnet32,
    "vgg11-bn": vgg11_bn,
    "vgg16-bn": vgg16_bn,
}
"""Registry of the named models; every entry builds with no arguments."""


def model_names() -> list[str]:
    """Names accepted by :func:`build_model`, in registry order."""
    return list(MODELS)


def build_model(name: str, **kwargs: object) -> nn.Module:
    """Build a registered model by name.

    Args:
        name: One of :func:`model_names` (case-insensitive; ``_`` is read as ``-``).
        **kwargs: Passed to the builder (e.g. ``num_classes=100`` for ``resnet32``).

    Returns:
        The model, freshly initialized (seed with ``torch.manual_seed`` beforehand).

    Raises:
        ValueError: For an unknown name (the message lists the choices).
    """
    key = name.lower().replace("_", "-")
    if key not in MODELS:
        raise ConfigError(f"unknown model {name!r}; choose one of {model_names()}")
    return MODELS[key](**kwargs)


def num_parameters(model: nn.Module) -> int:
    """Number of scalar parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())
