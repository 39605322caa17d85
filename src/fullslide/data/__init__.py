"""Cohort tables, patient-level splits, tile sampling and loading: the data's way from CSV to tile batches."""
