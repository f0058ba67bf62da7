"""``data=cifar10``: CIFAR-10 as a folder-per-class tree or the ``cifar10_jpeg`` zip, through ``data=imagefolder``.

Default layout is the shared zip's: ``train/<class>/*.jpg`` and ``test/<class>/*.jpg`` (the val split is CIFAR-10's
test set); images are read from the zip without extracting it. The only addition to ImageFolder is a check that the
class folders are exactly CIFAR-10's ten, so a wrong ``data.root`` fails before training instead of training on
the wrong labels.
"""
from __future__ import annotations

from conf.errors import DataError
from conf.schemas.data import Cifar10Config
from data.imagefolder import ImageFolderDataModule
from data.registry import DATAMODULES

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@DATAMODULES.register("cifar10")
class Cifar10DataModule(ImageFolderDataModule):
    config_cls = Cifar10Config

    def check_classes(self, classes: list[str]) -> None:
        if tuple(classes) != CIFAR10_CLASSES:
            raise DataError(f"{self._source_or_open().path} has class folders {classes}; CIFAR-10 has "
                            f"{', '.join(CIFAR10_CLASSES)}")
