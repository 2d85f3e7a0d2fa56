"""Studies that train many small models side by side (SSA quality, the paper comparison)."""
