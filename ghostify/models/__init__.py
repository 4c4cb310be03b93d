"""The model zoo: GhostNet (ImageNet) and the CIFAR-10 baselines of the paper's Table 5.

Example:
    >>> from ghostify.models import get_model, model_input_size
    >>> model = get_model("ghostnet_100", num_classes=10)
    >>> model_input_size("cifar_resnet56")
    (3, 32, 32)
"""

from ghostify.models._registry import get_model, get_model_builder, list_models, model_input_size, register_model
from ghostify.models.cifar import CifarResNet, CifarVGG, cifar_resnet56, cifar_vgg16
from ghostify.models.ghostnet import (
    GhostBottleneck,
    GhostNet,
    SqueezeExcite,
    ghostnet_050,
    ghostnet_100,
    ghostnet_130,
)

__all__ = [
    "CifarResNet",
    "CifarVGG",
    "GhostBottleneck",
    "GhostNet",
    "SqueezeExcite",
    "cifar_resnet56",
    "cifar_vgg16",
    "get_model",
    "get_model_builder",
    "ghostnet_050",
    "ghostnet_100",
    "ghostnet_130",
    "list_models",
    "model_input_size",
    "register_model",
]
