"""`lorafit sweep`'s work: space (what varies), plan (checks before training), loop + runner (each point in its
own process), study (random / TPE through Optuna), results (the table, its files, the recommendation)."""
