"""Foreign weight formats: the official Selftok release (`official`) and SD3's MMDiT (`sd3`)."""
