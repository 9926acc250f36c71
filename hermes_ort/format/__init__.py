"""The on-disk contract: manifest, weight files, stage files, atomic publishing."""
