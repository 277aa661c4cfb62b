"""Privacy: the DP accountant (`_accounting`), clipping and Gaussian mechanisms on update
trees (`_mechanisms`), the membership-inference audit (`_membership`) and the secure
aggregation protocol (`_secagg`). Public names are re-exported by `fedjax_dx`."""
