"""Bias probes: does the model prefer stereotypes, and do its completions treat groups differently?

Three kinds, each run on the base model (adapter off) and the tuned model: likelihood pairs
(`likelihood`, on the pair sets in `pairs`), completion probes (`completions`, scored by
`scorers`), and counterfactual sentences scored by a classifier (`counterfactual`).
`filter.WordFilter` is the output-side mitigation; `runner` runs any of them for the panel,
the magics and the command line. No widgets here.
"""
