"""The label convention shared by data, losses, meters and analysis."""

IGNORE = 255  # void, padding and unlabelled-by-design pixels: in no loss and no metric
