"""Real medical data sets, registered as tensorflow-datasets builders.

Importing this package registers `fed_heart_disease` (configs `center`, `pooled`,
`raw`), `fed_tcga_brca` and `medmnist/<subset>` (e.g. `medmnist/pneumoniamnist`). It needs
`tensorflow-datasets`, `array_record` and `importlib_resources`, not TensorFlow.
"""

from fedjax_dx.datasets._builders import FedHeartDisease
from fedjax_dx.datasets._builders import FedTcgaBrca
from fedjax_dx.datasets._builders import Medmnist
from fedjax_dx.datasets._heart_disease import HeartDiseaseError
from fedjax_dx.datasets._loaders import DamagedDataError
from fedjax_dx.datasets._loaders import default_data_dir
from fedjax_dx.datasets._loaders import heart_disease
from fedjax_dx.datasets._loaders import medmnist
from fedjax_dx.datasets._loaders import medmnist_arrays
from fedjax_dx.datasets._medmnist import MedMnistError
from fedjax_dx.datasets._medmnist import SUBSETS as MEDMNIST_SUBSETS
from fedjax_dx.datasets._tcga_brca import TcgaBrcaError
from fedjax_dx.datasets._loaders import tcga_brca

__all__ = (
    "DamagedDataError",
    "default_data_dir",
    "FedHeartDisease",
    "heart_disease",
    "HeartDiseaseError",
    "medmnist",
    "Medmnist",
    "medmnist_arrays",
    "MEDMNIST_SUBSETS",
    "MedMnistError",
    "tcga_brca",
    "TcgaBrcaError",
    "FedTcgaBrca",
)
