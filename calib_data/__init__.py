"""Built-in calibration and evaluation data, and the code that builds it (installed as compress.calib_data)."""
