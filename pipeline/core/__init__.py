"""The pipeline's contracts, with no I/O and no Luigi: batch ids, names of tables and staged
objects, the error hierarchy, canonical encoding and hashing, and the typed choices.

Every stage depends on this package and shares nothing else with the other stages.
"""
