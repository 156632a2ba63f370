"""The strategy layer beside the solver: tensor and pipeline parallelism over GPUs and nodes.

Modules: `topology` (links within and between nodes, and what a collective costs on them),
`tensor` (TP sizes a model's plan allows; the model as one rank holds it), `pipeline` (the
engines' layer splits), `ranks` (a layout of ranks and each rank's memory ledger), `cost` (decode
time with the collectives), `strategy` (the candidates a policy allows and the choice).
"""
