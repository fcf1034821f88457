"""Example LightningModules and DataModules on generated shapes (no downloads), importable from LightningCLI YAML.

- :mod:`lightning_mlflow_cv.examples.shapes`: the synthetic shapes generator (images, boxes, labels, masks).
- :mod:`lightning_mlflow_cv.examples.detection`: a small torchvision Faster R-CNN (no pretrained weights).
- :mod:`lightning_mlflow_cv.examples.segmentation`: a small encoder-decoder for semantic segmentation.
- :mod:`lightning_mlflow_cv.examples._base`: the DataModule and LightningModule bases they (and the digits demo) share.
"""
