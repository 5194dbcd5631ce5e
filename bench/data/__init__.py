"""The data room: datasets (CIFAR, synthetic, ImageFolder folders), partitions and the
scenario built from them. The runner and the CLI use the names exported here."""

from bench.data.base import DataError, Dataset
from bench.data.datasets import default_data_dir, load_dataset, resolve_data_dir
from bench.data.partitions import ScenarioError
from bench.data.scenario import Scenario, build_scenario

__all__ = ["DataError", "Dataset", "Scenario", "ScenarioError", "build_scenario", "default_data_dir", "load_dataset", "resolve_data_dir"]
