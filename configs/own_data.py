r"""A study on your own hospitals' data: a table with one row per patient.

  python examples/make_example_csv.py       # writes examples/heart_disease.csv
  fedjax-dx run --config=own_data --workdir=results/own_data
  fedjax-dx run --config=own_data --workdir=results/mine \
      --config.dataset.file=my_hospitals.csv --config.dataset.client_column=site \
      --config.dataset.label_column=outcome --config.dataset.categorical_columns=smoker

The example table is the UCI Heart Disease records of 4 hospitals with readable columns
(text categories, missing values as they are); point `dataset.file` at your own CSV or
Parquet file and name its columns. Each hospital's rows are split 75 / 25 into train
and test (stratified by label, seeded) unless `dataset.split_column` names a column of
train / test values. Features are z-scored with each hospital's train statistics
(`dataset.normalization`), text columns one-hot encoded with the levels of all
hospitals.
"""

from fedjax_dx.configs import heart_disease


def get_config():
  config = heart_disease.get_config()
  config.name = "own_data"
  config.methods = "fedavg,fedprox,centralized,local"
  config.dataset.name = "csv"
  config.dataset.file = "examples/heart_disease.csv"
  config.dataset.client_column = "hospital"
  config.dataset.label_column = "diagnosis"
  config.dataset.classes = "no disease,disease"  # class 1 = the positive finding
  config.dataset.categorical_columns = "sex,chest_pain,rest_ecg"
  config.dataset.missing = "impute"  # hospital's train mean (cholesterol, ...)
  config.num_seeds = 3
  return config
