"""Methods of the sequential-recommendation track (bench/tracks/sequential_rec.py)."""
