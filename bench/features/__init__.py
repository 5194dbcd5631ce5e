"""The features room: frozen backbones (ResNet-18 and its CIFAR variant, any torchvision
classification model, Hugging Face vision models) and the feature cache built from them.
The runner and the CLI use the names exported here."""

from bench.features.backbones import BackboneError, best_device, file_sha256, load_backbone, preprocess, preprocessing, resnet18
from bench.features.cache import FeatureStore

__all__ = ["BackboneError", "FeatureStore", "best_device", "file_sha256", "load_backbone", "preprocess", "preprocessing", "resnet18"]
