"""``lumbarseg``: argument parsing, cohorts and the all-or-nothing writing of outputs. Argparse
results stay in this room; below it, typed objects."""
