"""Aligning the units of models that share no initialization, and merging them once aligned.

Two networks trained from different random initializations compute similar features in a different
order (and, beyond permutations, in a different basis). The methods here find, for every group of
units that share an axis (a :class:`~mergebench.alignment.spec.PermutationSpec`), a map from each
model's units into one merged space (:mod:`~mergebench.alignment.matching`), apply it to the weights
(:mod:`~mergebench.alignment.merge`), and correct the merged network's activation statistics
(:mod:`~mergebench.alignment.repair`). :mod:`~mergebench.alignment.barrier` measures the loss and
accuracy along the linear path between two models.
"""
