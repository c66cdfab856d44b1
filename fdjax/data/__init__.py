"""Datasets as numpy arrays, client partitions and the server's distillation split."""

from fdjax.data.partition import (SCHEMES, FederatedData, dirichlet_partition, iid_partition,
                                  label_skew, partition, shard_partition, split_federated)
from fdjax.data.sources import (SOURCES, TFDS_DIR_VARIABLE, ArrayDataset, DataError, Splits,
                                default_tfds_dir, load_embedded, load_image_folder, load_splits,
                                load_synthetic, load_tfds)

__all__ = [
    "SCHEMES", "SOURCES", "TFDS_DIR_VARIABLE", "ArrayDataset", "DataError", "FederatedData",
    "Splits", "default_tfds_dir", "dirichlet_partition", "iid_partition", "label_skew",
    "load_embedded", "load_image_folder", "load_splits", "load_synthetic", "load_tfds",
    "partition", "shard_partition", "split_federated",
]
