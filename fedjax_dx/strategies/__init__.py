"""Strategies as presets over the engine (`fedjax_dx.core._engine`): FedAvg and its
presets FedProx, FedAvgM, FedOpt; SCAFFOLD; cyclic weight transfer; the local-only and
centralized baselines. Public names are re-exported by `fedjax_dx`."""
