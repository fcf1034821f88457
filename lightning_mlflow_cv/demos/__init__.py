"""The code the demo and the example YAMLs name: LightningModules and DataModules that need no download.

As Lightning ships ``lightning.pytorch.demos``, these are importable from LightningCLI YAML
(``class_path: lightning_mlflow_cv.demos.<module>.<Class>``); the YAMLs themselves live in the top-level ``examples/``.

- :mod:`lightning_mlflow_cv.demos.digits`: the digits CNN on scikit-learn's bundled 8x8 digits, and
  ``lightning-mlflow-cv demo`` (the main job: train, register, gate to ``@champion``).
- :mod:`lightning_mlflow_cv.demos.shapes`: the synthetic shapes generator (images, boxes, labels, masks).
- :mod:`lightning_mlflow_cv.demos.detection`: a small torchvision Faster R-CNN (no pretrained weights).
- :mod:`lightning_mlflow_cv.demos.instance`: a small Mask R-CNN on the same shapes.
- :mod:`lightning_mlflow_cv.demos.segmentation`: a small encoder-decoder for semantic segmentation.
- :mod:`lightning_mlflow_cv.demos.anomaly`: an autoencoder anomaly detector on shapes with defects.
- :mod:`lightning_mlflow_cv.demos.depth`: a small depth regressor on scenes rendered with known depth.
- :mod:`lightning_mlflow_cv.demos._base`: the DataModule and LightningModule bases they all share.
"""
