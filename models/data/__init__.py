"""Datasets: the synthetic COCO-format generator, registration with detectron2, augmentation."""
