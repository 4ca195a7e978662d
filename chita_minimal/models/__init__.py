"""Network definitions of the CHITA paper and their pretrained checkpoints."""

from chita_minimal.models.language import LANGUAGE_MODELS, load_tokenizer
from chita_minimal.models.mlpnet import MLPNet
from chita_minimal.models.mobilenet import MobileNetV1, mobilenet_v1
from chita_minimal.models.pretrained import ARCHITECTURES, INPUT_SHAPES, MODEL_NAMES, load_pretrained
from chita_minimal.models.resnet50 import ResNet50, resnet50
from chita_minimal.models.resnet_cifar import ResNetCifar, resnet20

__all__ = [
    "MLPNet", "resnet20", "mobilenet_v1", "resnet50", "load_pretrained",
    "ResNetCifar", "MobileNetV1", "ResNet50", "MODEL_NAMES", "ARCHITECTURES", "INPUT_SHAPES",
    "LANGUAGE_MODELS", "load_tokenizer",
]
