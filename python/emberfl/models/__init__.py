"""Built-in models for federated simulations, and :class:`Models`, the selector that builds
them by name (BlazeFL's ``ModelSelector`` protocol).

=================  ==========================================================  ==========
name               network                                                     inputs
=================  ==========================================================  ==========
``"cnn"``          PyTorch CIFAR-10 tutorial CNN (:class:`TutorialCNN`)        >= 16x16
``"small-cnn"``    two 3x3 conv blocks + 128-unit layer (:class:`SmallCNN`)    >= 4x4
``"mlp"``          two hidden layers of 200 units (:class:`MLP`)               any
``"resnet18"``     CIFAR-style ResNet-18 (:class:`ResNet18`)                   >= 8x8
``"logreg"``       one linear layer (an :class:`MLP` without hidden layers)    any
``"femnist-cnn"``  LEAF's FEMNIST CNN (:class:`FEMNISTCNN`)                    >= 4x4
``"celeba-cnn"``   LEAF's CelebA CNN (:class:`CelebACNN`)                      >= 16x16
``"char-lstm"``    LEAF's Shakespeare LSTM (:class:`SequenceLSTM`)             token ids
``"word-lstm"``    LEAF's Sent140 LSTM (:class:`SequenceLSTM`)                 token ids
=================  ==========================================================  ==========

Example:
    >>> from emberfl.models import Models
    >>> net = Models(input_shape=(3, 32, 32), num_classes=10, seed=0).select_model("cnn")
    >>> sum(p.numel() for p in net.parameters())
    62006
"""

from __future__ import annotations

from emberfl.models.cnn import SmallCNN, TutorialCNN
from emberfl.models.leaf import FEMNISTCNN, CelebACNN, SequenceLSTM
from emberfl.models.mlp import MLP
from emberfl.models.resnet import BasicBlock, ResNet18
from emberfl.models.selector import MODEL_NAMES, TOKEN_MODELS, ModelName, Models

__all__ = [
    "FEMNISTCNN",
    "MLP",
    "MODEL_NAMES",
    "BasicBlock",
    "CelebACNN",
    "ModelName",
    "Models",
    "ResNet18",
    "SequenceLSTM",
    "SmallCNN",
    "TOKEN_MODELS",
    "TutorialCNN",
]
