r"""Writes the example table of configs/own_data.py: the UCI Heart Disease records of
4 hospitals as one CSV of patients (no download: the offline copy).

  python examples/make_example_csv.py                  # examples/heart_disease.csv
  python examples/make_example_csv.py --out=my.csv --format=parquet
"""

from __future__ import annotations

import os

from absl import app
from absl import flags

from fedjax_dx import datasets

_OUT = flags.DEFINE_string("out", os.path.join(os.path.dirname(__file__),
                                               "heart_disease.csv"), "Where to write.")
_FORMAT = flags.DEFINE_enum("format", "csv", ["csv", "parquet"], "File format.")


def main(argv):
  del argv
  table = datasets.heart_disease_table()
  if _FORMAT.value == "parquet":
    table.to_parquet(_OUT.value, index=False)
  else:
    table.to_csv(_OUT.value, index=False)
  counts = table.groupby("hospital")["diagnosis"].value_counts().unstack()
  print(f"{_OUT.value}: {len(table)} patients, {table.shape[1]} columns\n{counts}")


if __name__ == "__main__":
  app.run(main)
