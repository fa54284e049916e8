"""Datasets held in memory as uint8 tensors, loaders, splits and batched augmentation."""
from unbackdoor.data.dataset import ImageDataset
from unbackdoor.data.loaders import DatasetInfo, dataset_info, dataset_names, load_splits
from unbackdoor.data.splits import Splits, stratified_split

__all__ = ["ImageDataset", "Splits", "DatasetInfo", "stratified_split", "load_splits", "dataset_names", "dataset_info"]
