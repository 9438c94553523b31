"""E2CM exit: classifies every position by its distance to per-class mean features, no trained layer."""
import warnings
from typing import List, Optional, Sequence

import torch
from torch import Tensor

from mmseg.models.decode_heads.decode_head import BaseDecodeHead
from mmseg.registry import MODELS

from ..masked.heads import DenseRunner

__all__ = ['EarlyExitClassMeanHead', 'ClassMeanWarning', 'EMPTY_CLASS_LOGIT']

#: Logit of a class without training pixels: finite (no NaN in softmax, entropy or the rbf fill) and far below any
#: real logit, so the class never wins and gets probability 0.
EMPTY_CLASS_LOGIT = -1e30


class ClassMeanWarning(UserWarning):
    """A class has no training pixels at an E2CM exit (it can never be predicted there)."""


@MODELS.register_module()
class EarlyExitClassMeanHead(BaseDecodeHead):
    """Training-free early exit from class means (E2CM: Görmez, Dasari and Koyuncu, IJCNN 2022).

    The exit reads the same feature map an RH or FCN head reads at its exit point (``input_transform=
    'resize_concat'``: the branches bilinearly resized to the first one and concatenated) and scores position ``x``
    by ``softmax_k(-||x - M_k||^2 / T)`` with ``M_k`` the mean feature of the training pixels of class ``k``.
    Since ``-||x - M_k||^2 = 2 M_k . x - ||M_k||^2 - ||x||^2`` and the last term is the same for every class, the
    logits ``(2 M_k . x - ||M_k||^2) / T`` give exactly that softmax: a 1x1 convolution (``conv_seg``, weight
    ``2 M_k / T``, bias ``-||M_k||^2 / T``) that runs through the exit runners, i.e. only on active positions under
    sparse masked inference, and whose MACs the FLOPs counter sees. (E2CM's paper uses the plain distance ``d``;
    the squared one has the same ranking, hence the same predictions, and is what makes the exit a linear layer.)

    The class means, their pixel counts and ``T`` are buffers (checkpoints carry them); ``conv_seg``'s weight and
    bias are derived from them (non-persistent) whenever they change. ``T`` is set with :meth:`set_class_means`:
    given, or fitted on the training statistics (:meth:`~mmseg_cbt.calibration.ClassFeatureStats.
    fitted_temperature`: ``T = 2 s^2``, the Bayes posterior of isotropic Gaussian classes). A class without
    training pixels gets logit :data:`EMPTY_CLASS_LOGIT` (with a :class:`ClassMeanWarning`).

    Args:
        in_channels (int | Sequence[int]): Widths of the branches read (their sum is the feature width C).
        temperature (float): Initial ``T`` (> 0), until :meth:`set_class_means` sets it.
        stop_pixels (bool): Whether pixels may stop at this exit (False: it only reports its map, e.g. a stage not
            chosen by ``tools/e2cm.py --exits``; the segmentor's stop rules skip it).
        **kwargs: :class:`BaseDecodeHead` arguments; ``channels`` defaults to C (the classifier's input width).
    """

    def __init__(self, in_channels, temperature: float = 1.0, stop_pixels: bool = True, **kwargs) -> None:
        width = sum(in_channels) if isinstance(in_channels, (list, tuple)) else int(in_channels)
        kwargs.setdefault('channels', width)
        kwargs.setdefault('dropout_ratio', 0)
        if isinstance(in_channels, (list, tuple)):
            kwargs.setdefault('input_transform', 'resize_concat')
            kwargs.setdefault('in_index', list(range(len(in_channels))))
        kwargs['init_cfg'] = None  # nothing to initialise: conv_seg is derived from the class means
        super().__init__(in_channels=in_channels, **kwargs)
        if self.channels != width:
            raise ValueError(f'EarlyExitClassMeanHead: channels ({self.channels}) must equal the feature width, the '
                             f'sum of in_channels ({width})')
        self._check_temperature(temperature)
        self.stop_pixels = bool(stop_pixels)
        k = self.num_classes
        self.register_buffer('class_means', torch.zeros(k, width))
        self.register_buffer('class_counts', torch.zeros(k, dtype=torch.int64))
        self.register_buffer('temperature', torch.tensor(float(temperature)))
        # conv_seg keeps its module (runners and the FLOPs counter use it) but holds derived, non-persistent tensors
        del self.conv_seg.weight
        del self.conv_seg.bias
        self.conv_seg.register_buffer('weight', torch.zeros(k, width, 1, 1), persistent=False)
        self.conv_seg.register_buffer('bias', torch.zeros(k), persistent=False)
        self._derived_key: Optional[tuple] = None

    @staticmethod
    def _check_temperature(temperature: float) -> float:
        t = float(temperature)
        if not t > 0 or t == float('inf'):
            raise ValueError(f'EarlyExitClassMeanHead: temperature must be a finite number > 0, got {temperature!r}')
        return t

    @property
    def min_input_size(self) -> int:
        """Smallest input side: a 1x1 conv runs on any map."""
        return 1

    @property
    def feature_width(self) -> int:
        """The width C of the features (and of the stored means)."""
        return int(self.class_means.shape[1])

    def set_class_means(self,
                        means: Tensor,
                        counts: Tensor,
                        temperature: float,
                        class_names: Optional[Sequence[str]] = None,
                        where: str = 'EarlyExitClassMeanHead') -> None:
        """Stores class means, pixel counts and the temperature.

        Args:
            means (Tensor): (K, C) mean features (rows of classes without pixels are ignored).
            counts (Tensor): (K,) training pixels per class.
            temperature (float): ``T`` > 0.
            class_names (Sequence[str], optional): For the warning about classes without pixels.
            where (str): Names the exit in messages.
        """
        t = self._check_temperature(temperature)
        k, c = self.class_means.shape
        means, counts = torch.as_tensor(means), torch.as_tensor(counts)
        if tuple(means.shape) != (k, c):
            raise ValueError(f'{where}: class means of shape {tuple(means.shape)} do not fit this exit, which has '
                             f'{k} classes and reads features of width {c}')
        if tuple(counts.shape) != (k, ):
            raise ValueError(f'{where}: counts must have shape ({k},), got {tuple(counts.shape)}')
        empty = [int(i) for i in torch.nonzero(counts == 0).flatten()]
        if empty:
            names = [class_names[i] if class_names else str(i) for i in empty]
            warnings.warn(
                f'{where}: {len(empty)} class(es) have no training pixels at this exit ({", ".join(names)}): they '
                'get no class mean and can never be predicted by it', ClassMeanWarning)
        dev = self.class_means.device
        self.class_means.copy_(torch.where(counts.view(-1, 1) > 0, means.to(torch.float64), 0).to(dev))
        self.class_counts.copy_(counts.to(dev, torch.int64))
        self.temperature.fill_(t)

    def _sync_classifier(self) -> None:
        """Derives conv_seg's weight and bias from the buffers when any of them changed (or moved)."""
        tensors = (self.class_means, self.class_counts, self.temperature, self.conv_seg.weight, self.conv_seg.bias)
        key = tuple((id(t), t.data_ptr(), -1 if t.is_inference() else t._version, t.dtype) for t in tensors)
        if key == self._derived_key:
            return
        with torch.no_grad():
            means = self.class_means.to(torch.float64)
            t = self.temperature.to(torch.float64)
            present = (self.class_counts > 0).view(-1, 1)
            weight = torch.where(present, 2.0 * means / t, 0.0)
            bias = torch.where(present[:, 0], -means.square().sum(dim=1) / t, EMPTY_CLASS_LOGIT)
            dtype = self.class_means.dtype
            self.conv_seg.weight = weight.to(dtype).view(*weight.shape, 1, 1)
            self.conv_seg.bias = bias.to(dtype)
        tensors = tensors[:3] + (self.conv_seg.weight, self.conv_seg.bias)
        self._derived_key = tuple(
            (id(t), t.data_ptr(), -1 if t.is_inference() else t._version, t.dtype) for t in tensors)

    def forward(self, inputs: List[Tensor]) -> Tensor:
        """Logits ``(2 M_k . x - ||M_k||^2) / T`` at the resolution of the first input branch."""
        return self.forward_with(inputs, DenseRunner())

    def forward_with(self, inputs: List[Tensor], runner: DenseRunner) -> Tensor:
        """The forward with the classifier run by ``runner`` (dense, simulated-masked or sparse)."""
        x = self._transform_inputs(inputs)
        if x.shape[1] != self.feature_width:
            raise ValueError(f'EarlyExitClassMeanHead: the feature map has {x.shape[1]} channels but the stored '
                             f'class means have width {self.feature_width}')
        self._sync_classifier()
        return runner.seg(self, x)
