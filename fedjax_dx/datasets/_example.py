"""The example table: the UCI Heart Disease records as one CSV-like table of patients."""

from __future__ import annotations

import numpy as np

from fedjax_dx.datasets import _heart_disease

_CODES = {
    "sex": {0.0: "female", 1.0: "male"},
    "chest_pain": {1.0: "typical angina", 2.0: "atypical angina", 3.0: "non-anginal",
                   4.0: "asymptomatic"},
    "rest_ecg": {0.0: "normal", 1.0: "st-t abnormality", 2.0: "lv hypertrophy"},
}
# UCI's columns 0..9 and 13 (FLamby drops slope, ca and thal), as readable names.
_COLUMNS = {0: "age", 1: "sex", 2: "chest_pain", 3: "resting_bp", 4: "cholesterol",
            5: "fasting_blood_sugar", 6: "rest_ecg", 7: "max_heart_rate",
            8: "exercise_angina", 9: "st_depression"}


def heart_disease_table(source: str = "auto", raw_dir: str | None = None):
  """The 920 patients of Fed-Heart-Disease's 4 hospitals as a pandas DataFrame: a
  `hospital` column, 10 readable feature columns (`sex`, `chest_pain` and `rest_ecg`
  as text), missing values as NaN, and the `diagnosis` ("disease" when UCI's `num` > 0,
  else "no disease"). The table a user's own data would look like (configs/own_data.py).

  Args:
    source, raw_dir: where the raw records come from (`heart_disease`'s; by default
      the offline copy, no download).
  """
  import pandas as pd  # pylint: disable=g-import-not-at-top
  tables = _heart_disease.raw_tables(source, raw_dir)
  frames = []
  for name, hospital in zip(_heart_disease.FILES, _heart_disease.CENTER_NAMES):
    table = tables[name]
    frame = pd.DataFrame({"hospital": hospital,
                          **{column: table[:, c] for c, column in _COLUMNS.items()}})
    for column, codes in _CODES.items():
      frame[column] = frame[column].map(codes)  # NaN stays NaN
    frame["diagnosis"] = np.where(table[:, 13] > 0, "disease", "no disease")
    frames.append(frame)
  return pd.concat(frames, ignore_index=True)
