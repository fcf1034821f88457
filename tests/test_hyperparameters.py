"""Implicit hyperparameters read from live objects: transforms, optimizers, schedulers, dataloaders."""

from __future__ import annotations

import torch
import torchvision.transforms as T
from torch.utils.data import DataLoader, TensorDataset
from torchvision.transforms import v2

from lightning_mlflow_cv.demos.digits import DigitsDataModule
from lightning_mlflow_cv.hyperparameters import (
    dataloader_params,
    find_train_transform,
    optimizer_params,
    scheduler_params,
    transform_params,
)


def test_transform_params_v1_compose_nested_containers() -> None:
    crop = T.RandomResizedCrop(24, scale=(0.5, 1.0))
    jitter = T.ColorJitter(brightness=0.3)
    norm = T.Normalize((0.5, 0.4, 0.3), (0.2, 0.2, 0.2))
    t = T.Compose([crop, T.RandomApply([jitter], p=0.3), T.RandomHorizontalFlip(0.25), norm, T.RandomHorizontalFlip()])
    p = transform_params(t)
    assert p["augment/RandomResizedCrop/size"] == str(crop.size) == "(24, 24)"
    assert p["augment/RandomResizedCrop/scale"] == "(0.5, 1.0)"
    assert p["augment/RandomResizedCrop/interpolation"] == "bilinear"  # enum by value
    assert p["augment/RandomApply/p"] == "0.3"
    assert p["augment/RandomApply/ColorJitter/brightness"] == str(jitter.brightness)
    assert p["augment/RandomHorizontalFlip/p"] == "0.25"
    assert p["augment/RandomHorizontalFlip_2/p"] == "0.5"  # a repeated class gets a suffix, not an overwrite
    assert p["augment/Normalize/mean"] == "(0.5, 0.4, 0.3)"
    assert p["augment/pipeline"] == (
        "RandomResizedCrop > RandomApply > RandomHorizontalFlip > Normalize > RandomHorizontalFlip_2"
    )


def test_transform_params_v2_pipeline_and_lambda() -> None:
    affine = v2.RandomAffine(degrees=15, translate=(0.1, 0.2))
    t = v2.Compose([affine, v2.ToDtype(torch.float32), v2.Lambda(torch.flatten)])  # ToDtype(scale=): 0.16
    p = transform_params(t, prefix="train_tf")
    assert p["train_tf/RandomAffine/degrees"] == str(list(affine.degrees)) == "[-15.0, 15.0]"
    assert p["train_tf/RandomAffine/translate"] == "(0.1, 0.2)"
    assert p["train_tf/ToDtype/dtype"] == "torch.float32"
    assert p["train_tf/Lambda/lambd"] == "torch.flatten"
    # a bare transform (no container) is flattened too
    assert transform_params(v2.RandomVerticalFlip(p=0.7)) == {"augment/RandomVerticalFlip/p": "0.7"}


def test_find_train_transform_through_subset_and_datamodule() -> None:
    dm = DigitsDataModule(augment=True)
    dm.setup("fit")
    subset = torch.utils.data.Subset(dm.train_set, [0, 1, 2])
    assert find_train_transform(dataset=subset) is dm.train_transform
    assert find_train_transform(dataset=TensorDataset(torch.zeros(2)), datamodule=dm) is dm.train_transform
    assert find_train_transform(dataset=TensorDataset(torch.zeros(2))) is None


def test_optimizer_params_every_group_setting() -> None:
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([{"params": [a]}, {"params": [b], "lr": 0.01}], lr=0.1, momentum=0.9, nesterov=True)
    p = optimizer_params([opt])
    assert p["optimizer/name"] == "SGD"
    assert p["optimizer/num_param_groups"] == "2"
    for i, group in enumerate(opt.param_groups):
        for k, v in group.items():
            if k in {"foreach", "fused", "capturable", "differentiable"}:  # implementation switches
                assert f"optimizer/group_{i}/{k}" not in p
            elif k != "params":
                assert p[f"optimizer/group_{i}/{k}"] == str(v)
    two = optimizer_params([opt, torch.optim.AdamW([a], lr=1e-3, betas=(0.8, 0.99))])
    assert two["optimizer_1/name"] == "AdamW" and two["optimizer_1/betas"] == "(0.8, 0.99)"


def test_scheduler_params_with_lightning_config() -> None:
    from lightning.pytorch.utilities.types import LRSchedulerConfig

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=7, eta_min=1e-4)
    p = scheduler_params([LRSchedulerConfig(cos, interval="step", frequency=2)])
    assert p["lr_scheduler/name"] == "CosineAnnealingLR"
    assert p["lr_scheduler/T_max"] == "7" and p["lr_scheduler/eta_min"] == "0.0001"
    assert p["lr_scheduler/interval"] == "step" and p["lr_scheduler/frequency"] == "2"
    assert "lr_scheduler/last_epoch" not in p and "lr_scheduler/optimizer" not in p


def test_dataloader_params_shuffle_and_batch_sampler() -> None:
    ds = TensorDataset(torch.zeros(10, 1))
    shuffled = DataLoader(ds, batch_size=4, shuffle=True, pin_memory=False, drop_last=True)
    ordered = DataLoader(ds, batch_size=3)
    sampler_only = DataLoader(ds, batch_sampler=torch.utils.data.BatchSampler(torch.utils.data.RandomSampler(ds), 5, False))
    p = dataloader_params([shuffled, ordered, sampler_only], "val_dataloader")
    assert p["val_dataloader_0/batch_size"] == "4" and p["val_dataloader_0/shuffle"] == "True"
    assert p["val_dataloader_0/drop_last"] == "True"
    assert p["val_dataloader_1/shuffle"] == "False"
    assert p["val_dataloader_2/batch_size"] == "5" and p["val_dataloader_2/shuffle"] == "True"


def test_scheduler_params_lambda_and_one_cycle() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)

    def warmup(step: int) -> float:
        return min(1.0, (step + 1) / 10)

    p = scheduler_params([torch.optim.lr_scheduler.LambdaLR(opt, warmup)])
    assert p["lr_scheduler/name"] == "LambdaLR" and p["lr_scheduler/lr_lambda"].endswith("warmup")
    one = scheduler_params([torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.3, total_steps=100)])
    assert one["lr_scheduler/max_lr"] == "0.3" and one["lr_scheduler/total_steps"] == "100"
