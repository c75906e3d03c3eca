"""The compute: one module per stage, `python -m stages.<name> --spec URI`. Never imports prefect."""
