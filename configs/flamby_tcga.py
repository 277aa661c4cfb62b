"""FLamby's published protocol on Fed-TCGA-BRCA (du Terrail et al., NeurIPS 2022).

  python -m benchmarks.run --config=configs/flamby_tcga.py --workdir=results/flamby_tcga \
      --config.dataset.raw_dir=PATH   # FLamby's brca.csv and train_test_split.csv

Survival of 1,088 breast-cancer patients in 6 regions (866 train, 222 test; FLamby's
static split), 39 clinical covariates used as they are. A linear Cox model (FLamby's
`nn.Linear(39, 1)`), trained on the negative Cox partial log-likelihood of each batch
(Breslow's ties), scored by the concordance index on each region's test set and on the
pooled test set; seeds 42 .. 46. Baselines (pooled and each region alone): Adam, lr
0.1, batch 8, 30 epochs (`flamby/datasets/fed_tcga_brca/common.py`). Federated: 100
local SGD updates of batch 8 per round, for (866 // 6 // 8) * 30 // 100 = 5 rounds
(`get_nb_max_rounds(100)`), with FLamby's per-strategy learning rates
(`flamby/config_tcga_brca.json`). Without raw_dir the files are downloaded from
FLamby's repository (md5-checked). The summary table (mean +- std over seeds) is
`summary_table.md` in the workdir.
"""

import ml_collections

from fedjax_dx.configs import flamby_heart
from fedjax_dx.configs import heart_disease


def get_config() -> ml_collections.ConfigDict:
  config = heart_disease.get_config()
  config.name = "flamby_tcga"
  config.methods = ("centralized,local,fedavg,fedprox,scaffold,fedadam,fedyogi,"
                    "fedadagrad,cyclic")
  config.dataset.name = "tcga_brca"
  config.dataset.source = "auto"
  config.model.name = "cox"
  config.model.hidden = ""  # linear

  # Federated strategies: 100 local SGD updates of batch 8 per round, 5 rounds.
  config.optimizer = "sgd"
  config.learning_rate = 0.1
  config.batch_size = 8
  config.local_steps = 100
  config.local_epochs = 0
  config.rounds = 5
  # FLamby scores the final models; every evaluation scores 6 sites and the pooled sets
  # (the C-index and the partial likelihood are O(n^2) in a set's patients): once at the
  # end (and at round 0). --config.eval_every=1 draws the convergence per round.
  config.eval_every = 5
  config.mu = 0.1
  config.server_learning_rate = 1.0
  config.fedopt_b1, config.fedopt_b2, config.fedopt_tau = 0.9, 0.999, 1e-8
  config.fedopt_form = "flamby"
  config.scaffold_form = "flamby"

  def override(**fields):
    return ml_collections.ConfigDict(fields)

  baseline = dict(optimizer="adam", learning_rate=0.1, local_steps=0, local_epochs=1,
                  rounds=30, eval_every=30)  # 30 epochs, evaluated at the end
  config.per_method = ml_collections.ConfigDict({
      "centralized": override(**baseline),
      "local": override(**baseline),
      "fedavg": override(learning_rate=0.1),
      "fedprox": override(learning_rate=0.1),
      "scaffold": override(learning_rate=0.01),
      "fedadam": override(learning_rate=0.01, fedopt_learning_rate=0.1),
      "fedyogi": override(learning_rate=0.01, fedopt_learning_rate=0.1),
      "fedadagrad": override(learning_rate=0.01, fedopt_learning_rate=1.0),
      "cyclic": override(learning_rate=0.01),
  })
  config.method_notes = ml_collections.ConfigDict(
      {"cyclic": flamby_heart.get_config().method_notes.cyclic})

  config.bootstrap_resamples = 0  # FLamby reports mean +- std over seeds; 100: intervals
  config.fast_compile = True  # compile time dominates a 39 -> 1 model
  config.membership_audit = False  # per-example losses: not a Cox model's
  config.seed = 42
  config.num_seeds = 5  # 42, 43, 44, 45, 46
  config.target_metric = "c_index"
  config.target_value = 0.7
  return config
