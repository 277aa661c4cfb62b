"""Real medical data sets, registered as tensorflow-datasets builders.

Importing this package registers `fed_heart_disease` (configs `center`, `pooled`,
`raw`), `fed_tcga_brca` and `medmnist/<subset>` (e.g. `medmnist/pneumoniamnist`). It needs
`tensorflow-datasets`, `array_record` and `importlib_resources`, not TensorFlow.

Your own data: `from_file` (CSV, Parquet), `from_dataframe`, `from_tfds` (any TFDS data
set with a feature naming the hospital) and `from_loader` give `TableData`;
`heart_disease_table()` is the Heart Disease records as such a table (the example).
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
from fedjax_dx.datasets._table import from_dataframe
from fedjax_dx.datasets._table import from_file
from fedjax_dx.datasets._table import from_loader
from fedjax_dx.datasets._table import from_tfds
from fedjax_dx.datasets._table import read_table
from fedjax_dx.datasets._table import TableData
from fedjax_dx.datasets._table import TableError
from fedjax_dx.datasets._example import heart_disease_table

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
    "from_dataframe",
    "from_file",
    "from_loader",
    "from_tfds",
    "heart_disease_table",
    "read_table",
    "TableData",
    "TableError",
)
