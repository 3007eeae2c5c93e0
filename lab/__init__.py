"""The lab: what trains and probes the shipped yardstick models (`shapes-demo`, `shapes-hd`).

It imports the product (`vidsparse`), never the other way round, and is not in the wheel: users of
`ask`, `batch`, `sweep` and `make-shapes` never load it. Run its modules from a clone's root, e.g.
`python -m lab.train_demo` (what `make train-demo` does) or `python -m lab.read_depth --yardstick hd`.
"""
